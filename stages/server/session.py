"""One browser session: its id, counters and outbound queue, and the task that drains it.

Everything here runs on the server's event loop, so it needs no locks: results from the
runtime's threads reach it through ``loop.call_soon_threadsafe``.

The outbound queue is ordered (what the runtime delivered first is sent first) and
bounded by kind, because a browser that reads slowly must never make rank 0 hold an
unbounded backlog, nor fall ever further behind live:

- output frames (a ``vision`` text and its kind-3 binary, always sent together): at most
  ``session_out_queue`` wait; a new one pushes out the oldest waiting one;
- ``stats``, ``config.current`` and ``status``: only the newest matters, so a new one
  replaces any waiting one (a ``status`` lists every rank lost so far);
- ``error``: at most ``session_error_queue`` wait; the oldest go first.

Bounded queues cap what rank 0 holds for a page that stops reading, but not how long it
holds it: the sender then waits on a full socket forever (and so would the library's
keepalive pings, queued behind it). ``stalled_s`` says how long the current send has
waited, so the server can close such a session after ``slow_reader_close_s``.

``finish`` closes a session with a code and reason of the server's choosing (1012 when
the job restarts) after what matters is sent: waiting frames and stats are dropped, but a
``status`` or ``error`` still waiting goes out first, so the page learns why.

A session also holds its inbound message rate limit and, for a lip-sync pipeline, its
avatar selection and audio rate limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from stages.server.audio_rate import AudioRateLimit
from stages.server.limits import MessageRateLimit
from stages.server.metrics import ServerMetrics
from stages.server.protocol import AUDIO_SAMPLE_RATE

log = logging.getLogger(__name__)


class Out(Enum):
    FRAME = "frame"
    STATS = "stats"
    CONFIG = "config"
    ERROR = "error"
    STATUS = "status"


@dataclass(slots=True)
class _Entry:
    kind: Out
    parts: tuple[str | bytes, ...]
    """Sent back to back; a frame's ``vision`` text and binary are one entry so a drop
    takes both and the page never sees one without the other."""


@dataclass(kw_only=True, slots=True)
class SessionCounters:
    frames_in: int = 0
    audio_chunks_in: int = 0
    audio_samples_in: int = 0
    frames_out: int = 0
    frames_dropped: int = 0
    errors_sent: int = 0
    errors_dropped: int = 0
    messages_dropped: int = 0
    """Inbound messages dropped unread for going over the session's message rate."""

    def as_dict(self, *, audio: bool = False) -> dict[str, int]:
        """The counters; a camera session's (``audio`` False) without the audio ones, an
        audio session's without camera ``frames_in``."""
        skip = {"frames_in"} if audio else {"audio_chunks_in", "audio_samples_in"}
        return {name: getattr(self, name) for name in self.__slots__ if name not in skip}


