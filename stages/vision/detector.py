"""Face detection with OpenCV's frontal-face Haar cascade on a downscaled frame.

The cascade costs about 80 ms on a 640-wide frame on one core and scales with the pixel
count, so frames are shrunk to ``detect_width`` (INTER_AREA, which averages instead of
aliasing) before detection and the boxes are scaled back to input pixels. The cascade's
smallest window is 24x24 pixels of the shrunk frame, so faces narrower than
``24 * width / detect_width`` input pixels cannot be found whatever ``min_face_px`` says.

Detection parameters follow ``fer`` (scale factor 1.1, 5 neighbours,
``CASCADE_SCALE_IMAGE``) so boxes match what its emotion model was used with.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from stages.vision.face_crops import Box

CASCADE_WINDOW_PX = 24
"""Training window of haarcascade_frontalface_default.xml: the smallest detectable face."""


def default_cascade_path() -> Path:
    """The frontal-face cascade shipped inside opencv-python(-headless)."""
    return Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"


class HaarFaceDetector:
    """Finds faces in a grayscale uint8 frame; boxes come back in that frame's pixels."""

    def __init__(self, *, detect_width: int, scale_factor: float, min_neighbors: int,
                 min_face_px: int, cascade_path: Path | None = None) -> None:
        path = default_cascade_path() if cascade_path is None else Path(cascade_path)
        if not path.is_file():
            raise FileNotFoundError(f"Haar cascade not found: {path}")
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise ValueError(f"Haar cascade {path}: OpenCV could not load it")
        self.detect_width = detect_width
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_face_px = min_face_px

    def detect(self, gray: np.ndarray) -> list[Box]:
        """Faces in ``gray`` (H x W uint8), largest first, clipped to the frame."""
        height, width = gray.shape[:2]
        scale = min(1.0, self.detect_width / width)
        small_w, small_h = max(1, round(width * scale)), max(1, round(height * scale))
        if min(small_w, small_h) < CASCADE_WINDOW_PX:
            return []  # smaller than one cascade window: nothing can match
        small = gray if scale == 1.0 else cv2.resize(gray, (small_w, small_h), interpolation=cv2.INTER_AREA)
        min_side = max(CASCADE_WINDOW_PX, int(self.min_face_px * scale))
        found = self._cascade.detectMultiScale(
            small, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
            flags=cv2.CASCADE_SCALE_IMAGE, minSize=(min_side, min_side))
        boxes = []
        for x, y, w, h in np.asarray(found, dtype=np.float64).reshape(-1, 4) / scale:
            x0, y0 = max(0, int(round(x))), max(0, int(round(y)))
            x1, y1 = min(width, int(round(x + w))), min(height, int(round(y + h)))
            if x1 > x0 and y1 > y0:
                boxes.append((x0, y0, x1 - x0, y1 - y0))
        boxes.sort(key=lambda b: b[2] * b[3], reverse=True)
        return boxes
