"""The ``vision`` section of the pipeline config: detection, tracking and emotion settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.config import check, check_range
from stages.vision.emotion_model import DEFAULT_WEIGHTS


@dataclass(kw_only=True, slots=True)
class VisionConfig:
    min_face_px: int = 40
    """Smallest face side to detect, in input pixels (12..4096). The detector's image
    pyramid starts at 12 / min_face_px, so halving it roughly quadruples detection cost."""
    face_threshold: float = 0.9
    """Least face probability of MTCNN's last network for a detection or a verification
    to count (0.5..0.999). Real frontal faces score > 0.99; lamps, hands and models of
    spacecraft that pass the first two networks mostly score below 0.9."""
    detect_every: int = 5
    """Run a full detection on every n-th frame of a session (1..30); in between, each
    tracked face is verified (and re-fitted) by MTCNN's last network, which is ~10x cheaper.
    A session without tracks, or with a face that failed verification, is detected on
    the next frame."""
    cut_threshold: float = 0.1
    """Scene-cut score (``stages.vision.scene_cut``) above which every track of the session
    is dropped and a detection forced (0.01..1). Camera motion scores ~0.01-0.06, a cut
    to another picture ~0.2."""
    max_faces: int = 8
    """Most faces reported per frame, largest kept (1..32)."""
    iou_match: float = 0.3
    """Least IoU between a detection and a track's predicted box to count as the same face (0.05..0.95)."""
    max_misses: int = 2
    """Frames in a row a track may go unconfirmed (hidden, keeping its id) before it is dropped (0..30)."""
    box_smoothing: float = 0.3
    """Weight of the previous box when a confirmation updates a track, 0 (none) to 0.95 (heavy)."""
    emotion_smoothing: float = 0.7
    """Weight of a face's past emotion probabilities against one new reading, 0 (none) to
    0.98; at 0.7 and 20 FPS a change of expression takes over in about a third of a second."""
    session_idle_s: float = 30.0
    """Forget a session's tracks after this many seconds without frames (1..3600)."""
    max_sessions: int = 256
    """Most sessions tracked at once (1..100000); the least recently seen goes first."""
    detector_weights: str | None = None
    """Path of the converted MTCNN weights; null means the shipped
    ``stages/vision/weights/mtcnn.pt``."""
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
        check_range(self.min_face_px, "min_face_px", 12, 4096)
        check_range(self.face_threshold, "face_threshold", 0.5, 0.999)
        check_range(self.detect_every, "detect_every", 1, 30)
        check_range(self.cut_threshold, "cut_threshold", 0.01, 1.0)
        check_range(self.max_faces, "max_faces", 1, 32)
        check_range(self.iou_match, "iou_match", 0.05, 0.95)
        check_range(self.max_misses, "max_misses", 0, 30)
        check_range(self.box_smoothing, "box_smoothing", 0.0, 0.95)
        check_range(self.emotion_smoothing, "emotion_smoothing", 0.0, 0.98)
        check_range(self.session_idle_s, "session_idle_s", 1.0, 3600.0)
        check_range(self.max_sessions, "max_sessions", 1, 100_000)
        for name in ("detector_weights", "emotion_weights"):
            value = getattr(self, name)
            check(value is None or bool(value.strip()), name,
                  "must be a file path or null (the shipped weights), got an empty string")
        check_range(self.emotion_batch_max, "emotion_batch_max", 1, 1024)
        check_range(self.emotion_margin, "emotion_margin", 0.0, 0.5)
        check_range(self.quality_full_px, "quality_full_px", 8, 4096)
        check(self.sharpness_ref > 0.0, "sharpness_ref", f"must be > 0, got {self.sharpness_ref}")

    @property
    def weights_path(self) -> Path:
        """The emotion weights file this config selects."""
        return DEFAULT_WEIGHTS if self.emotion_weights is None else Path(self.emotion_weights)

    @property
    def detector_path(self) -> Path | None:
        """The MTCNN weights file this config selects (None: the shipped one)."""
        return None if self.detector_weights is None else Path(self.detector_weights)
