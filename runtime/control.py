"""The control plane: live config, liveness and stop, between rank 0 and the others.

Rank 0 runs a ``ControlHub``; every other rank a ``ControlClient``. They talk over two
small links per rank (gloo, CPU), apart from the data links:

    ctl:0->r     Kind.CONTROL  {"op": "config", "revision", "settings"} | {"op": "stop", "reason", "failed"}
    status:r->0  Kind.STATUS   {"op": "heartbeat", "snapshot": {...metrics...}}
                               {"op": "leaving", "reason", "failed"}  (last, when the rank stops)
                 Kind.EVENT    a stage's notice for a browser session, forwarded to rank 0

A rank that sends no heartbeat for ``liveness_timeout_s`` is declared stalled, and a
broken link is a dead rank: either way rank 0 reports which rank and role, tells the
others to stop, and the job ends with a failure instead of hanging.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from comms.channel import Channel
from comms.errors import ChannelClosed, ChannelTimeout, PeerFailure, TransportError
from comms.message import Kind, Message
from runtime.config_loader import check, check_range
from runtime.live_config import RuntimeSettings, settings_from_dict, settings_to_dict
from runtime.live_view import LiveView

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class ControlConfig:
    heartbeat_s: float = 0.5
    """How often each rank reports liveness and metrics to rank 0."""
    liveness_timeout_s: float = 5.0
    """A rank silent this long is declared stalled and the job stops."""
    shutdown_timeout_s: float = 10.0
    """Longest an orderly shutdown may take before the process exits regardless."""

    def __post_init__(self) -> None:
        check_range(self.heartbeat_s, "heartbeat_s", 0.05, 10)
        check(self.liveness_timeout_s >= 4 * self.heartbeat_s, "liveness_timeout_s",
              f"must be at least 4 x heartbeat_s ({4 * self.heartbeat_s}), got {self.liveness_timeout_s}")
        check_range(self.shutdown_timeout_s, "shutdown_timeout_s", 1, 600)


def config_message(revision: int, settings: RuntimeSettings) -> Message:
    return Message(kind=Kind.CONTROL, revision=revision,
                   meta={"op": "config", "revision": revision, "settings": settings_to_dict(settings)})


class ControlHub:
    """Rank 0's side: fan out config and stop, watch every rank's heartbeat."""

    def __init__(self, *, config: ControlConfig, ctl: dict[int, Channel], status: dict[int, Channel],
                 roles: dict[int, str], on_snapshot: Callable[[int, dict], None],
                 on_event: Callable[[Message], None], on_stop: Callable[[str], None],
                 on_failure: Callable[[str], None], stopping: threading.Event) -> None:
        self.config = config
        self.on_stop = on_stop
        self.ctl = ctl
        self.status = status
        self.roles = roles
        self.on_snapshot = on_snapshot
        self.on_event = on_event
        self.on_failure = on_failure
        self.stopping = stopping
        self.started = time.monotonic()
        self.last_seen: dict[int, float | None] = {r: None for r in status}
        """None until a rank's first heartbeat, which it sends once its stages are set up."""
        self.alive: dict[int, bool] = {r: True for r in status}
        self.all_reported = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._listen, args=(r,), name=f"status-{r}", daemon=True)
                         for r in status]
        self._threads.append(threading.Thread(target=self._watch, name="liveness", daemon=True))
        self._outbox: queue.Queue[Message | threading.Event] = queue.Queue()
        self._threads.append(threading.Thread(target=self._send_loop, name="control-out", daemon=True))
        if not status:
            self.all_reported.set()

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def describe(self, rank: int) -> str:
        return f"rank {rank} ({self.roles.get(rank, '?')})"

    def liveness(self) -> dict[int, tuple[bool, float]]:
        """``rank -> (alive, seconds since its last heartbeat or since start)``."""
        now = time.monotonic()
        with self._lock:
            return {r: (self.alive[r], now - (seen if seen is not None else self.started))
                    for r, seen in self.last_seen.items()}

    def unreported(self) -> list[int]:
        with self._lock:
            return [r for r, seen in self.last_seen.items() if seen is None]

    def broadcast(self, msg: Message) -> None:
        """Queue one control message for every rank; they go out in order on the hub's
        sender thread. Never blocks: the web server's event loop calls this on a config
        change, and a stalled rank must not freeze every browser session."""
        self._outbox.put(msg)

    def flush(self, timeout: float) -> bool:
        """Wait until every queued control message went out (before closing the links)."""
        done = threading.Event()
        self._outbox.put(done)
        return done.wait(timeout)

    def _send_loop(self) -> None:
        while True:
            item = self._outbox.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            for rank, channel in self.ctl.items():
                if not self.alive.get(rank, False):
                    continue
                try:
                    channel.send(Message(kind=item.kind, revision=item.revision, meta=dict(item.meta)),
                                 timeout=self.config.liveness_timeout_s)
                except TransportError as e:
                    self._mark_dead(rank, f"{self.describe(rank)} did not accept a control message: {e}")

    def _listen(self, rank: int) -> None:
        channel = self.status[rank]
        while True:
            try:
                msg = channel.recv(timeout=0.5)
            except ChannelTimeout:
                if self.stopping.is_set() and not self.alive[rank]:
                    return
                continue
            except ChannelClosed:
                if not self.stopping.is_set():
                    self._mark_dead(rank, f"{self.describe(rank)} closed its control link unexpectedly")
                with self._lock:
                    self.alive[rank] = False
                return
            except PeerFailure as e:
                self._mark_dead(rank, f"{self.describe(rank)} died: {e}")
                return
            with self._lock:
                self.last_seen[rank] = time.monotonic()
                if all(seen is not None for seen in self.last_seen.values()):
                    self.all_reported.set()
            if msg.kind == Kind.STATUS and msg.meta.get("op") == "leaving":
                self._left(rank, str(msg.meta.get("reason")), bool(msg.meta.get("failed")))
                return
            if msg.kind == Kind.STATUS:
                self.on_snapshot(rank, msg.meta.get("snapshot", {}))
            elif msg.kind == Kind.EVENT:
                self.on_event(msg)

    def _watch(self) -> None:
        while not self.stopping.wait(self.config.heartbeat_s):
            unreported = set(self.unreported())  # still setting up: the startup deadline applies
            for rank, (alive, silent) in self.liveness().items():
                if alive and rank not in unreported and silent > self.config.liveness_timeout_s:
                    self._mark_dead(rank, f"{self.describe(rank)} stalled: no heartbeat for {silent:.1f} s")

    def _left(self, rank: int, reason: str, failed: bool) -> None:
        with self._lock:
            self.alive[rank] = False
        if self.stopping.is_set():
            return
        if failed:
            log.error("%s failed: %s", self.describe(rank), reason)
            self.on_failure(f"{self.describe(rank)} failed: {reason}")
        else:
            self.on_stop(f"{self.describe(rank)} stopped: {reason}")

    def _mark_dead(self, rank: int, reason: str) -> None:
        with self._lock:
            was_alive = self.alive.get(rank, False)
            self.alive[rank] = False
        if was_alive and not self.stopping.is_set():
            log.error("%s", reason)
            self.on_failure(reason)


