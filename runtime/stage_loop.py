"""The loop that runs one stage replica: receive, micro-batch, process, route.

    inputs (``Inlet``s: links from upstream replicas, or the front door's session queue)
        -> gather up to ``max_batch`` messages (waiting ``batch_wait_ms`` at most)
        -> drop stale frames (captured before the latest live-config change)
        -> ``stage.process(batch)``
        -> ``Router`` picks a downstream replica per output (``Outlet``s; credits = backpressure)

A source stage (it accepts nothing) has no inputs: ``process([])`` is called again and
again and paces itself. A sink (it emits nothing) has no router.

A failing batch is logged, counted and reported to its sessions; it does not stop the
stage. A broken link (``PeerFailure``) does: the rank reports it and shuts down.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Protocol

from comms.errors import ChannelClosed, ChannelTimeout, PeerFailure
from comms.message import Kind, Message
from runtime.availability import StageAvailability
from runtime.lifecycle import Lifecycle
from runtime.live_view import LiveView
from runtime.metrics import StageMetrics
from runtime.pipeline_config import ROUTINGS
from stages.base import Stage

log = logging.getLogger(__name__)

POLL_S = 0.1
"""How often a blocked loop looks at the stop flag; bounds shutdown latency."""
SOURCE_IDLE_S = 0.01
"""A source that produced nothing is called again after this, not at once: a source that
returns early must not spin a core."""


class Inlet(Protocol):
    """What a runner reads from: a link's receiving end, or the front door's session queue.
    ``recv`` raises ``ChannelTimeout`` when nothing came in time and ``ChannelClosed``
    once nothing more will come."""

    name: str

    def recv(self, timeout: float | None = None) -> Message: ...


class Outlet(Protocol):
    """What a runner writes to: a link's sending end, or the front door's output sink.
    ``send`` waits up to ``timeout`` for a credit (``ChannelTimeout``)."""

    name: str

    def send(self, msg: Message, timeout: float | None = None) -> None: ...

    def credits(self) -> int: ...


Placer = Callable[[str, list[int]], int]
"""For ``affinity`` routing: (key, free credits per replica) -> the replica to send to."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Fallback:
    """Where a router sends what the next stage cannot take (``StageSpec.fallback``)."""

    outlets: list[Outlet]
    """Links to the fallback stage's replicas."""
    stage: str
    """The next stage, whose availability decides."""
    wait_s: float
    """How long an output waits for a credit of the next stage before it is diverted."""
    availability: StageAvailability


class Router:
    """Spreads one stage replica's outputs over the next stage's replicas.

    ``round_robin`` takes turns, skipping replicas with no free credit; ``least_loaded``
    picks the replica with the most free credits; ``session`` keeps each browser
    session on one replica (for stages with per-session temporal state); ``affinity``
    asks ``placer`` which replica holds the output's ``meta["affinity"]`` key (an avatar's
    model, say), so a key's messages meet the replica that has its model loaded (messages
    without a key, and diverted ones, fall back to ``session``).

    With a ``Fallback``, an output goes to the fallback stage instead (same policy over
    its replicas) when the next stage says it cannot serve, or when none of its
    replicas had a credit free within ``wait_s``: the frame is served late-but-cheap
    instead of queueing behind a saturated stage or being dropped by one that cannot
    serve. Only the first frame of a saturation waits: until a credit of the next stage
    is free again, the frames after it divert at once, so the stream keeps the
    fallback's pace instead of one frame per ``wait_s``. Diversions are counted in
    ``metrics`` by reason.
    """

    def __init__(self, outlets: list[Outlet], policy: str, stop: threading.Event, fallback: Fallback | None = None,
                 metrics: StageMetrics | None = None, placer: Placer | None = None) -> None:
        if not outlets:
            raise ValueError("a router needs at least one downstream outlet")
        if policy not in ROUTINGS:
            raise ValueError(f"routing policy {policy!r}; allowed: {', '.join(ROUTINGS)}")
        if fallback is not None and not fallback.outlets:
            raise ValueError("a fallback needs at least one outlet")
        if policy == "affinity" and placer is None:
            raise ValueError("routing policy 'affinity' needs a placer (the next stage's directory)")
        self.placer = placer
        self.outlets = outlets
        self.policy = policy
        self.fallback = fallback
        self.metrics = metrics
        self._stop = stop
        self._saturated = False
        """The last output was diverted because the next stage had no credit."""
        self._turns = {id(outlets): itertools.cycle(range(len(outlets)))}
        if fallback is not None:
            self._turns[id(fallback.outlets)] = itertools.cycle(range(len(fallback.outlets)))

    def send(self, msg: Message) -> bool:
        """Send to one replica (of the next stage, or of its fallback), waiting for credit;
        False if stopping before it went."""
        if self.fallback is None:
            return self._send_to(self.outlets, msg, deadline=None)
        if self.fallback.availability.reason(self.fallback.stage) is not None:
            return self._divert(msg, "unavailable")
        wait = 0.0 if self._saturated else self.fallback.wait_s  # still saturated: do not wait again
        if self._send_to(self.outlets, msg, deadline=time.monotonic() + wait):
            self._saturated = False
            return True
        self._saturated = True
        return not self._stop.is_set() and self._divert(msg, "saturated")

    def _divert(self, msg: Message, why: str) -> bool:
        if self.metrics is not None:
            self.metrics.count(f"diverted_{why}")
        return self._send_to(self.fallback.outlets, msg, deadline=None)

    def _send_to(self, outlets: list[Outlet], msg: Message, deadline: float | None) -> bool:
        """Send to one of ``outlets``, waiting for credit until ``deadline`` (None: until
        it goes or the job stops); False if it did not go."""
        while not self._stop.is_set():
            outlet = self._choose(outlets, msg)
            wait = POLL_S if deadline is None else min(POLL_S, max(0.0, deadline - time.monotonic()))
            try:
                outlet.send(msg, timeout=wait)
                return True
            except ChannelTimeout:
                # No credit yet: look at the stop flag and the deadline, maybe pick another replica.
                if deadline is not None and time.monotonic() >= deadline:
                    return False
        return False

    def _choose(self, outlets: list[Outlet], msg: Message) -> Outlet:
        if len(outlets) == 1:
            return outlets[0]
        key = msg.meta.get("affinity") if self.policy == "affinity" and outlets is self.outlets else None
        if key is not None:
            return outlets[self.placer(str(key), [outlet.credits() for outlet in outlets])]
        if self.policy in ("session", "affinity"):
            return outlets[zlib.crc32(msg.session.encode()) % len(outlets)]
        if self.policy == "least_loaded":
            return max(outlets, key=lambda outlet: outlet.credits())
        turn = self._turns[id(outlets)]
        for _ in range(len(outlets)):
            outlet = outlets[next(turn)]
            if outlet.credits() > 0:
                return outlet
        return outlets[next(turn)]


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
        except PeerFailure as e:
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
            self.inputs.remove(inlet)
            self._next_input = 0
            return None
        return msg

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
