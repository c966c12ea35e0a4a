"""The pipeline's inbox on the server rank: per-session bounded queues that drop the
oldest frame when behind.

Browser sessions ``put`` camera frames here (never blocking); the first stage takes
them (``recv``, the runner's ``Inlet``) round-robin across sessions, so one fast client
cannot starve a slow one. When the pipeline falls behind, each session keeps only its
newest ``depth`` frames: showing a live mirror late is worse than skipping frames. A
live config change ``flush``es every queued frame so no stale work enters the pipeline.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque

from comms.errors import ChannelClosed, ChannelTimeout
from comms.message import Message


class SessionQueue:
    def __init__(self, name: str = "sessions", depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.name = name
        self.depth = depth
        self._queues: OrderedDict[str, deque[Message]] = OrderedDict()
        self._cond = threading.Condition()
        self._closed = False
        self.dropped: dict[str, int] = {}
        """Frames dropped per open session because a newer one arrived while it waited."""
        self.dropped_total = 0
        self.flushed = 0

    def put(self, msg: Message) -> None:
        """Queue a frame for its session; drops that session's oldest when full."""
        with self._cond:
            if self._closed:
                raise ChannelClosed(f"{self.name} is closed")
            queue = self._queues.get(msg.session)
            if queue is None:
                queue = self._queues[msg.session] = deque()
            if len(queue) >= self.depth:
                queue.popleft()
                self.dropped[msg.session] = self.dropped.get(msg.session, 0) + 1
                self.dropped_total += 1
            queue.append(msg)
            self._cond.notify()

    def recv(self, timeout: float | None = None) -> Message:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                msg = self._pop_round_robin()
                if msg is not None:
                    break
                if self._closed:
                    raise ChannelClosed(f"{self.name} is closed")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise ChannelTimeout(f"no frame on {self.name} within {timeout}s")
                self._cond.wait(remaining)
        return msg

    def _pop_round_robin(self) -> Message | None:
        for session, queue in self._queues.items():
            if queue:
                # Move the served session to the back: fair turns across sessions. (The
                # dict changes under the loop, which is safe because we return at once.)
                self._queues.move_to_end(session)
                return queue.popleft()
        return None

    def drop_session(self, session: str) -> None:
        with self._cond:
            self._queues.pop(session, None)
            self.dropped.pop(session, None)

    def flush(self) -> int:
        """Drop every queued frame (after a config change); returns how many."""
        with self._cond:
            n = sum(len(q) for q in self._queues.values())
            for queue in self._queues.values():
                queue.clear()
            self.flushed += n
            return n

    def queued(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._queues.values())

    def close(self) -> None:
        """No more frames: the reader drains what is queued, then gets ChannelClosed."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
