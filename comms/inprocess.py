"""A channel between two threads of one process: messages pass by reference.

Used when two stages share a rank. The credit bound is the queue bound: ``send`` waits
while ``capacity`` messages sit unconsumed, exactly as a cross-rank link would make it
wait, so a pipeline behaves the same whichever way its stages are placed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from comms.channel import Channel, LinkStats
from comms.errors import ChannelClosed, ChannelTimeout
from comms.message import Message

log = logging.getLogger(__name__)


def deadline_of(timeout: float | None) -> float | None:
    """Monotonic deadline for a Channel timeout (None waits forever, 0 does not wait)."""
    if timeout is None:
        return None
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout < 0:
        raise ValueError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}")
    return time.monotonic() + timeout


def remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class InProcessChannel(Channel):
    """One directed link inside a process; thread-safe for one producer and one consumer
    (several of each also work, with order kept per ``send`` call)."""

    def __init__(self, name: str, capacity: int = 2) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"channel {name!r}: capacity must be an integer >= 1, got {capacity!r}")
        self.name = name
        self.capacity = capacity
        self.stats = LinkStats()
        self._queue: deque[tuple[Message, float]] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def send(self, msg: Message, timeout: float | None = None) -> None:
        if not isinstance(msg, Message):
            raise TypeError(f"channel {self.name!r}: send expects a Message, got {type(msg).__name__}")
        deadline = deadline_of(timeout)
        started = time.monotonic()
        with self._cond:
            if not self._cond.wait_for(lambda: self._closed or len(self._queue) < self.capacity,
                                       remaining(deadline)):
                raise ChannelTimeout(f"channel {self.name!r}: no credit within {timeout} s "
                                     f"({self.capacity} messages unconsumed)")
            if self._closed:
                raise ChannelClosed(f"channel {self.name!r} is closed")
            self._queue.append((msg, time.time()))
            self._cond.notify_all()
        self.stats.record_send(msg.payload_bytes, time.monotonic() - started)

    def recv(self, timeout: float | None = None) -> Message:
        deadline = deadline_of(timeout)
        with self._cond:
            if not self._cond.wait_for(lambda: self._closed or self._queue, remaining(deadline)):
                raise ChannelTimeout(f"channel {self.name!r}: nothing arrived within {timeout} s")
            if not self._queue:
                raise ChannelClosed(f"channel {self.name!r} is closed")
            msg, sent_at = self._queue.popleft()
            self._cond.notify_all()
        self.stats.record_recv(msg.payload_bytes, (time.time() - sent_at) * 1000.0)
        return msg

    def credits(self) -> int:
        with self._cond:
            return 0 if self._closed else self.capacity - len(self._queue)

    def close(self) -> None:
        """Close both ends at once, like a sender's END on a cross-rank link: ``send``
        raises ``ChannelClosed`` from now on, ``recv`` still returns what is queued and
        then raises ``ChannelClosed``; blocked callers wake immediately."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            queued = len(self._queue)
        log.debug("channel %r closed with %d messages still queued", self.name, queued)

    def __repr__(self) -> str:
        return f"InProcessChannel({self.name!r}, capacity={self.capacity})"
