"""The two ranks of the transport benchmark and the six ways they move one tensor.

``Ranks`` spawns two processes (torch.multiprocessing, gloo on a free 127.0.0.1 port)
that live for the whole section. Each builds every path once — the channel's two links,
the gRPC server (rank 1) and client (rank 0), the queue ends — and then runs ``Job``s
sent to both at once: rank 0 leads and times, rank 1 mirrors.

    channel   comms.links.create_links, one link per direction, as the runtime builds it
              between two ranks of one node (same-host: Unix socket + shared memory)
    channel_gloo  as the runtime builds it between two nodes (torch link, all on gloo)
    raw       dist.send/recv of the bare tensor on the default gloo group
    grpc      runtime.bench.grpc_tensor: bytes over gRPC, server in rank 1
    mp_queue  multiprocessing.Queue pair carrying the tensor's numpy array
    memcpy    Tensor.copy_ inside rank 0

Every wait is bounded. Inside a rank, a channel, gRPC or queue send, receive or call
waits at most ``WAIT_S``; what goes through the gloo group itself (the raw path's
``dist.send``/``dist.recv``, barriers, the broadcast of the gRPC port) has no timeout of
its own and is bounded by the group's, ``JOB_TIMEOUT_S``. The parent waits at most
``JOB_TIMEOUT_S`` per job, and a rank that dies or raises turns into a ``RuntimeError``
naming the job it was running.
"""

from __future__ import annotations

import logging
import queue
import time
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from comms.config import TransportConfig
from comms.link_spec import LinkSpec, Transport
from comms.links import create_links
from comms.message import Kind, Message
from runtime.bench import grpc_tensor
from runtime.bench.ports import free_port
from runtime.dist import destroy_distributed

METHODS = ("channel", "channel_gloo", "raw", "grpc", "mp_queue", "memcpy")
WAIT_S = 30.0
"""Longest a single channel, gRPC or queue send, receive or call inside a rank waits."""
JOB_TIMEOUT_S = 90.0
"""Longest the parent waits for one job (or the start-up) before giving up; also the gloo
group's timeout, the bound on raw send/recv and barriers inside a rank."""