@dataclass(kw_only=True, slots=True)
class Session:
    id: str
    connection: ServerConnection
    metrics: ServerMetrics
    max_frames: int
    """Output frames allowed to wait (``ServerConfig.session_out_queue``)."""
    max_errors: int
    """Error messages allowed to wait (``ServerConfig.session_error_queue``)."""
    message_limit: MessageRateLimit | None = None
    """How fast this session may send messages of any kind; None: unlimited."""
    audio_limit: AudioRateLimit | None = None
    """Set for a session of a pipeline that takes audio: how fast it may send."""
    avatar: str | None = None
    """The avatar this session selected (``avatar.select``); None until it does."""
    opened_at: float = field(default_factory=time.monotonic)
    counters: SessionCounters = field(default_factory=SessionCounters)
    _pending: deque[_Entry] = field(default_factory=deque)
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    _closed: bool = False
    _send_started: float | None = None
    """When the send in progress began; None between sends."""
    closing_reason: str | None = None
    """Set when the server decided to close this session itself (e.g. a slow reader)."""
    _final: bool = False
    """``finish`` is under way: frames and stats are no longer taken."""

    # --- queueing (event loop only) ---

    def push_frame(self, vision_text: str, frame: bytes) -> None:
        if self._closed or self._final:
            return
        if self._count(Out.FRAME) >= self.max_frames:
            self._drop_oldest(Out.FRAME)
            self.counters.frames_dropped += 1
            self.metrics.frames_dropped.inc()
        self._push(_Entry(Out.FRAME, (vision_text, frame)))

    def push_stats(self, text: str) -> None:
        if not self._final:
            self._replace(Out.STATS, text)

    def push_config(self, text: str) -> None:
        self._replace(Out.CONFIG, text)

    def push_status(self, text: str) -> None:
        self._replace(Out.STATUS, text)

    def push_error(self, code: str, text: str) -> None:
        if self._closed:
            return
        if self._count(Out.ERROR) >= self.max_errors:
            self._drop_oldest(Out.ERROR)
            self.counters.errors_dropped += 1
        self.metrics.errors.labels(code=code).inc()
        self._push(_Entry(Out.ERROR, (text,)))

    def summary(self) -> dict[str, Any]:
        """This session as the ``stats`` message shows it to its page."""
        audio = self.audio_limit is not None
        summary: dict[str, Any] = {"id": self.id, "uptime_s": round(time.monotonic() - self.opened_at, 3),
                                   "queued_frames": self._count(Out.FRAME), "queued_bytes": self.queued_bytes(),
                                   "send_stalled_s": round(self.stalled_s(), 3),
                                   **self.counters.as_dict(audio=audio)}
        if audio:
            samples = summary.pop("audio_samples_in")
            summary["audio_in_s"] = round(samples / AUDIO_SAMPLE_RATE, 3)
            summary["audio_ahead_s"] = round(self.audio_limit.ahead_s(), 3)
            if self.avatar is not None:
                summary["avatar"] = self.avatar
        return summary

    def queued_bytes(self) -> int:
        """Bytes waiting in this session's queue (not yet handed to the socket)."""
        return sum(len(part) for entry in self._pending for part in entry.parts)

    def stalled_s(self, now: float | None = None) -> float:
        """Seconds the send in progress has waited for the socket; 0 when none is waiting."""
        started = self._send_started
        return 0.0 if started is None else (time.monotonic() if now is None else now) - started

    def close(self) -> None:
        """Stop queueing; wakes the sender so it can finish."""
        self._closed = True
        self._pending.clear()
        self._wakeup.set()

    async def finish(self, code: int, reason: str, flush_s: float) -> None:
        """Close the connection with ``code`` and ``reason`` once the waiting ``status``,
        ``error`` and ``config.current`` messages went out (``flush_s`` at most); frames and
        stats still waiting are dropped, and no more are taken."""
        self._final = True
        self._pending = deque(e for e in self._pending if e.kind not in (Out.FRAME, Out.STATS))
        deadline = time.monotonic() + flush_s
        while (self._pending or self._send_started is not None) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.closing_reason = reason
        await self.connection.close(code, reason)

    # --- sending ---

    async def run_sender(self) -> None:
        """Drain the queue into the socket until the session closes. ``send`` waits while
        the socket's write buffer is full, which is what lets the queue bounds act."""
        try:
            while True:
                while not self._pending:
                    if self._closed:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                entry = self._pending.popleft()
                for part in entry.parts:
                    self._send_started = time.monotonic()
                    await self.connection.send(part)
                    self._send_started = None
                if entry.kind is Out.FRAME:
                    self.counters.frames_out += 1
                    self.metrics.frames_out.inc()
                    self.metrics.bytes_out.inc(len(entry.parts[1]))
                elif entry.kind is Out.ERROR:
                    self.counters.errors_sent += 1
        except ConnectionClosed:
            pass  # the receive side sees the close too and ends the session

    # --- internals ---

    def _push(self, entry: _Entry) -> None:
        self._pending.append(entry)
        self._wakeup.set()

    def _replace(self, kind: Out, text: str) -> None:
        if self._closed:
            return
        self._drop_oldest(kind)  # at most one of these kinds ever waits
        self._push(_Entry(kind, (text,)))

    def _count(self, kind: Out) -> int:
        # The queue holds a handful of entries, so a scan is cheaper than bookkeeping.
        return sum(1 for e in self._pending if e.kind is kind)

    def _drop_oldest(self, kind: Out) -> None:
        for i, entry in enumerate(self._pending):
            if entry.kind is kind:
                del self._pending[i]
                return
