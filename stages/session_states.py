"""Per-session state of a stage, bounded by count and by idle time.

A stage replica serves many browser sessions and keeps something per session (a
portrait's framing, its previous output, a render budget). Sessions end without saying
goodbye, so the state lives in an LRU: at most ``max_sessions`` entries (the least
recently seen is dropped beyond), and entries unseen for ``idle_s`` are dropped when
``evict_idle`` runs (once per batch). Memory stays bounded whatever the browsers do.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class SessionStates(Generic[T]):
    """Session id -> state, least recently seen first; ``make()`` builds a new session's."""

    def __init__(self, make: Callable[[float], T], *, max_sessions: int, idle_s: float,
                 log: logging.Logger, what: str = "state") -> None:
        self._make = make
        self._max = max_sessions
        self._idle_s = idle_s
        self._log = log
        self._what = what
        self._entries: OrderedDict[str, tuple[float, T]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, session: str, now: float) -> T:
        """The session's state (made on first sight), marked seen at ``now``."""
        entry = self._entries.pop(session, None)
        state = self._make(now) if entry is None else entry[1]
        self._entries[session] = (now, state)
        while len(self._entries) > self._max:
            dropped, _ = self._entries.popitem(last=False)
            self._log.debug("dropped %s of session %s (over %d sessions)", self._what, dropped, self._max)
        return state

    def evict_idle(self, now: float) -> None:
        # Entries are kept in last-seen order, so the idle ones are at the front.
        while self._entries:
            session, (seen, _) = next(iter(self._entries.items()))
            if now - seen < self._idle_s:
                break
            del self._entries[session]
            self._log.debug("dropped %s of idle session %s", self._what, session)

    def clear(self) -> None:
        self._entries.clear()
