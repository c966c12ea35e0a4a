"""The live settings: what a user may change from the page while the pipeline runs.

``RuntimeSettings`` is the vocabulary (style, strength, target FPS, output size, ...);
``RuntimeView`` is how a stage sees it: the values plus the revision they were
published under. Rank 0 owns the authoritative copy (``runtime.live_config``) and the
control plane carries ``(revision, settings)`` to every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import check_choice, check_range

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


@dataclass(frozen=True, kw_only=True, slots=True)
class RuntimeView:
    """The live settings as a stage sees them: values plus their revision."""

    revision: int
    settings: RuntimeSettings
