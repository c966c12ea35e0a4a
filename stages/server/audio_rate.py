"""``AudioRateLimit``: how fast one session may send audio, as pure code with an injected clock.

A lip-sync pipeline does work in proportion to the audio it is given, in real time. A
page that streams a file faster than it plays (or a script that sends an hour of audio
in a second) would take the GPU from every other session and build a backlog the
session itself would wait minutes for. So each session is held to two limits:

- chunks: at most ``max_chunks_per_s`` admitted in any one-second window. Small chunks
  cost a message each (a header, a queue slot, a hook call) whatever their length;
- audio: a token bucket of samples, ``burst_s`` seconds deep and full at the session's
  first chunk, refilled at 1x real time. Over any stretch of time a session can send no
  more audio than that stretch lasted plus ``burst_s``; the burst absorbs the jitter of a
  microphone and a network that deliver in clumps. An idle session does not bank more
  than ``burst_s``, so a pause cannot be followed by a flood.

A refused chunk costs nothing (neither limit counts it), so a page that backs off is
never punished for what it tried. The clock is a parameter so tests can walk time.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from stages.server.protocol import AUDIO_SAMPLE_RATE, ErrorCode, ProtocolError


class AudioRateLimit:
    """One session's admission of audio chunks; not thread-safe (the server's event loop owns it)."""

    def __init__(self, *, max_chunks_per_s: int = 100, burst_s: float = 2.0,
                 sample_rate: int = AUDIO_SAMPLE_RATE, clock: Callable[[], float] = time.monotonic) -> None:
        if max_chunks_per_s < 1:
            raise ValueError(f"max_chunks_per_s must be >= 1, got {max_chunks_per_s}")
        if not burst_s > 0:
            raise ValueError(f"burst_s must be > 0, got {burst_s}")
        self.max_chunks_per_s = max_chunks_per_s
        self.burst_s = burst_s
        self.sample_rate = sample_rate
        self._clock = clock
        self._capacity = burst_s * sample_rate
        self._tokens = self._capacity  # samples that may be sent now
        self._refilled_at: float | None = None  # None until the first chunk
        self._admitted: deque[float] = deque()  # times of the chunks admitted in the last second
        self.admitted_chunks = 0
        self.admitted_samples = 0
        self.refused_chunks = 0

    def admit(self, samples: int) -> None:
        """Count a chunk of ``samples`` samples, or raise ``audio_rate`` and count nothing."""
        if samples < 0:
            raise ValueError(f"samples must be >= 0, got {samples}")
        now = self._clock()
        if self._refilled_at is None:
            self._refilled_at = now
        # Refill first: time that passed earns samples, up to the bucket's depth.
        self._tokens = min(self._capacity, self._tokens + (now - self._refilled_at) * self.sample_rate)
        self._refilled_at = now
        while self._admitted and now - self._admitted[0] >= 1.0:
            self._admitted.popleft()
        if len(self._admitted) >= self.max_chunks_per_s:
            self.refused_chunks += 1
            raise ProtocolError(ErrorCode.AUDIO_RATE,
                                f"more than {self.max_chunks_per_s} audio chunks in one second; "
                                f"send fewer, longer chunks (20 ms is plenty)")
        # One sample of slack: clock readings are floats, and a chunk sent exactly on time
        # must not be refused for a rounding error of a microsecond.
        if samples > self._tokens + 1.0:
            self.refused_chunks += 1
            ahead = (samples - self._tokens) / self.sample_rate
            raise ProtocolError(ErrorCode.AUDIO_RATE,
                                f"audio arrives faster than real time: this chunk would put the session "
                                f"{self.burst_s + ahead:.2f} s ahead of the clock; the limit is {self.burst_s:g} s "
                                f"(stream files at the pace they play)")
        self._tokens -= samples
        self._admitted.append(now)
        self.admitted_chunks += 1
        self.admitted_samples += samples

    def ahead_s(self) -> float:
        """Seconds of audio sent ahead of real time right now (0 when caught up)."""
        if self._refilled_at is None:
            return 0.0
        tokens = min(self._capacity, self._tokens + (self._clock() - self._refilled_at) * self.sample_rate)
        return (self._capacity - tokens) / self.sample_rate
