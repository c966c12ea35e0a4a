"""The loop that runs one stage replica: receive, micro-batch, process, route.

    inputs (``Inlet``s: links from upstream replicas, or the front door's session queue)
        -> gather up to ``max_batch`` messages (waiting ``batch_wait_ms`` at most)
        -> drop stale frames (captured before the latest live-config change)
        -> ``stage.process(batch)``
        -> ``Router`` picks a downstream replica per output (``Outlet``s; credits = backpressure;
           ``runtime.router``)

A source stage (it accepts nothing) has no inputs: ``process([])`` is called again and
again and paces itself. A sink (it emits nothing) has no router.

A failing batch is logged, counted and reported to its sessions; it does not stop the
stage. Nor does a data link whose peer rank died: an inbound one (``PeerFailure``) just
ends that input, as END would, and the router routes around an outbound one. (Losing
the server rank is fatal, but that is the control plane's finding, not this loop's.)
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Protocol

from comms.errors import ChannelClosed, ChannelTimeout, PeerFailure
from comms.message import Kind, Message
from runtime.availability import StageAvailability
from runtime.lifecycle import Lifecycle
from runtime.live_view import LiveView
from runtime.metrics import StageMetrics
from runtime.router import POLL_S, Fallback, Outlet, Placer, Router
from stages.base import Stage

__all__ = ["Fallback", "Inlet", "Outlet", "Placer", "Router", "StageRunner", "POLL_S", "SOURCE_IDLE_S"]

log = logging.getLogger(__name__)

SOURCE_IDLE_S = 0.01
"""A source that produced nothing is called again after this, not at once: a source that
returns early must not spin a core."""


class Inlet(Protocol):
    """What a runner reads from: a link's receiving end, or the front door's session queue.
    ``recv`` raises ``ChannelTimeout`` when nothing came in time and ``ChannelClosed``
    once nothing more will come."""

    name: str

    def recv(self, timeout: float | None = None) -> Message: ...


class StageRunner:
    """Runs ``stage`` on its own thread until the job stops or its inputs end."""

    def __init__(self, *, name: str, stage: Stage, inputs: list[Inlet], router: Router | None,
                 max_batch: int, batch_wait_ms: float, live: LiveView, metrics: StageMetrics,
                 lifecycle: Lifecycle, publish_event: Callable[[Message], None],
                 availability: StageAvailability | None = None, stage_name: str | None = None) -> None:
        self.name = name
        self.stage = stage
        self.availability = availability
        """Where this stage's own ``unavailable()`` reason is published, under ``stage_name``."""
        self.stage_name = stage_name or name
        self.inputs = list(inputs)
        self.router = router
        """None for a sink."""
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.live = live
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.stop = lifecycle.stopping
        self.publish_event = publish_event
        self.ready = threading.Event()
        self._source = stage.accepts is None
        self._thread = threading.Thread(target=self._run, name=f"stage-{name}", daemon=True)
        self._next_input = 0
        self._error_logs = 0
        self._sink_warned = False

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> bool:
        """True once the runner's thread has ended (or never started: the job stopped first)."""
        if self._thread.ident is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            self.stage.setup()
            self._publish_availability()
            self.ready.set()
            if self._source:
                while not self.stop.is_set():
                    if not self._process([]):
                        self.stop.wait(SOURCE_IDLE_S)
            while not self.stop.is_set() and self.inputs:
                batch = self._gather()
                if batch:
                    self._process(batch)
        except PeerFailure as e:  # not a data link's (those are handled where they happen)
            self.lifecycle.fail(f"stage {self.name}: {e}")
        except Exception as e:  # setup failure or a bug in the loop itself
            log.exception("stage %s failed", self.name)
            self.lifecycle.fail(f"stage {self.name} failed: {e!r}")
        finally:
            self.ready.set()
            try:
                self.stage.teardown()
            except Exception:
                log.exception("stage %s teardown failed", self.name)

    # -- receiving -------------------------------------------------------------------

    def _recv_one(self, timeout: float) -> Message | None:
        """Next message from any input, fairly; None on timeout. Drops ended inputs."""
        deadline = time.monotonic() + timeout
        wait = 0.0002
        while self.inputs:
            if len(self.inputs) == 1:
                return self._try(self.inputs[0], max(0.0, deadline - time.monotonic()))
            for _ in range(len(self.inputs)):
                self._next_input = (self._next_input + 1) % len(self.inputs)
                msg = self._try(self.inputs[self._next_input], 0)
                if msg is not None:
                    return msg
                if not self.inputs:
                    return None
            if time.monotonic() >= deadline:
                return None
            # Several upstream replicas and none ready: back off briefly (no select()
            # exists across channel kinds); 2 ms caps the added latency.
            time.sleep(wait)
            wait = min(wait * 2, 0.002)
        return None

    def _try(self, inlet: Inlet, timeout: float) -> Message | None:
        try:
            msg = inlet.recv(timeout=timeout)
        except ChannelTimeout:
            return None
        except ChannelClosed:  # the sender closed (END): this input is done
            self._end_input(inlet)
            return None
        except PeerFailure as e:  # the upstream replica's rank died: nothing more comes from it
            if not self.stop.is_set():
                log.warning("stage %s: input %s is lost (%s); reading the others", self.name, inlet.name, e)
            self._end_input(inlet)
            return None
        return msg

    def _end_input(self, inlet: Inlet) -> None:
        self.inputs.remove(inlet)
        self._next_input = 0
        if not self.inputs and not self.stop.is_set():
            log.info("stage %s: every input has ended; the stage stops (the rank runs on until the job stops)",
                     self.name)

    def _gather(self) -> list[Message]:
        first = self._recv_one(POLL_S)
        if first is None:
            return []
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch:
            msg = self._recv_one(max(0.0, deadline - time.monotonic()))
            if msg is None:
                break
            batch.append(msg)
        return batch

    # -- processing ------------------------------------------------------------------

    def _process(self, batch: list[Message]) -> int:
        """Process one batch (empty for a source) and route its outputs; returns how many
        messages it produced."""
        floor = self.live.flush_floor
        fresh = [m for m in batch if m.revision >= floor]
        if len(fresh) < len(batch):
            self.metrics.count("flushed", len(batch) - len(fresh))
        if not fresh and not self._source:
            return 0
        start = time.perf_counter()
        try:
            outputs = self.stage.process(fresh)
        except Exception as e:
            self._report_batch_error(fresh, e)
            return 0
        if fresh or outputs:
            self.metrics.record_batch(len(fresh), len(outputs), time.perf_counter() - start)
        self._publish_availability()
        if self._source:
            # What a source makes is made under the live settings of now; downstream drops
            # anything older than the newest revision it knows.
            revision = self.live.get().revision
            for out in outputs:
                out.revision = revision
        for out in outputs:
            if out.kind == Kind.EVENT:
                self.publish_event(out)
            elif self.router is None:
                self._warn_sink_output(out)
            elif not self.router.send(out):
                break  # stopping
        return len(outputs)

    def _publish_availability(self) -> None:
        if self.availability is not None:
            self.availability.set_local(self.stage_name, self.stage.unavailable())

    def _warn_sink_output(self, msg: Message) -> None:
        if not self._sink_warned:
            self._sink_warned = True
            log.warning("stage %s is a sink (emits nothing) but returned a message (session %s, frame %d); "
                        "dropping such messages", self.name, msg.session, msg.frame_id)

    def _report_batch_error(self, batch: list[Message], error: Exception) -> None:
        self.metrics.count("errors")
        # The first few failures get a traceback; after that one line each, so a
        # persistent fault cannot flood the log at frame rate.
        if self._error_logs < 3:
            log.exception("stage %s dropped a batch of %d", self.name, len(batch))
        else:
            log.error("stage %s dropped a batch of %d: %r", self.name, len(batch), error)
        self._error_logs += 1
        for session in {m.session for m in batch}:
            self.publish_event(Message(kind=Kind.EVENT, session=session, meta={
                "code": "stage_error", "message": f"{self.name} could not process a frame: {error}"}))
