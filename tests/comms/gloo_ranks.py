"""Real multi-process gloo worlds for tests: spawn N ranks once, run functions on them.

    with GlooWorld(2) as world:
        results = world.run(my_module_level_fn, arg1, timeout=30)   # one result per rank

``fn(rank, world_size, *args)`` runs on every rank at once (so it may call collectives
such as ``create_links``) and must be importable by name in the children (defined at
module level). A rank that raises makes ``run`` fail with that rank's traceback; a
rank listed in ``expect_exit`` may die on purpose (``os._exit``, SIGKILL) and yields
None. Spawning costs a few seconds per world, so tests share one where they can and
use ``world.broken`` to know when a fresh one is needed.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import time
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0 and let the OS choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, backend: str, inbox, outbox) -> None:
    import torch
    import torch.distributed as dist

    logging.basicConfig(level=os.environ.get("MM_TEST_LOG", "WARNING"))
    # As torchrun would: TCP links find this "node's" address on the route to the master.
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    if "nccl" in backend:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    outbox.put((rank, "ready", None))
    while True:
        job = inbox.get()
        if job is None:
            break
        fn, args = job
        try:
            outbox.put((rank, "ok", fn(rank, world_size, *args)))
        except BaseException:
            outbox.put((rank, "error", traceback.format_exc()))
    # No destroy_process_group: after a rank was killed on purpose it could wait on
    # the dead member; process exit releases everything.


class GlooWorld:
    """``world_size`` spawned ranks with a gloo default group on localhost."""

    def __init__(self, world_size: int, start_timeout: float = 60.0, backend: str = "gloo") -> None:
        if world_size < 2:
            raise ValueError(f"world_size must be >= 2, got {world_size}")
        self.world_size = world_size
        self.broken = False
        ctx = mp.get_context("spawn")
        port = free_port()
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(world_size)]
        self._procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, self._inboxes[r], self._outbox),
                                   daemon=True, name=f"gloo-rank-{r}") for r in range(world_size)]
        for p in self._procs:
            p.start()
        self._collect({r: None for r in range(world_size)}, set(), start_timeout, expect="ready")

    def run(self, fn, *args, timeout: float = 60.0, expect_exit: set[int] = frozenset()) -> list:
        """Run ``fn`` on every rank; results by rank (None for ranks in ``expect_exit``)."""
        if self.broken:
            raise RuntimeError("this GlooWorld lost a rank or timed out; start a new one")
        for inbox in self._inboxes:
            inbox.put((fn, args))
        results = {r: None for r in range(self.world_size)}
        self._collect(results, set(expect_exit), timeout, expect="ok")
        if expect_exit:
            self.broken = True
        return [results[r] for r in range(self.world_size)]

    def _collect(self, results: dict, expect_exit: set[int], timeout: float, expect: str) -> None:
        waiting = set(results) - expect_exit
        deadline = time.monotonic() + timeout
        while waiting:
            try:
                rank, status, value = self._outbox.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r in waiting if not self._procs[r].is_alive()]
                if dead or time.monotonic() > deadline:
                    self.broken = True
                    self.close()
                    what = f"ranks {dead} died" if dead else f"ranks {sorted(waiting)} timed out after {timeout} s"
                    raise AssertionError(f"gloo world: {what}")
                continue
            if status == "error":
                self.broken = True
                self.close()
                raise AssertionError(f"rank {rank} raised:\n{value}")
            if status == expect:
                results[rank] = value
                waiting.discard(rank)

    def close(self) -> None:
        for inbox, proc in zip(self._inboxes, self._procs):
            if proc.is_alive():
                inbox.put(None)
        deadline = time.monotonic() + 5.0
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                log.warning("gloo world: killing rank process %s that did not exit", proc.pid)
                proc.kill()
                proc.join(2.0)

    def __enter__(self) -> "GlooWorld":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
