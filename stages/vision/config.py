"""The ``vision`` section of the pipeline config: detection, tracking and emotion settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.config import check, check_range
from stages.vision.emotion_model import DEFAULT_WEIGHTS


@dataclass(kw_only=True, slots=True)
class VisionConfig:
    detect_width: int = 320
    """Width frames are shrunk to before Haar detection (80..1920); the cascade's cost grows
    with the pixel count: about 35 ms at 320 and 70 ms at 640 wide on one core."""
    detect_every: int = 3
    """Run the detector on every n-th frame of a session (1..30); frames in between reuse
    the tracked boxes. A session without tracks is detected on every frame."""
    min_face_px: int = 48
    """Smallest face side to detect, in input pixels (8..4096). Faces smaller than
    24 * frame_width / detect_width pixels are never found (the cascade's window)."""
    scale_factor: float = 1.1
    """Haar pyramid step (1.01..2.0); larger is faster but misses more sizes. fer uses 1.1."""
    min_neighbors: int = 5
    """Overlapping Haar hits needed to accept a face (0..50); higher means fewer false faces."""
    max_faces: int = 4
    """Most faces reported per frame, largest kept (1..32)."""
    iou_match: float = 0.3
    """Least IoU between a detection and a track's predicted box to count as the same face (0.05..0.95)."""
    max_misses: int = 2
    """Detections in a row a track may go unmatched before it is dropped (0..30)."""
    box_smoothing: float = 0.5
    """Weight of the previous box when a detection updates a track, 0 (none) to 0.95 (heavy)."""
    session_idle_s: float = 30.0
    """Forget a session's tracks after this many seconds without frames (1..3600)."""
    max_sessions: int = 256
    """Most sessions tracked at once (1..100000); the least recently seen goes first."""
    emotion_weights: str | None = None
    """Path of the converted emotion state_dict; null means the shipped
    ``stages/vision/weights/emotion_mini_xception.pt``."""
    emotion_batch_max: int = 32
    """Most face crops per emotion forward pass (1..1024); larger micro-batches are chunked."""
    emotion_margin: float = 0.085
    """Margin added on each side of the square face crop, as a fraction of its side (0..0.5);
    0.085 reproduces fer's 10 px on a typical 119 px face at 640 wide."""
    quality_full_px: int = 160
    """Face side in input pixels at which size stops lowering the quality score (8..4096)."""
    sharpness_ref: float = 100.0
    """Laplacian variance of the 64x64 crop at which sharpness scores 0.5 (> 0)."""

    def __post_init__(self) -> None:
        check_range(self.detect_width, "detect_width", 80, 1920)
        check_range(self.detect_every, "detect_every", 1, 30)
        check_range(self.min_face_px, "min_face_px", 8, 4096)
        check_range(self.scale_factor, "scale_factor", 1.01, 2.0)
        check_range(self.min_neighbors, "min_neighbors", 0, 50)
        check_range(self.max_faces, "max_faces", 1, 32)
        check_range(self.iou_match, "iou_match", 0.05, 0.95)
        check_range(self.max_misses, "max_misses", 0, 30)
        check_range(self.box_smoothing, "box_smoothing", 0.0, 0.95)
        check_range(self.session_idle_s, "session_idle_s", 1.0, 3600.0)
        check_range(self.max_sessions, "max_sessions", 1, 100_000)
        check(self.emotion_weights is None or bool(self.emotion_weights.strip()), "emotion_weights",
              "must be a file path or null (the shipped weights), got an empty string")
        check_range(self.emotion_batch_max, "emotion_batch_max", 1, 1024)
        check_range(self.emotion_margin, "emotion_margin", 0.0, 0.5)
        check_range(self.quality_full_px, "quality_full_px", 8, 4096)
        check(self.sharpness_ref > 0.0, "sharpness_ref", f"must be > 0, got {self.sharpness_ref}")

    @property
    def weights_path(self) -> Path:
        """The emotion weights file this config selects."""
        return DEFAULT_WEIGHTS if self.emotion_weights is None else Path(self.emotion_weights)
