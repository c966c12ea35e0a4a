"""The runtime config that can change while the pipeline runs.

``RuntimeSettings`` holds what a user may change live from the page (style, strength,
target FPS, output size, ...). Rank 0 owns the authoritative copy in ``LiveConfig``:
``update(partial)`` validates a partial dict, bumps the revision and returns the new
state; the control plane carries ``(revision, settings)`` to every rank, and each
output frame records the revision it was made with.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Any

from runtime.config_loader import ConfigError, build, check_choice, check_range, to_dict

STYLES = ("auto", "neon", "ink", "pop", "noir", "aurora")
"""``auto`` lets the detected emotion choose; the others pin one look."""


@dataclass(kw_only=True, slots=True)
class RuntimeSettings:
    style: str = "auto"
    """Portrait style; 'auto' follows the emotion of the main face."""
    strength: float = 0.75
    """How far the portrait departs from the photo, 0 (photo) to 1 (fully stylized)."""
    target_fps: float = 20.0
    """Frames per second the page captures and sends."""
    output_size: int = 320
    """Side of the square portrait in pixels."""
    smoothing: float = 0.5
    """Temporal smoothing of the portrait, 0 (none) to 0.95 (heavy trails)."""
    capture_width: int = 640
    """Width the page scales camera frames to before JPEG encoding."""
    jpeg_quality: int = 80
    """Quality of the JPEG frames the page sends and the server returns, 30..95."""

    def __post_init__(self) -> None:
        check_choice(self.style, "style", STYLES)
        check_range(self.strength, "strength", 0.0, 1.0)
        check_range(self.target_fps, "target_fps", 1.0, 60.0)
        check_range(self.output_size, "output_size", 64, 1024)
        check_range(self.smoothing, "smoothing", 0.0, 0.95)
        check_range(self.capture_width, "capture_width", 160, 1920)
        check_range(self.jpeg_quality, "jpeg_quality", 30, 95)


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