@dataclass(frozen=True, slots=True)
class Payload:
    """One tensor as the pipeline would send it."""

    label: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * torch.Size(self.shape).numel()

    def describe(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')} {list(self.shape)}"

    def make(self) -> torch.Tensor:
        """Random content, so no layer can shortcut zeros."""
        generator = torch.Generator().manual_seed(0)
        if self.dtype.is_floating_point:
            return torch.rand(self.shape, dtype=self.dtype, generator=generator)
        return torch.randint(0, 256, self.shape, dtype=self.dtype, generator=generator)

    def empty(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype)


@dataclass(frozen=True, slots=True)
class Job:
    """One measurement: ``messages`` streamed one way, then ``pings`` round trips."""

    method: str
    payload: Payload
    messages: int
    pings: int

    def __str__(self) -> str:
        return f"{self.method} at {self.payload.label}"


@dataclass(frozen=True, slots=True)
class Sample:
    """What rank 0 timed in one job."""

    stream_s: float
    """Seconds from the first send to the acknowledgement after the last."""
    round_trips_ns: list[int]


class Method(ABC):
    """One method's two ends. Rank 0 times ``stream`` and ``ping``; rank 1 mirrors them with
    ``take`` and ``echo``. ``prepare`` runs on both ranks before each job, off the clock."""

    def prepare(self, payload: Payload) -> None:
        """Allocate or announce what the job's payload needs (nothing by default)."""

    @abstractmethod
    def stream(self, tensor: torch.Tensor, count: int) -> None:
        """Send ``tensor`` ``count`` times; return once the far end acknowledged the last."""

    @abstractmethod
    def ping(self, tensor: torch.Tensor) -> None:
        """Send ``tensor`` and wait for it to come back."""

    def take(self, count: int) -> None:
        """Rank 1's side of ``stream`` (nothing when rank 1 has no part)."""

    def echo(self, count: int) -> None:
        """Rank 1's side of ``count`` pings (nothing when rank 1 has no part)."""

    def close(self) -> None:
        """Release this end; both ranks call it at the same point."""


class ChannelPath(Method):
    """Messages with one tensor on two links; the acknowledgement is an empty CONTROL
    message on the backward link. ``transport``: what the planner decides for two ranks
    of one node (SAME_HOST) or of two nodes (TCP; TORCH on gloo with
    ``between_nodes: gloo``)."""

    def __init__(self, rank: int, transport: Transport, config: TransportConfig) -> None:
        backend = "gloo" if transport == Transport.TORCH else None
        forward, backward = f"forward-{transport}", f"backward-{transport}"
        links = create_links([LinkSpec(name=forward, src_rank=0, dst_rank=1, transport=transport, backend=backend),
                              LinkSpec(name=backward, src_rank=1, dst_rank=0, transport=transport, backend=backend)],
                             config)
        self.out, self.into = ((links.writers[forward], links.readers[backward]) if rank == 0
                               else (links.writers[backward], links.readers[forward]))

    def stream(self, tensor, count):
        for i in range(count):
            self.out.send(Message(kind=Kind.DATA, frame_id=i, tensors=[tensor]), timeout=WAIT_S)
        self.into.recv(timeout=WAIT_S)

    def ping(self, tensor):
        self.out.send(Message(kind=Kind.DATA, tensors=[tensor]), timeout=WAIT_S)
        self.into.recv(timeout=WAIT_S)

    def take(self, count):
        for _ in range(count):
            self.into.recv(timeout=WAIT_S)
        self.out.send(Message(kind=Kind.CONTROL), timeout=WAIT_S)

    def echo(self, count):
        for _ in range(count):
            self.out.send(self.into.recv(timeout=WAIT_S), timeout=WAIT_S)

    def close(self):
        # Both ranks close both ends at this point: nothing is in flight any more.
        self.out.close()
        self.into.close()
        self.out.join(WAIT_S / 3)
        self.into.join(WAIT_S / 3)


class RawPath(Method):
    """Blocking send/recv of the bare tensor on the default group, into a buffer allocated
    before the clock starts; the acknowledgement is one int64."""

    def __init__(self, rank: int) -> None:
        self.peer = 1 - rank
        self.ack = torch.zeros(1, dtype=torch.int64)
        self.buffer = torch.empty(0)

    def prepare(self, payload):
        self.buffer = payload.empty()

    def stream(self, tensor, count):
        for _ in range(count):
            dist.send(tensor, self.peer)
        dist.recv(self.ack, self.peer)

    def ping(self, tensor):
        dist.send(tensor, self.peer)
        dist.recv(self.buffer, self.peer)

    def take(self, count):
        for _ in range(count):
            dist.recv(self.buffer, self.peer)
        dist.send(self.ack, self.peer)

    def echo(self, count):
        for _ in range(count):
            dist.recv(self.buffer, self.peer)
            dist.send(self.buffer, self.peer)


class _GrpcPath(Method):
    """Server in rank 1 (its thread pool does the receiving), client in rank 0; the
    acknowledgement is the streaming call's answer."""

    def __init__(self, rank: int) -> None:
        port = torch.zeros(1, dtype=torch.int64)
        self.sink = self.server = self.client = None
        if rank == 1:
            self.sink = grpc_tensor.TensorSink()
            self.server, bound = grpc_tensor.serve(self.sink)
            port[0] = bound
        dist.broadcast(port, src=1)
        if rank == 0:
            self.client = grpc_tensor.TensorClient(int(port), timeout_s=WAIT_S)

    def prepare(self, payload):
        if self.sink is not None:
            self.sink.expect(payload.dtype, payload.shape)

    def stream(self, tensor, count):
        taken = self.client.stream(tensor, count)
        if taken != count:
            raise RuntimeError(f"gRPC server took {taken} of {count} tensors")

    def ping(self, tensor):
        self.client.echo(tensor)

    def close(self):
        # The client goes first, so the server's stop does not cut a live connection.
        if self.client is not None:
            self.client.close()
        dist.barrier()
        if self.server is not None:
            self.server.stop(grace=None)


class _QueuePath(Method):
    """The tensor's numpy array through two multiprocessing queues as deep as a link's
    capacity: pickled into a pipe by the queue's feeder thread, unpickled by ``get``,
    wrapped by ``torch.from_numpy``; the acknowledgement is a short bytes object."""

    def __init__(self, forward, backward) -> None:
        self.forward, self.backward = forward, backward

    def stream(self, tensor, count):
        array = tensor.numpy()
        for _ in range(count):
            self.forward.put(array, timeout=WAIT_S)
        self.backward.get(timeout=WAIT_S)

    def ping(self, tensor):
        self.forward.put(tensor.numpy(), timeout=WAIT_S)
        torch.from_numpy(self.backward.get(timeout=WAIT_S))

    def take(self, count):
        for _ in range(count):
            torch.from_numpy(self.forward.get(timeout=WAIT_S))
        self.backward.put(b"ack", timeout=WAIT_S)

    def echo(self, count):
        for _ in range(count):
            self.backward.put(self.forward.get(timeout=WAIT_S), timeout=WAIT_S)


class _MemcpyPath(Method):
    """Copies in rank 0 only, into tensors allocated before the clock; a round trip is a
    copy there and one back, so half of it is one copy like every other method's."""

    def __init__(self) -> None:
        self.there = self.back = torch.empty(0)

    def prepare(self, payload):
        self.there, self.back = payload.empty(), payload.empty()

    def stream(self, tensor, count):
        for _ in range(count):
            self.there.copy_(tensor)

    def ping(self, tensor):
        self.there.copy_(tensor)
        self.back.copy_(self.there)


def run_job(paths: dict[str, Method], rank: int, job: Job) -> Sample | None:
    """Both ranks start together and end together (barriers); rank 0 returns its timings."""
    path = paths[job.method]
    path.prepare(job.payload)
    tensor = job.payload.make() if rank == 0 else None
    dist.barrier()
    if rank == 0:
        sample = _lead(path, tensor, job)
    else:
        path.take(job.messages)
        path.echo(job.pings)
        sample = None
    dist.barrier()
    return sample


def _lead(path: Method, tensor: torch.Tensor, job: Job) -> Sample:
    start = time.perf_counter_ns()
    path.stream(tensor, job.messages)
    stream_s = (time.perf_counter_ns() - start) / 1e9
    round_trips = []
    for _ in range(job.pings):
        sent = time.perf_counter_ns()
        path.ping(tensor)
        round_trips.append(time.perf_counter_ns() - sent)
    return Sample(stream_s, round_trips)


def _worker(rank: int, port: int, inbox, outbox, queues, config: TransportConfig, log_path: str) -> None:
    """One rank: build every path once, run jobs until told to stop, close everything."""
    logging.basicConfig(filename=log_path, level=logging.WARNING,
                        format=f"%(asctime)s rank {rank} %(name)s %(levelname)s: %(message)s")
    logging.captureWarnings(True)
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=JOB_TIMEOUT_S))
        paths = {"channel": ChannelPath(rank, Transport.SAME_HOST, config),
                 "channel_gloo": ChannelPath(rank, Transport.TORCH, config),
                 "raw": RawPath(rank), "grpc": _GrpcPath(rank),
                 "mp_queue": _QueuePath(*queues), "memcpy": _MemcpyPath()}
        outbox.put((rank, "ok", None))
        while (job := _next_job(inbox)) is not None:
            outbox.put((rank, "ok", run_job(paths, rank, job)))
        for path in paths.values():
            path.close()
        destroy_distributed(WAIT_S / 3)
        outbox.put((rank, "ok", None))
    except BaseException:
        outbox.put((rank, "error", traceback.format_exc()))


