"""This rank's view of the live runtime settings, and which frames are now stale."""

from __future__ import annotations

import threading

from core.settings import RuntimeSettings, RuntimeView


class LiveView:
    """Latest ``(revision, settings)`` known on this rank; updated by the control plane.

    Frames captured under an older revision than the newest known (``flush_floor``) are
    stale and each stage drops them instead of spending work on them (a long backlog
    after a style change is what makes live demos feel broken).
    """

    def __init__(self, revision: int, settings: RuntimeSettings) -> None:
        self._view = RuntimeView(revision=revision, settings=settings)
        self._lock = threading.Lock()

    def get(self) -> RuntimeView:
        with self._lock:
            return self._view

    @property
    def flush_floor(self) -> int:
        return self.get().revision

    def set(self, revision: int, settings: RuntimeSettings) -> bool:
        """Adopt a newer revision; returns False (and changes nothing) for an old one."""
        with self._lock:
            if revision <= self._view.revision:
                return False
            self._view = RuntimeView(revision=revision, settings=settings)
            return True
