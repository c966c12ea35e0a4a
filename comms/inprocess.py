"""A link between two threads of one process: messages pass by reference.

Used when two stages share a rank. The credit bound is the queue bound: ``send`` waits
while ``capacity`` messages sit unconsumed, exactly as a cross-rank link would make it
wait, so a pipeline behaves the same whichever way its stages are placed. The two ends
share one queue; closing either end marks it the way the cross-rank links' END and
CLOSED do, and there is nothing to wait for afterwards (``join`` is True at once).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from comms.channel import ChannelReader, ChannelWriter, LinkStats, deadline_of, remaining
from comms.errors import ChannelClosed, ChannelTimeout
from comms.message import Message

log = logging.getLogger(__name__)


def inprocess_link(name: str, capacity: int = 2) -> tuple[InProcessWriter, InProcessReader]:
    """The two ends of a link of ``capacity`` credits between threads of this process."""
    queue = _SharedQueue(name, capacity)
    return InProcessWriter(queue), InProcessReader(queue)


class _SharedQueue:
    """What both ends see: the messages in flight and how the link ended."""

    def __init__(self, name: str, capacity: int) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"channel {name!r}: capacity must be an integer >= 1, got {capacity!r}")
        self.name = name
        self.capacity = capacity
        self.items: deque[tuple[Message, float]] = deque()
        """Messages sent and not yet taken, each with its send time (for hop latency)."""
        self.cond = threading.Condition()
        self.ended = False
        """The writer closed (END): the reader drains what is queued, then ChannelClosed."""
        self.stopped = False
        """The reader closed (CLOSED): nothing more is taken or kept."""


class InProcessWriter(ChannelWriter):
    """The sending end; thread-safe (several senders keep order per ``send`` call)."""

    def __init__(self, queue: _SharedQueue) -> None:
        self.name = queue.name
        self.capacity = queue.capacity
        self.stats = LinkStats()
        self._q = queue

    def send(self, msg: Message, timeout: float | None = None) -> None:
        if not isinstance(msg, Message):
            raise TypeError(f"channel {self.name!r}: send expects a Message, got {type(msg).__name__}")
        deadline = deadline_of(timeout)
        started = time.monotonic()
        q = self._q
        with q.cond:
            if not q.cond.wait_for(lambda: q.ended or q.stopped or len(q.items) < self.capacity,
                                   remaining(deadline)):
                raise ChannelTimeout(f"channel {self.name!r}: no credit within {timeout} s "
                                     f"({self.capacity} messages unconsumed)")
            if q.ended:
                raise ChannelClosed(f"channel {self.name!r} is closed")
            if q.stopped:
                raise ChannelClosed(f"channel {self.name!r}: the receiving end closed it")
            q.items.append((msg, time.time()))
            q.cond.notify_all()
        self.stats.record_send(msg.payload_bytes, time.monotonic() - started)

    def credits(self) -> int:
        q = self._q
        with q.cond:
            return 0 if q.ended or q.stopped else self.capacity - len(q.items)

    def close(self) -> None:
        """END: sends raise ``ChannelClosed`` from now on, the reader still takes what is
        queued; blocked callers wake at once."""
        q = self._q
        with q.cond:
            if q.ended:
                return
            q.ended = True
            q.cond.notify_all()
            queued = len(q.items)
        log.debug("channel %r: sending end closed with %d messages still queued", self.name, queued)

    def join(self, timeout: float | None = None) -> bool:
        deadline_of(timeout)  # the same argument check as every end; nothing to wait for
        return True

    def __repr__(self) -> str:
        return f"InProcessWriter({self.name!r}, capacity={self.capacity})"


class InProcessReader(ChannelReader):
    """The receiving end; thread-safe (several receivers each take whole messages)."""

    def __init__(self, queue: _SharedQueue) -> None:
        self.name = queue.name
        self.capacity = queue.capacity
        self.stats = LinkStats()
        self._q = queue

    def recv(self, timeout: float | None = None) -> Message:
        deadline = deadline_of(timeout)
        q = self._q
        with q.cond:
            if not q.cond.wait_for(lambda: q.stopped or q.ended or q.items, remaining(deadline)):
                raise ChannelTimeout(f"channel {self.name!r}: nothing arrived within {timeout} s")
            if q.stopped or not q.items:
                raise ChannelClosed(f"channel {self.name!r} is closed")
            msg, sent_at = q.items.popleft()
            q.cond.notify_all()
        self.stats.record_recv(msg.payload_bytes, (time.time() - sent_at) * 1000.0)
        return msg

    def close(self) -> None:
        """CLOSED: queued messages are dropped, the writer's sends raise ``ChannelClosed``;
        blocked callers on both ends wake at once."""
        q = self._q
        with q.cond:
            if q.stopped:
                return
            q.stopped = True
            dropped = len(q.items)
            q.items.clear()
            q.cond.notify_all()
        log.debug("channel %r: receiving end closed, %d queued messages dropped", self.name, dropped)

    def join(self, timeout: float | None = None) -> bool:
        deadline_of(timeout)  # the same argument check as every end; nothing to wait for
        return True

    def __repr__(self) -> str:
        return f"InProcessReader({self.name!r}, capacity={self.capacity})"
