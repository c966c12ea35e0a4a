"""What one session may send, and how the server counts what it refuses.

Every message a page sends costs the server's event loop a parse and a hook call, whatever
its size. A page sends at most a few dozen a second (camera frames at 20-30 fps, 20 ms
audio chunks at 50 a second, a slider's config updates); a broken or hostile script can
send tens of thousands. ``MessageRateLimit`` holds each session to a token bucket over
*all* its inbound messages: ``rate`` a second, ``burst`` deep, full when the session opens.
A message over the limit is dropped unread (no hook sees it) and counted; the page is
told with one ``rate_limited`` error now and then (``notice_interval_s``), never one per
dropped message, which would only add to the flood on the way back.

``LimitMetrics`` are the counters of every refusal the server makes on its own (rate,
slow readers, too many sessions, unauthorised or foreign requests), registered next to
the server's other metrics so ``GET /metrics`` shows them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter


class MessageRateLimit:
    """One session's token bucket over inbound messages; event loop only (no locks)."""

    def __init__(self, *, rate: float, burst: int, notice_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self.rate = rate
        self.burst = burst
        self.notice_interval_s = notice_interval_s
        self._clock = clock
        self._tokens = float(burst)
        self._refilled_at = clock()
        self._noticed_at: float | None = None
        self._unreported = 0
        self.admitted = 0
        self.dropped = 0

    def admit(self) -> bool:
        """Take a token for one message; False (and counted) when the bucket is empty."""
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._refilled_at) * self.rate)
        self._refilled_at = now
        if self._tokens >= 1.0 - 1e-9:  # a refill of exactly one token may come out a hair short
            self._tokens -= 1.0
            self.admitted += 1
            return True
        self.dropped += 1
        self._unreported += 1
        return False

    def notice(self) -> int | None:
        """Messages dropped since the last notice, when a notice is due now (the first drop
        of a flood at once, then at most one per ``notice_interval_s``); else None."""
        if self._unreported == 0:
            return None
        now = self._clock()
        if self._noticed_at is not None and now - self._noticed_at < self.notice_interval_s:
            return None
        self._noticed_at = now
        count, self._unreported = self._unreported, 0
        return count

    def describe(self, dropped: int) -> str:
        """The ``rate_limited`` error's message for a notice of ``dropped`` messages."""
        noun = "message" if dropped == 1 else "messages"
        return (f"{dropped} {noun} dropped unread: this session may send {self.rate:g} messages a second "
                f"(bursts of {self.burst}); send fewer")


class LimitMetrics:
    """Counters of the server's refusals, in the server's metrics registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages_dropped = Counter(
            "mindmirror_server_messages_dropped", "Inbound messages dropped unread, by reason (rate).",
            ["reason"], registry=registry)
        self.sessions_closed = Counter(
            "mindmirror_server_sessions_closed_by_server",
            "Sessions the server closed on its own, by reason (slow_reader).", ["reason"], registry=registry)
        self.sessions_refused = Counter(
            "mindmirror_server_sessions_refused",
            "WebSocket sessions refused after their handshake, by reason (too_many_sessions, open_failed).",
            ["reason"], registry=registry)
        self.requests_refused = Counter(
            "mindmirror_server_requests_refused",
            "HTTP and WebSocket handshake requests refused, by reason (origin, token).",
            ["reason"], registry=registry)