def _next_job(inbox) -> Job | None:
    """The parent's next job; None means stop (also when the parent is gone)."""
    while True:
        try:
            return inbox.get(timeout=1.0)
        except queue.Empty:
            if not mp.parent_process().is_alive():
                return None


class Ranks:
    """The two ranks, alive from start-up to the end of the ``with`` block; jobs go to both
    at once. ``config``: the channel's settings (defaults unless an experiment sets some)."""

    def __init__(self, log_path: Path, config: TransportConfig | None = None) -> None:
        ctx = mp.get_context("spawn")
        config = config or TransportConfig()
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue(), ctx.Queue()]
        queues = (ctx.Queue(maxsize=config.link_capacity), ctx.Queue(maxsize=config.link_capacity))
        port = free_port()
        self._procs = [ctx.Process(target=_worker, args=(rank, port, self._inboxes[rank], self._outbox, queues,
                                                         config, str(log_path)),
                                   name=f"transport-rank-{rank}", daemon=True)
                       for rank in range(2)]
        for proc in self._procs:
            proc.start()
        try:
            self._collect("start-up")
        except BaseException:
            self.close(failed=True)
            raise

    def run(self, job: Job) -> Sample:
        for inbox in self._inboxes:
            inbox.put(job)
        return self._collect(str(job))[0]

    def __enter__(self) -> "Ranks":
        return self

    def __exit__(self, failed, *_) -> None:
        self.close(failed=failed is not None)

    def close(self, failed: bool) -> None:
        """Unless ``failed``, stop both ranks in order (links closed, groups destroyed);
        kill those still alive after that (at once when ``failed``)."""
        try:
            if not failed:
                for inbox in self._inboxes:
                    inbox.put(None)
                self._collect("shutdown")
        finally:
            for proc in self._procs:
                proc.join(0 if failed else WAIT_S / 3)
                if proc.is_alive():
                    proc.kill()
                    proc.join(WAIT_S / 3)

    def _collect(self, what: str) -> list:
        """Both ranks' answers to the last request; raises naming ``what`` on a failure."""
        answers: dict[int, object] = {}
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while len(answers) < 2:
            try:
                rank, status, value = self._outbox.get(timeout=0.2)
            except queue.Empty:
                dead = self._dead(answers)
                if dead or time.monotonic() > deadline:
                    reason = dead or f"no answer within {JOB_TIMEOUT_S:.0f} s"
                    raise RuntimeError(f"transport bench: {reason} during {what}") from None
                continue
            if status == "error":
                if dead := self._dead(answers):
                    cause = f"{dead} during {what}; rank {rank} then failed"
                else:
                    cause = f"rank {rank} failed during {what}"
                raise RuntimeError(f"transport bench: {cause}:\n{value}")
            answers[rank] = value
        return [answers[0], answers[1]]

    def _dead(self, answered: dict) -> str:
        """Which ranks that still owe an answer have died, as text ('' when none)."""
        return ", ".join(f"rank {r} died (exit code {p.exitcode})" for r, p in enumerate(self._procs)
                         if r not in answered and not p.is_alive())
