"""The control plane: live config, liveness and stop, between the server rank and the others.

The server rank runs a ``ControlHub``; every other rank a ``ControlClient``. They talk
over two small links per rank (CPU; the planner lists them beside the data links):

    control:s->r  Kind.CONTROL  {"op": "config", "revision", "settings"} | {"op": "stop", "reason", "failed"}
                                {"op": "stop", "reason", "failed": true, "dismissed": true}  (to a rank given up on)
                                {"op": "availability", "unavailable": {stage: reason}, "lost": [replica, ...]}
                                {"op": "command", "stage", "replica", "command": {...}}  (runtime.affinity)
    status:r->s   Kind.STATUS   {"op": "heartbeat", "snapshot": {...metrics, stage reports...}}
                                {"op": "leaving", "reason", "failed"}  (last, when the rank stops)
                  Kind.EVENT    a stage's notice for a browser session, forwarded to the server

A rank that sends no heartbeat for ``liveness_timeout_s`` is declared stalled, a broken
link is a dead rank, and a rank that leaves after a failure of its own has failed:
either way the hub names the rank and role and hands the loss to ``on_lost``
(``runtime.rank_loss``: go on degraded when the rank's work can be served elsewhere,
else fail the job, which then ends instead of hanging). A rank lost before every rank
was ready always fails the job. A stalled rank is told to stop (``dismissed``) in case
it wakes up. Losing the server rank is always fatal for a worker. Every control thread
is guarded: a bug in one ends the job visibly instead of leaving a rank deaf to stop or
looking stalled.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from comms.channel import ChannelReader, ChannelWriter
from comms.errors import ChannelClosed, ChannelTimeout, PeerFailure, TransportError
from comms.message import Kind, Message
from core.config import check, check_choice, check_range
from core.settings import RuntimeSettings
from runtime.affinity import COMMAND_OP
from runtime.availability import AVAILABILITY_OP
from runtime.lifecycle import Lifecycle
from runtime.live_config import settings_from_dict, settings_to_dict
from runtime.live_view import LiveView
from runtime.rank_loss import LOSS_POLICIES

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class ControlConfig:
    heartbeat_s: float = 0.5
    """How often each rank reports liveness and metrics to the server rank."""
    liveness_timeout_s: float = 5.0
    """A rank silent this long is declared stalled: lost, as if it died (``on_rank_loss``)."""
    shutdown_timeout_s: float = 10.0
    """Longest an orderly shutdown may take before the process exits regardless."""
    on_rank_loss: str = "degrade"
    """A worker rank died, stalled or failed: ``degrade`` goes on without it when every stage
    replica it hosted can be served elsewhere (another replica, the stage's fallback) and
    fails the job otherwise; ``fail`` always fails the job (``runtime.rank_loss``). A failed
    job exits 1, which ``torchrun --max-restarts N`` answers with a restart."""

    def __post_init__(self) -> None:
        check_range(self.heartbeat_s, "heartbeat_s", 0.05, 10)
        check(self.liveness_timeout_s >= 4 * self.heartbeat_s, "liveness_timeout_s",
              f"must be at least 4 x heartbeat_s ({4 * self.heartbeat_s}), got {self.liveness_timeout_s}")
        check_range(self.shutdown_timeout_s, "shutdown_timeout_s", 1, 600)
        check_choice(self.on_rank_loss, "on_rank_loss", LOSS_POLICIES)


def config_message(revision: int, settings: RuntimeSettings) -> Message:
    return Message(kind=Kind.CONTROL, revision=revision,
                   meta={"op": "config", "revision": revision, "settings": settings_to_dict(settings)})


def stop_message(reason: str, failed: bool) -> Message:
    return Message(kind=Kind.CONTROL, meta={"op": "stop", "reason": reason, "failed": failed})


def dismiss_message(reason: str) -> Message:
    """To a rank the job went on without: should it wake up, it must stop, not rejoin."""
    return Message(kind=Kind.CONTROL, meta={"op": "stop", "reason": reason, "failed": True, "dismissed": True})


def guarded(loop: Callable[[], None], name: str, lifecycle: Lifecycle) -> threading.Thread:
    """A daemon thread running ``loop``; an exception in it fails the job with its traceback
    in the log, rather than silently leaving this rank without part of its control plane."""
    def run() -> None:
        try:
            loop()
        except Exception as e:
            log.exception("control plane thread %s failed", name)
            lifecycle.fail(f"control plane thread {name} failed: {e!r}")

    return threading.Thread(target=run, name=name, daemon=True)


class ControlHub:
    """The server rank's side: fan out config and stop, watch every rank's heartbeat."""

    def __init__(self, *, config: ControlConfig, ctl: dict[int, ChannelWriter], status: dict[int, ChannelReader],
                 roles: dict[int, str], lifecycle: Lifecycle, on_snapshot: Callable[[int, dict], None],
                 on_event: Callable[[Message], None],
                 on_lost: Callable[[int, str, str], None] | None = None) -> None:
        self.config = config
        self.ctl = ctl
        self.status = status
        self.roles = roles
        self.lifecycle = lifecycle
        self.stopping = lifecycle.stopping
        self.on_snapshot = on_snapshot
        self.on_event = on_event
        self.on_lost = on_lost or (lambda rank, cause, reason: lifecycle.fail(reason))
        """(rank, 'died' | 'stalled' | 'failed', reason): a ready rank was lost
        (``runtime.rank_loss.RankLoss``); without one, every loss fails the job."""
        self.started = time.monotonic()
        self.last_seen: dict[int, float | None] = {r: None for r in status}
        """None until a rank's first heartbeat, which it sends once its stages are set up."""
        self.alive: dict[int, bool] = {r: True for r in status}
        self.all_reported = threading.Event()
        self._lock = threading.Lock()
        self._threads = [guarded(lambda r=r: self._listen(r), f"status-{r}", lifecycle) for r in status]
        self._threads.append(guarded(self._watch, "liveness", lifecycle))
        self._outbox: queue.Queue[Message | threading.Event] = queue.Queue()
        self._threads.append(guarded(self._send_loop, "control-out", lifecycle))
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
                    self._lose(rank, "stalled" if isinstance(e, ChannelTimeout) else "died",
                               f"{self.describe(rank)} did not accept a control message: {e}")

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
                    self._lose(rank, "died", f"{self.describe(rank)} closed its control link unexpectedly")
                with self._lock:
                    self.alive[rank] = False
                return
            except PeerFailure as e:
                self._lose(rank, "died", f"{self.describe(rank)} died: {e}")
                return
            if msg.kind == Kind.STATUS and msg.meta.get("op") == "leaving":
                self._left(rank, str(msg.meta.get("reason")), bool(msg.meta.get("failed")))
                return
            with self._lock:
                if not self.alive[rank]:
                    continue  # given up on (it stalled): what it says now no longer counts
                self.last_seen[rank] = time.monotonic()
                if all(seen is not None for seen in self.last_seen.values()):
                    self.all_reported.set()
            if msg.kind == Kind.STATUS:
                self.on_snapshot(rank, msg.meta.get("snapshot", {}))
            elif msg.kind == Kind.EVENT:
                self.on_event(msg)

    def _watch(self) -> None:
        while not self.stopping.wait(self.config.heartbeat_s):
            unreported = set(self.unreported())  # still setting up: the startup deadline applies
            for rank, (alive, silent) in self.liveness().items():
                if alive and rank not in unreported and silent > self.config.liveness_timeout_s:
                    self._lose(rank, "stalled", f"{self.describe(rank)} stalled: no heartbeat for {silent:.1f} s")

    def _left(self, rank: int, reason: str, failed: bool) -> None:
        if failed:
            self._lose(rank, "failed", f"{self.describe(rank)} failed: {reason}")
            return
        with self._lock:
            was_alive = self.alive.get(rank, False)
            self.alive[rank] = False
        if was_alive and not self.stopping.is_set():
            self.lifecycle.request_stop(f"{self.describe(rank)} stopped: {reason}")

    def _lose(self, rank: int, cause: str, reason: str) -> None:
        """``rank`` is gone for ``cause`` ('died', 'stalled', 'failed'): once, and only while
        the job runs. Before it was ready, the job fails; after, ``on_lost`` decides."""
        with self._lock:
            was_alive = self.alive.get(rank, False)
            self.alive[rank] = False
            was_ready = self.last_seen.get(rank) is not None
        if not was_alive or self.stopping.is_set():
            return
        if cause == "stalled":
            self._dismiss(rank, reason)
        if was_ready:
            self.on_lost(rank, cause, reason)
        else:
            self.lifecycle.fail(reason)

    def _dismiss(self, rank: int, reason: str) -> None:
        """Tell a stalled rank to stop, should it ever read it; on a thread of its own, as the
        send may wait for a credit the stalled rank never returns."""
        channel = self.ctl.get(rank)
        if channel is None:
            return

        def send() -> None:
            try:
                channel.send(dismiss_message(reason), timeout=self.config.shutdown_timeout_s)
            except TransportError as e:
                log.debug("%s was not told to stop: %s", self.describe(rank), e)

        threading.Thread(target=send, name=f"dismiss-{rank}", daemon=True).start()


class ControlClient:
    """A worker rank's side: apply config, obey stop, send heartbeats and events, and say
    why it leaves. A server rank that stops taking status messages counts as stalled.

    ``start`` listens for control messages at once (a stop may come while this rank is
    still setting up); ``report_ready`` starts the heartbeats, the first of which tells
    the hub this rank is ready."""

    def __init__(self, *, config: ControlConfig, ctl: ChannelReader, status: ChannelWriter, live: LiveView,
                 snapshot: Callable[[], dict], lifecycle: Lifecycle, server: str,
                 on_availability: Callable[[dict[str, str], list[str]], None] = lambda unavailable, lost: None,
                 on_command: Callable[[dict[str, Any]], object] = lambda meta: None) -> None:
        self.config = config
        self.on_availability = on_availability
        """Applies the hub's map of stages that cannot serve and its lost stage replicas
        (``runtime.availability``)."""
        self.on_command = on_command
        """Hands a command for a stage replica to it, if this rank hosts it (``runtime.affinity``)."""
        self.server = server
        """The server rank as messages name it, e.g. 'rank 0 (server+ingest+display)'."""
        self.ctl = ctl
        self.status = status
        self.live = live
        self.snapshot = snapshot
        self.lifecycle = lifecycle
        self.stopping = lifecycle.stopping
        self._send_lock = threading.Lock()
        self._last_delivered = time.monotonic()
        self._listener = guarded(self._listen, "control", lifecycle)
        self._heartbeat = guarded(self._beat, "heartbeat", lifecycle)

    def start(self) -> None:
        self._listener.start()

    def report_ready(self) -> None:
        self._last_delivered = time.monotonic()
        self._heartbeat.start()

    def publish_event(self, msg: Message) -> None:
        self._send(msg)

    def leave(self, reason: str, failed: bool) -> None:
        """The last status message: why this rank stops, so the hub can tell a clean stop
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
                    self.lifecycle.fail(f"{self.server} stalled: it took no status message for {silent:.1f} s")
                else:
                    log.warning("%s is not taking status messages (%.1f s); dropped one", self.server, silent)
            except TransportError as e:
                if not self.stopping.is_set():
                    self.lifecycle.fail(f"lost the link to {self.server}: {e}")

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
                    self.lifecycle.fail(f"lost the control link from {self.server}: {e}")
                return
            op = msg.meta.get("op")
            if op == "config":
                settings = settings_from_dict(msg.meta["settings"])
                if self.live.set(int(msg.meta["revision"]), settings):
                    log.info("live config revision %d applied", msg.meta["revision"])
            elif op == "stop" and msg.meta.get("dismissed"):
                self.lifecycle.fail(f"{self.server} went on without this rank: {msg.meta.get('reason')}")
            elif op == "stop" and msg.meta.get("failed"):
                # The job failed elsewhere: this rank must end non-zero too, so that a
                # scheduler sees one failed job rather than one failed rank. The reason
                # is in the log of the rank that found it; repeating it here would print
                # it once per rank.
                self.lifecycle.fail(f"stopped by {self.server} after a failure (its log says why)")
            elif op == "stop":
                self.lifecycle.request_stop(str(msg.meta.get("reason", f"stop requested by {self.server}")))
            elif op == AVAILABILITY_OP:
                self.on_availability(dict(msg.meta.get("unavailable") or {}), list(msg.meta.get("lost") or []))
            elif op == COMMAND_OP:
                self.on_command(dict(msg.meta))
            else:
                log.warning("ignoring unknown control op %r", op)
