"""How one process stops: a flag every component watches, and the first failure.

Stage runners, the control plane and the front end all take the same ``Lifecycle``:
``request_stop(reason)`` ends the job cleanly, ``fail(reason)`` records the first
failure (a dead or stalled rank the job cannot do without, a stage that could not
start) and stops too, so the process exits non-zero. Both may be called from any
thread, any number of times; the first call decides.

A rank the job can do without is not a failure: ``note_loss(what)`` records it (the
job goes on degraded, ``runtime.rank_loss``), so that the stop that eventually comes
knows a peer is gone and bounds its wait as after a failure.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class JobFailed(RuntimeError):
    """Raised by the runtime when the job failed for a reason it already logged."""


class Lifecycle:
    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.failure: str | None = None
        """The first failure, or None while the job is healthy (or stopped cleanly)."""
        self.reason = ""
        """Why the job is stopping."""
        self.losses: list[str] = []
        """Ranks lost while the job went on without them, as the pages were told."""
        self._lock = threading.Lock()

    @property
    def degraded(self) -> bool:
        """A rank was lost: a peer may never answer again."""
        return bool(self.losses)

    def note_loss(self, what: str) -> None:
        with self._lock:
            self.losses.append(what)

    def request_stop(self, reason: str) -> None:
        with self._lock:
            if self.stopping.is_set():
                return
            self.reason = reason
            self.stopping.set()
        log.info("stopping: %s", reason)

    def fail(self, reason: str) -> None:
        with self._lock:
            if self.failure is not None or self.stopping.is_set():
                return
            self.failure = self.reason = reason
            self.stopping.set()
        log.error("job failed: %s", reason)