class ControlClient:
    """A worker rank's side: apply config, obey stop, send heartbeats and events, and say
    why it leaves. Rank 0 that stops taking status messages counts as stalled."""

    def __init__(self, *, config: ControlConfig, ctl: Channel, status: Channel, live: LiveView,
                 snapshot: Callable[[], dict], on_stop: Callable[[str], None],
                 on_failure: Callable[[str], None], stopping: threading.Event) -> None:
        self.config = config
        self.ctl = ctl
        self.status = status
        self.live = live
        self.snapshot = snapshot
        self.on_stop = on_stop
        self.on_failure = on_failure
        self.stopping = stopping
        self._send_lock = threading.Lock()
        self._last_delivered = time.monotonic()
        self._threads = [threading.Thread(target=self._guarded, args=(self._listen,), name="control", daemon=True),
                         threading.Thread(target=self._guarded, args=(self._beat,), name="heartbeat", daemon=True)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def publish_event(self, msg: Message) -> None:
        self._send(msg)

    def leave(self, reason: str, failed: bool) -> None:
        """The last status message: why this rank stops, so rank 0 can tell a clean stop
        (SIGTERM to one rank) from a failure and name the real cause."""
        self._send(Message(kind=Kind.STATUS, meta={"op": "leaving", "reason": reason, "failed": failed}))

    def _send(self, msg: Message) -> None:
        # Heartbeats, events and the leaving notice share the status link: one sender at a time.
        with self._send_lock:
            try:
                self.status.send(msg, timeout=self.config.liveness_timeout_s / 2)
                self._last_delivered = time.monotonic()
            except ChannelTimeout:
                silent = time.monotonic() - self._last_delivered
                if self.stopping.is_set():
                    return
                if silent > self.config.liveness_timeout_s:
                    self.on_failure(f"rank 0 stalled: it took no status message for {silent:.1f} s")
                else:
                    log.warning("rank 0 is not taking status messages (%.1f s); dropped one", silent)
            except TransportError as e:
                if not self.stopping.is_set():
                    self.on_failure(f"lost the link to rank 0: {e}")

    def _guarded(self, loop: Callable[[], None]) -> None:
        # A bug in a control loop must end the job visibly, not leave a rank deaf to stop.
        try:
            loop()
        except Exception as e:
            log.exception("control plane thread failed")
            self.on_failure(f"control plane failed: {e!r}")

    def _beat(self) -> None:
        while not self.stopping.is_set():
            self._send(Message(kind=Kind.STATUS, meta={"op": "heartbeat", "snapshot": self.snapshot()}))
            self.stopping.wait(self.config.heartbeat_s)

    def _listen(self) -> None:
        while True:
            try:
                msg = self.ctl.recv(timeout=0.5)
            except ChannelTimeout:
                if self.stopping.is_set():
                    return
                continue
            except (ChannelClosed, PeerFailure) as e:
                if not self.stopping.is_set():
                    self.on_failure(f"lost the control link from rank 0: {e}")
                return
            op = msg.meta.get("op")
            if op == "config":
                settings = settings_from_dict(msg.meta["settings"])
                if self.live.set(int(msg.meta["revision"]), settings):
                    log.info("live config revision %d applied", msg.meta["revision"])
            elif op == "stop" and msg.meta.get("failed"):
                # The job failed elsewhere: this rank must end non-zero too, so that a
                # scheduler sees one failed job rather than one failed rank.
                self.on_failure(f"rank 0 stopped the job: {msg.meta.get('reason')}")
            elif op == "stop":
                self.on_stop(str(msg.meta.get("reason", "stop requested by rank 0")))
            else:
                log.warning("ignoring unknown control op %r", op)
