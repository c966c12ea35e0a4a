"""Where a stage replica's outputs go: one of the next stage's replicas, or its fallback's.

A ``Router`` picks a downstream replica per output by the stage's routing policy, waits
for a credit (backpressure), and degrades instead of rejecting:

* to the next stage's **fallback** (``Fallback``) when the next stage cannot serve or
  is saturated;
* around a **lost replica**: an outlet whose link broke (``PeerFailure``) or whose
  receiver closed it while the job runs (``ChannelClosed``) is marked lost here and the
  message goes to another replica at once; a replica the control hub declared lost
  (its rank stalled: its links do not break) is skipped from then on (``gone``).

A message with nowhere left to go is dropped, counted by reason in ``dropped`` and
logged, never silently.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Protocol

from comms.errors import ChannelClosed, ChannelTimeout, PeerFailure
from comms.message import Message
from runtime.availability import StageAvailability
from runtime.metrics import StageMetrics
from runtime.pipeline_config import ROUTINGS

log = logging.getLogger(__name__)

POLL_S = 0.1
"""How often a send waiting for credit looks at the stop flag and at lost replicas."""


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


class _Gone(Exception):
    """No usable outlet is left in the set a send was trying."""


class Router:
    """Spreads one stage replica's outputs over the next stage's replicas.

    ``round_robin`` takes turns, skipping replicas with no free credit; ``least_loaded``
    picks the replica with the most free credits; ``session`` keeps each browser
    session on one replica (for stages with per-session temporal state); ``affinity``
    asks ``placer`` which replica holds the output's ``meta["affinity"]`` key (an avatar's
    model, say), so a key's messages meet the replica that has its model loaded (messages
    without a key, and diverted ones, fall back to ``session``). Every policy chooses
    among usable outlets only; a session whose replica is lost moves to another one, and
    the other sessions stay where they were.

    With a ``Fallback``, an output goes to the fallback stage instead (same policy over
    its replicas) when the next stage says it cannot serve, or when none of its
    replicas had a credit free within ``wait_s``: the frame is served late-but-cheap
    instead of queueing behind a saturated stage or being dropped by one that cannot
    serve. Only the first frame of a saturation waits: until a credit of the next stage
    is free again, the frames after it divert at once, so the stream keeps the
    fallback's pace instead of one frame per ``wait_s``. Diversions are counted in
    ``metrics`` by reason. With every fallback replica lost, the next stage takes its
    frames however long they wait.

    ``gone(outlet_name)`` says whether the control hub declared the replica an outlet
    leads to lost; without it only broken links mark outlets lost.
    """

    def __init__(self, outlets: list[Outlet], policy: str, stop: threading.Event, fallback: Fallback | None = None,
                 metrics: StageMetrics | None = None, placer: Placer | None = None,
                 gone: Callable[[str], bool] | None = None, name: str = "router") -> None:
        if not outlets:
            raise ValueError("a router needs at least one downstream outlet")
        if policy not in ROUTINGS:
            raise ValueError(f"routing policy {policy!r}; allowed: {', '.join(ROUTINGS)}")
        if fallback is not None and not fallback.outlets:
            raise ValueError("a fallback needs at least one outlet")
        if policy == "affinity" and placer is None:
            raise ValueError("routing policy 'affinity' needs a placer (the next stage's directory)")
        self.name = name
        """The replica routing, for the log ('vision#0')."""
        self.placer = placer
        self.outlets = outlets
        self.policy = policy
        self.fallback = fallback
        self.metrics = metrics
        self._gone = gone or (lambda outlet_name: False)
        self._stop = stop
        self._saturated = False
        """The last output was diverted because the next stage had no credit."""
        self._broken: dict[str, str] = {}
        """Outlets whose link broke or was closed under us: name -> why."""
        self.dropped: Counter[str] = Counter()
        """Messages that had nowhere to go, by reason."""
        self._turns = {id(outlets): itertools.cycle(range(len(outlets)))}
        if fallback is not None:
            self._turns[id(fallback.outlets)] = itertools.cycle(range(len(fallback.outlets)))

    def send(self, msg: Message) -> bool:
        """Send to one replica (of the next stage, or of its fallback), waiting for credit;
        False only if stopping before it went (a message with nowhere to go is dropped,
        counted and logged, and True is returned: the caller goes on)."""
        try:
            return self._route(msg)
        except _Gone as e:
            self._drop(msg, str(e))
            return not self._stop.is_set()

    def usable(self, outlets: list[Outlet]) -> list[Outlet]:
        """``outlets`` without the lost ones."""
        return [o for o in outlets if o.name not in self._broken and not self._gone(o.name)]

    def _route(self, msg: Message) -> bool:
        fallback = self.fallback
        if fallback is None:
            return self._send_to(self.outlets, msg, deadline=None)
        if not self.usable(fallback.outlets):
            return self._send_to(self.outlets, msg, deadline=None)  # nowhere to divert: the stage takes it
        if fallback.availability.reason(fallback.stage) is not None or not self.usable(self.outlets):
            return self._divert(msg, "unavailable")
        wait = 0.0 if self._saturated else fallback.wait_s  # still saturated: do not wait again
        try:
            if self._send_to(self.outlets, msg, deadline=time.monotonic() + wait):
                self._saturated = False
                return True
        except _Gone:
            return self._divert(msg, "unavailable")  # its last replica was lost meanwhile
        self._saturated = True
        return not self._stop.is_set() and self._divert(msg, "saturated")

    def _divert(self, msg: Message, why: str) -> bool:
        try:
            sent = self._send_to(self.fallback.outlets, msg, deadline=None)
        except _Gone:
            # Its last fallback replica was lost just now: the stage takes the frame after all.
            return self._send_to(self.outlets, msg, deadline=None)
        if sent and self.metrics is not None:
            self.metrics.count(f"diverted_{why}")
        return sent

    def _send_to(self, outlets: list[Outlet], msg: Message, deadline: float | None) -> bool:
        """Send to one usable outlet of ``outlets``, waiting for credit until ``deadline``
        (None: until it goes or the job stops); False if it did not go in time or the job
        stops. Raises ``_Gone`` once none of ``outlets`` is usable."""
        while not self._stop.is_set():
            usable = self.usable(outlets)
            if not usable:
                raise _Gone(self._why_gone(outlets))
            outlet = self._choose(outlets, usable, msg)
            wait = POLL_S if deadline is None else min(POLL_S, max(0.0, deadline - time.monotonic()))
            try:
                outlet.send(msg, timeout=wait)
                return True
            except ChannelTimeout:
                # No credit yet: look at the stop flag and the deadline, maybe pick another replica.
                if deadline is not None and time.monotonic() >= deadline:
                    return False
            except (PeerFailure, ChannelClosed) as e:
                if self._stop.is_set():
                    return False  # links close as the job stops: nothing to re-route
                self._lose(outlet, e)  # and try the message on another replica
        return False

    def _choose(self, outlets: list[Outlet], usable: list[Outlet], msg: Message) -> Outlet:
        if len(usable) == 1:
            return usable[0]
        key = msg.meta.get("affinity") if self.policy == "affinity" and outlets is self.outlets else None
        if key is not None:
            credits = [outlet.credits() if outlet in usable else 0 for outlet in outlets]
            chosen = outlets[self.placer(str(key), credits)]
            return chosen if chosen in usable else _by_session(usable, msg)
        if self.policy in ("session", "affinity"):
            # Hash over every outlet, so one replica's loss moves only its own sessions.
            chosen = _by_session(outlets, msg)
            return chosen if chosen in usable else _by_session(usable, msg)
        if self.policy == "least_loaded":
            return max(usable, key=lambda outlet: outlet.credits())
        turn = self._turns[id(outlets)]
        for _ in range(len(outlets)):
            outlet = outlets[next(turn)]
            if outlet in usable and outlet.credits() > 0:
                return outlet
        return usable[next(turn) % len(usable)]

    def _lose(self, outlet: Outlet, error: Exception) -> None:
        self._broken[outlet.name] = str(error)
        log.warning("%s: link %s is lost (%s); routing around it", self.name, outlet.name, error)

    def _why_gone(self, outlets: list[Outlet]) -> str:
        reasons = [self._broken.get(o.name, f"{o.name}: its replica was lost") for o in outlets]
        return "no live replica to send to (" + "; ".join(reasons) + ")"

    def _drop(self, msg: Message, reason: str) -> None:
        self.dropped[reason] += 1
        n = self.dropped[reason]
        if n in (1, 10, 100) or n % 1000 == 0:  # visible, without one line per frame
            log.warning("%s dropped frame %d of session %s: %s (%d so far)", self.name, msg.frame_id,
                        msg.session or "-", reason, n)


def _by_session(outlets: list[Outlet], msg: Message) -> Outlet:
    return outlets[zlib.crc32(msg.session.encode()) % len(outlets)]
