"""Rank 0's authoritative copy of the live settings (``core.settings.RuntimeSettings``).

``LiveConfig.update(partial)`` validates a partial dict, bumps the revision and returns the new
state; the control plane carries ``(revision, settings)`` to every rank, and each
output frame records the revision it was made with.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from core.config import ConfigError, build, to_dict
from core.settings import RuntimeSettings


class LiveConfig:
    """Rank 0's authoritative, thread-safe copy of the live settings and their revision."""

    def __init__(self, initial: RuntimeSettings, presets: dict[str, dict[str, Any]]) -> None:
        for name, values in presets.items():
            merged(initial, values, path=f"presets.{name}")  # reject bad presets at startup
        self._settings = initial
        self._revision = 1
        self._presets = presets
        self._lock = threading.Lock()

    @property
    def presets(self) -> list[str]:
        return sorted(self._presets)

    def current(self) -> tuple[int, RuntimeSettings]:
        with self._lock:
            return self._revision, self._settings

    def update(self, partial: dict[str, Any]) -> tuple[int, RuntimeSettings]:
        """Apply a partial update; raises ``ConfigError`` and changes nothing if invalid.

        An update that changes no value keeps the revision: a new revision flushes every
        session's queued frames, so repeating a setting must not cost anyone a frame.
        """
        with self._lock:
            settings = merged(self._settings, partial, path="config")
            if settings != self._settings:
                self._settings = settings
                self._revision += 1
            return self._revision, self._settings

    def apply_preset(self, name: str) -> tuple[int, RuntimeSettings]:
        if name not in self._presets:
            raise ConfigError(f"unknown preset {name!r}; allowed: {', '.join(self.presets)}", "name")
        return self.update(self._presets[name])


def merged(base: RuntimeSettings, partial: Any, path: str) -> RuntimeSettings:
    if not isinstance(partial, dict):
        raise ConfigError(f"expected an object of settings, got {type(partial).__name__}", path)
    values = to_dict(base)
    values.update(partial)
    return build(RuntimeSettings, values, path)


def settings_from_dict(values: dict[str, Any]) -> RuntimeSettings:
    return build(RuntimeSettings, values)


def settings_to_dict(settings: RuntimeSettings) -> dict[str, Any]:
    return dataclasses.asdict(settings)
