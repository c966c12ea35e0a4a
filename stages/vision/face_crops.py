"""Face boxes -> the emotion network's input, plus a per-face quality score.

The crop follows ``fer.FER.detect_emotions`` so the ported network sees what it saw in
``fer``: the box is made square by growing its shorter side around the centre, widened
by a margin on every side, the parts outside the frame are filled with the mean gray of
the frame's two bottom rows (``fer`` pads the frame with that value), and the crop is
resized to 64x64 with bilinear interpolation (``cv2.resize`` default) and scaled to
[-1, 1] as ``(gray / 255 - 0.5) * 2``.

One deliberate difference: ``fer`` widens by a fixed 10 px, tuned for ~640-wide frames.
Here the margin is a fraction of the square side (default 0.085, i.e. 10 px on a 119 px
Haar box), so the crop looks the same whatever capture width the page uses. The boxes now
come from MTCNN rather than fer's Haar cascade; on the astronaut fixture the two agree to
IoU > 0.5 (tests/stages/vision/test_vision_stage.py), and the emotion test still reads her
as happy.

Quality (0..1) tells downstream stages how far to trust a face:

    size      = min(1, side / full_size_px)                 side = min(w, h) in input pixels
    sharpness = v / (v + sharpness_ref)                       v = variance of the Laplacian
                                                              of the 64x64 crop
    quality   = sqrt(size * sharpness)

The geometric mean means a face must be both large enough and in focus; measuring blur
on the resized crop makes it independent of the face's size in the frame.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from stages.vision.emotion_model import INPUT_SIZE

Box = tuple[int, int, int, int]
"""(x, y, w, h) in input-frame pixels."""


def square_box(box: Box, margin: float) -> Box:
    """fer's ``tosquare`` followed by a margin of ``margin * side`` on every side."""
    x, y, w, h = box
    if h > w:
        x -= (h - w) // 2
        w = h
    elif w > h:
        y -= (w - h) // 2
        h = w
    pad = int(round(margin * w))
    return x - pad, y - pad, w + 2 * pad, h + 2 * pad


def border_value(gray: np.ndarray) -> float:
    """The fill for crop parts outside the frame: fer's mean of the two bottom rows."""
    return float(gray[-2:].mean())


def crop_face(gray: np.ndarray, box: Box, margin: float, fill: float) -> np.ndarray:
    """The 64x64 uint8 grayscale crop of ``box`` (any box, even partly or fully outside)."""
    x, y, w, h = square_box(box, margin)
    w, h = max(w, 1), max(h, 1)
    height, width = gray.shape
    canvas = np.full((h, w), int(round(fill)), dtype=np.uint8)
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, width), min(y + h, height)
    if x1 > x0 and y1 > y0:
        canvas[y0 - y:y1 - y, x0 - x:x1 - x] = gray[y0:y1, x0:x1]
    return cv2.resize(canvas, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR)


def to_network_input(crops: list[np.ndarray]) -> torch.Tensor:
    """Stack uint8 64x64 crops into the float ``[N, 1, 64, 64]`` batch in [-1, 1]."""
    if not crops:
        return torch.empty((0, 1, INPUT_SIZE, INPUT_SIZE), dtype=torch.float32)
    batch = torch.from_numpy(np.stack(crops)).to(torch.float32)
    return ((batch / 255.0 - 0.5) * 2.0).unsqueeze(1)


def face_quality(crop: np.ndarray, box: Box, *, full_size_px: float, sharpness_ref: float) -> float:
    """Quality in 0..1 from face size and crop sharpness (formula in the module docstring)."""
    size = min(1.0, min(box[2], box[3]) / full_size_px)
    variance = float(cv2.Laplacian(crop, cv2.CV_64F).var())
    sharpness = variance / (variance + sharpness_ref)
    return math.sqrt(max(size, 0.0) * sharpness)
