"""Everything one process runs for its part of the plan, from start to orderly stop.

``RankRuntime`` wires this rank's stage replicas to their links (in-process queues when
both ends share the rank, torch.distributed channels otherwise), starts the control
plane, and on rank 0 the web server. The same code runs a single process (world size
1, every link in-process) and any torchrun layout.

Stop and failure: ``request_stop`` ends the job cleanly; ``fail`` records the first
reason (a dead or stalled rank, a broken link, a stage that could not start), tells
the other ranks to stop, and makes the process exit non-zero.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import torch

from comms.channel import Channel
from comms.config import TransportConfig
from comms.errors import ChannelTimeout, TransportError
from comms.inprocess import InProcessChannel
from comms.links import LinkSpec, create_links
from comms.message import Message, Kind
from runtime.aggregate import Aggregator
from runtime.config import MirrorConfig
from runtime.control import ControlClient, ControlHub, config_message
from runtime.frontdoor import FrontDoor, OutputSink
from runtime.live_config import LiveConfig
from runtime.live_view import LiveView
from runtime.metrics import StageMetrics, link_snapshot
from runtime.planner import Plan
from runtime.registry import STAGE_KINDS
from runtime.session_queue import SessionQueue
from runtime.stage_loop import Router, StageRunner
from stages.base import StageContext

log = logging.getLogger(__name__)

FAILED_SHUTDOWN_S = 2.0


class RankRuntime:
    def __init__(self, config: MirrorConfig, plan: Plan, rank: int) -> None:
        self.config = config
        self.plan = plan
        self.rank = rank
        self.me = plan.ranks[rank]
        self.distributed = plan.world_size > 1
        self.stopping = threading.Event()
        self.failure: str | None = None
        self._fail_lock = threading.Lock()
        self.live = LiveView(1, config.runtime)
        self.channels: dict[str, Channel] = {}
        self.runners: list[StageRunner] = []
        self.metrics: dict[str, StageMetrics] = {}
        self.hub: ControlHub | None = None
        self.client: ControlClient | None = None
        self.server = None
        self.inbox: SessionQueue | None = None
        self.url: str | None = None
        self.stop_reason = ""
        self._signalled: str | None = None

    # -- building --------------------------------------------------------------------

    def start(self) -> None:
        """Build links (collective across ranks), stages and control; returns when ready."""
        self._build_channels()
        if self.rank == 0:
            self._build_front()
        self._build_control()
        self._build_runners()
        for runner in self.runners:
            runner.start()
        deadline = time.monotonic() + self.config.transport.init_timeout_s
        for runner in self.runners:
            if not runner.ready.wait(max(0.0, deadline - time.monotonic())):
                self.fail(f"stage {runner.name} did not finish setup in {self.config.transport.init_timeout_s} s")
        if self.failure:
            raise RuntimeError(self.failure)
        self._start_control()
        if self.rank == 0:
            self._wait_for_ranks(deadline)
            self.server.start()
            self.url = self.server.url
            log.info("pipeline %r ready on %d rank(s); open %s",
                     self.config.pipeline.name, self.plan.world_size, self.url)

    def _build_channels(self) -> None:
        capacity = self.config.transport.link_capacity
        remote_specs = []
        for link in self.plan.links:
            if link.local:
                if link.src_rank == self.rank:
                    self.channels[link.name] = InProcessChannel(link.name, capacity)
            else:
                remote_specs.append(self._spec(link.name, link.src_rank, link.dst_rank,
                                               link.src_device, link.dst_device))
        if self.distributed:
            for r in range(1, self.plan.world_size):
                remote_specs.append(self._spec(f"ctl:0->{r}", 0, r))
                remote_specs.append(self._spec(f"status:{r}->0", r, 0))
            self.channels.update(create_links(remote_specs, self._link_transport()))

    def _spec(self, name: str, src: int, dst: int, src_device: str = "cpu", dst_device: str = "cpu") -> LinkSpec:
        same_host = self.plan.ranks[src].node == self.plan.ranks[dst].node
        return LinkSpec(name=name, src_rank=src, dst_rank=dst, src_device=src_device, dst_device=dst_device,
                        same_host=same_host)

    def _link_transport(self) -> TransportConfig:
        """The transport config the links get: the plan decides whether NCCL may be used
        at all (it may not when ranks share a GPU: NCCL refuses two ranks on one device);
        then each link picks NCCL only when both of its ends are on CUDA."""
        if self.plan.backend(self.config.transport.backend) == "nccl":
            return dataclasses.replace(self.config.transport, backend="auto")
        return dataclasses.replace(self.config.transport, backend="gloo")

    def _build_front(self) -> None:
        from stages.server.ws_server import WebServer  # only rank 0 serves browsers

        self.live_config = LiveConfig(self.config.runtime, self.config.presets)
        self.inbox = SessionQueue("sessions", self.config.flow.session_queue_depth)
        roles = {a.rank: a.role for a in self.plan.ranks}
        self.aggregator = Aggregator(roles, self._liveness, lambda: (self.inbox.dropped_total, self.inbox.flushed),
                                     lambda: self.live.get().revision, local_snapshot=self.snapshot)
        self.front = FrontDoor(live_config=self.live_config, live_view=self.live, inbox=self.inbox,
                               aggregator=self.aggregator, broadcast=self._broadcast_config,
                               health=self.health)
        self.server = WebServer(self.config.server, self.front)
        self.sink = OutputSink(self.server, self.aggregator, is_open=self.front.is_open)
        self.front.session_closed = self.sink.forget

    def _build_runners(self) -> None:
        stages = self.config.pipeline.stages
        index = {spec.name: i for i, spec in enumerate(stages)}
        for placement in self.me.stages:
            spec = stages[index[placement.stage]]
            name = f"{spec.name}#{placement.replica}"
            is_first, is_last = index[spec.name] == 0, index[spec.name] == len(stages) - 1
            inputs = [self.inbox] if is_first else [
                self.channels[l.name] for l in self.plan.links
                if l.dst_stage == spec.name and l.dst_replica == placement.replica]
            outputs = [self.sink] if is_last else [
                self.channels[l.name] for l in self.plan.links
                if l.src_stage == spec.name and l.src_replica == placement.replica]
            context = StageContext(rank=self.rank, role=self.me.role, replica=placement.replica,
                                   device=torch.device(placement.device),
                                   logger=logging.getLogger(f"stages.{name}"),
                                   runtime=self.live.get, publish_event=self._publish_event)
            stage = STAGE_KINDS[spec.kind](self.config.stage_config(spec), context)
            self.metrics[name] = StageMetrics(name)
            self.runners.append(StageRunner(
                name=name, stage=stage, inputs=inputs,
                router=Router(outputs, spec.routing, self.stopping),
                max_batch=spec.max_batch, batch_wait_ms=spec.batch_wait_ms, live=self.live,
                metrics=self.metrics[name], stop=self.stopping,
                publish_event=self._publish_event, on_failure=self.fail))

    def _build_control(self) -> None:
        if not self.distributed:
            return
        if self.rank == 0:
            others = range(1, self.plan.world_size)
            self.hub = ControlHub(
                config=self.config.control,
                ctl={r: self.channels[f"ctl:0->{r}"] for r in others},
                status={r: self.channels[f"status:{r}->0"] for r in others},
                roles={a.rank: a.role for a in self.plan.ranks},
                on_snapshot=self.aggregator.on_snapshot, on_event=self.sink.deliver_event,
                on_stop=self.request_stop, on_failure=self.fail, stopping=self.stopping)
        else:
            self.client = ControlClient(
                config=self.config.control, ctl=self.channels[f"ctl:0->{self.rank}"],
                status=self.channels[f"status:{self.rank}->0"], live=self.live,
                snapshot=self.snapshot, on_stop=self.request_stop, on_failure=self.fail,
                stopping=self.stopping)

    def _start_control(self) -> None:
        for side in (self.hub, self.client):
            if side is not None:
                side.start()

    def _wait_for_ranks(self, deadline: float) -> None:
        if self.hub is None:
            return
        while not self.hub.all_reported.wait(0.2):
            if self.stopping.is_set():
                break  # a rank already reported why it cannot start
            if time.monotonic() > deadline:
                missing = [self.hub.describe(r) for r in self.hub.unreported()]
                self.fail(f"not ready in {self.config.transport.init_timeout_s} s: {', '.join(missing)}")
                break
        if self.failure:
            raise RuntimeError(self.failure)

    # -- running ---------------------------------------------------------------------

    def note_signal(self, name: str) -> None:
        """For signal handlers: only records the signal. Stopping takes locks, and a
        handler runs on the main thread, which may hold one of them at that moment."""
        self._signalled = name

    def wait(self) -> None:
        while not self.stopping.is_set():
            if self._signalled:
                self.request_stop(self._signalled)
            time.sleep(0.1)

    def request_stop(self, reason: str) -> None:
        if self.stopping.is_set():
            return
        self.stop_reason = reason
        log.info("stopping: %s", reason)
        if self.hub is not None:
            self.hub.broadcast(Message(kind=Kind.CONTROL, meta={
                "op": "stop", "reason": reason, "failed": self.failure is not None}))
        self.stopping.set()

    def fail(self, reason: str) -> None:
        with self._fail_lock:
            if self.failure is not None or self.stopping.is_set():
                return
            self.failure = reason
        log.error("job failed: %s", reason)
        self.request_stop(f"failure: {reason}")

    def _broadcast_config(self, revision: int) -> None:
        if self.hub is not None:
            revision, settings = self.live_config.current()
            self.hub.broadcast(config_message(revision, settings))

    def _publish_event(self, msg: Message) -> None:
        if self.rank == 0:
            self.sink.deliver_event(msg)
        elif self.client is not None:
            self.client.publish_event(msg)

    # -- observing -------------------------------------------------------------------

    def snapshot(self) -> dict:
        links = {}
        for name, channel in self.channels.items():
            if name.startswith(("ctl:", "status:")):
                continue
            links[name] = link_snapshot(channel.stats.snapshot())
        return {"rank": self.rank, "role": self.me.role,
                "stages": {n: m.snapshot() for n, m in self.metrics.items()}, "links": links}

    def _liveness(self) -> dict[int, tuple[bool, float]]:
        state = {0: (self.failure is None, 0.0)}
        if self.hub is not None:
            state.update(self.hub.liveness())
        return state

    def health(self) -> dict:
        liveness = self._liveness()
        ranks = [{"rank": a.rank, "role": a.role, "node": a.node, "device": a.device,
                  "alive": liveness.get(a.rank, (False, 0.0))[0],
                  "last_seen_s": round(liveness.get(a.rank, (False, 0.0))[1], 2)}
                 for a in self.plan.ranks]
        return {"ok": self.failure is None and all(r["alive"] for r in ranks),
                "pipeline": self.config.pipeline.name, "world_size": self.plan.world_size,
                "revision": self.live.get().revision, "failure": self.failure, "ranks": ranks}

    # -- stopping --------------------------------------------------------------------

    def close(self) -> None:
        """Orderly stop: no new frames, stages end, links closed (END), inbound drained."""
        self.request_stop("shutting down")
        deadline = time.monotonic() + self.shutdown_budget()
        if self.server is not None:
            self.server.stop()
        if self.hub is not None and not self.hub.flush(max(0.1, deadline - time.monotonic())):
            log.warning("the stop message did not reach every rank in time")
        if self.client is not None:
            self.client.leave(self.failure or self.stop_reason, failed=self.failure is not None)
        if self.inbox is not None:
            self.inbox.close()
        for runner in self.runners:
            if not runner.join(max(0.1, deadline - time.monotonic())):
                log.warning("stage %s did not stop in time", runner.name)
        remote = dict(self._remote_links())
        for name, channel in self.channels.items():
            if name not in remote or remote[name][0] == self.rank:
                channel.close()  # ours to close: local queues, and links we send on (END)
        for name, (_, dst) in remote.items():
            # Control links are drained by the control plane's own listener threads.
            if dst == self.rank and not name.startswith(("ctl:", "status:")):
                _drain(self.channels[name], deadline)
        for name in remote:
            # Their threads must be done before the process group they use is destroyed.
            self.channels[name].join(max(0.0, deadline - time.monotonic()))
        log.info("stopped%s", f" after failure: {self.failure}" if self.failure else "")

    def shutdown_budget(self) -> float:
        """Seconds an orderly stop may take. After a failure a peer may be dead or frozen
        and will never send END: wait briefly, then leave without its last messages."""
        budget = self.config.control.shutdown_timeout_s
        return budget if self.failure is None else min(budget, FAILED_SHUTDOWN_S)

    def _remote_links(self) -> list[tuple[str, tuple[int, int]]]:
        """Cross-rank links this rank is an end of: ``(name, (src, dst))``."""
        out = [(l.name, (l.src_rank, l.dst_rank)) for l in self.plan.links if not l.local]
        if self.distributed:
            for r in range(1, self.plan.world_size):
                out += [(f"ctl:0->{r}", (0, r)), (f"status:{r}->0", (r, 0))]
        return [(n, ends) for n, ends in out if self.rank in ends]


def _drain(channel: Channel, deadline: float) -> None:
    """Consume what is left on an inbound link until its sender's END (bounded)."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            log.warning("link %s: no END from its sender before the shutdown deadline", channel.name)
            return
        try:
            channel.recv(timeout=min(remaining, 0.5))
        except ChannelTimeout:
            continue
        except TransportError:  # ChannelClosed (END) or a broken link: nothing more comes
            return
