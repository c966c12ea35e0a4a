"""Scene-cut detection: has the picture changed so much that old face tracks are void?

A cut (another photo, the camera turned to another room, a different source) must not
carry tracks over: their boxes would sit on whatever is now under them and their
emotion would be re-read from a chest or a lamp. Verification would drop them a frame
later; detecting the cut drops them on the first frame of the new scene.

The test is cheap on purpose: a 32 x 24 grayscale thumbnail per frame (INTER_AREA, so
it averages rather than samples and sensor noise cancels out; then a Gaussian blur of
one thumbnail pixel, so a sub-pixel shift does not flip edges), each minus its own mean
(a change of exposure or a light switched on is not a cut), and the mean
absolute difference between consecutive thumbnails in 0..1 units, taken at the best of
the nine one-thumbnail-pixel shifts (one thumbnail pixel is 20 pixels of a 640-wide
frame), so a head or camera moving fast between two frames is not a cut. On the
astronaut fixture, sensor noise and a light switched on score < 0.01, a 10- or 30-pixel
jump ~0.03 and a 10 % zoom ~0.06; cutting to an unrelated picture scores 0.2-0.25
(measured in tests/stages/vision/test_vision_tracking.py).
"""

from __future__ import annotations

import cv2
import numpy as np

THUMBNAIL_SIZE = (32, 24)
"""(width, height) of the comparison thumbnail."""


def thumbnail(gray: np.ndarray) -> np.ndarray:
    """The float32 zero-mean thumbnail of an H x W uint8 gray frame, in 0..1 units."""
    small = cv2.resize(gray, THUMBNAIL_SIZE, interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    small = cv2.GaussianBlur(small, (0, 0), 1.0)
    return small - small.mean()


def cut_score(previous: np.ndarray | None, current: np.ndarray) -> float:
    """Mean absolute difference of two thumbnails at their best alignment within one
    thumbnail pixel (0 when there is no previous frame)."""
    if previous is None or previous.shape != current.shape:
        return 0.0
    core = current[1:-1, 1:-1]
    height, width = core.shape
    return float(min(np.abs(core - previous[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]).mean()
                     for dy in (-1, 0, 1) for dx in (-1, 0, 1)))


def is_cut(previous: np.ndarray | None, current: np.ndarray, threshold: float) -> bool:
    """Whether ``current`` starts a new scene after ``previous``."""
    return cut_score(previous, current) > threshold
