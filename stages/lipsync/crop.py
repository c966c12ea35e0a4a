"""The lip-sync crop: where it sits on an avatar frame, how it is cut, what the U-Net sees.

SyncTalk_2D's U-Net was trained on square crops of the lower face: from the eye line
(the seeds take the top from a 110-point landmark at the eye corner) down by one face
width, and from cheek to cheek (two contour points at eye height). The crop therefore
shows the nose, the mouth, the chin and a little neck; the eyes sit on its top edge. We
only have MTCNN's five landmarks, so the same square is derived from them:

* side ``S`` = the face width at eye height, ``max(2.1 x inter-ocular distance,
  2.35 x eye-to-mouth distance)``: the first holds for a frontal face, the second keeps
  the crop from shrinking when the head turns (the eyes draw together, the eye-to-mouth
  distance does not); on the astronaut fixture both give ~114 px, matching her cheeks.
* top = the eye line (mean eye y); x centre = midway between the eyes' midpoint and the
  mouth corners' midpoint (the face's midline, robust to a slight yaw).

For the astronaut (inter-ocular 54 px, S = 112-114 px) that puts the mouth-corner line at
~0.42 S below the top, i.e. y ~ 139 of the 328 crop (~135 of the model's inner 320), the
mouth centre at x ~ 160-164, its corners ~0.25 S either side, and the chin at ~0.76 S:
the mouth lies deep inside the masked area (x 5..314, y 5..309 of the inner 320), as in
the seeds' crops.

Rectangles are smoothed over time so the paste does not jitter: the side is fixed per
avatar (median over frames: a crop that breathes with detector noise would make the
mouth swim), the centre goes through a centred moving average (no lag). Frames without a
detected face are interpolated from their neighbours.

``unet_inputs`` builds the U-Net input on any device from 328 crops in BGR (the model's
channel order); ``bgr_tensor`` and ``patches_rgb`` convert between our RGB frames and
that order.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

CROP_SIZE = 328
"""Side of the crop the rectangle is resized to."""
INNER = 320
"""Side of the model's input and output: ``crop[BORDER:BORDER + INNER]`` of the 328 crop."""
BORDER = (CROP_SIZE - INNER) // 2
MASK_ROWS = slice(5, 310)
MASK_COLS = slice(5, 315)
"""The inner-crop pixels the masked input zeroes. The seeds draw
``cv2.rectangle(img, (5, 5, 310, 305), 0, -1)``: OpenCV fills x 5..314, y 5..309
inclusive (a Rect's bottom-right corner is exclusive), which these slices reproduce."""

FACE_WIDTH_PER_IOD = 2.1
"""Face width at eye height (cheek to cheek) in inter-ocular distances."""
FACE_WIDTH_PER_EYE_MOUTH = 2.35
"""The same width in eye-line-to-mouth distances (used when the head turns)."""
TOP_OFFSET = 0.0
"""The crop's top edge below the eye line, as a fraction of the side."""
SMOOTH_WINDOW = 7
"""Frames of the centred moving average over the crop centre (0.28 s at 25 fps)."""
DEFAULT_MOUTH = (163.5, 138.5, 155.0, 148.0)
"""Mouth centre x, mouth-corner line y, corner-to-corner width and lip-line y in 328-crop
pixels for a typical neutral face under this geometry (the corners as measured on the
astronaut fixture, the lips meeting 6 % of the width below them); avatars record their
own measured values in the manifest (``Manifest.mouth``)."""


def face_geometry(landmarks: np.ndarray) -> np.ndarray:
    """Per-frame ``[N, 3]`` (x centre, top, side) as floats from ``[N, 5, 2]`` MTCNN landmarks."""
    eyes = (landmarks[:, 0] + landmarks[:, 1]) / 2
    mouth = (landmarks[:, 3] + landmarks[:, 4]) / 2
    iod = np.linalg.norm(landmarks[:, 1] - landmarks[:, 0], axis=1)
    eye_mouth = np.linalg.norm(mouth - eyes, axis=1)
    side = np.maximum(FACE_WIDTH_PER_IOD * iod, FACE_WIDTH_PER_EYE_MOUTH * eye_mouth)
    cx = (eyes[:, 0] + mouth[:, 0]) / 2
    top = eyes[:, 1] + TOP_OFFSET * side
    return np.stack([cx, top, side], axis=1)


def fill_gaps(values: np.ndarray) -> np.ndarray:
    """``[N, K]`` with NaN rows (frames without a face) linearly interpolated between
    the nearest frames that have one, and held at the ends."""
    known = ~np.isnan(values).any(axis=1)
    index = np.arange(len(values))
    return np.stack([np.interp(index, index[known], values[known, k]) for k in range(values.shape[1])], axis=1)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average along axis 0; near the ends the window shrinks symmetrically
    (frame 0 stays frame 0's value), so a still head stays exactly still and ends do not drift."""
    half = max(0, window // 2)
    n = len(values)
    out = np.empty_like(values)
    cumsum = np.concatenate([np.zeros((1, values.shape[1])), np.cumsum(values, axis=0)])
    for i in range(n):
        h = min(half, i, n - 1 - i)
        out[i] = (cumsum[i + h + 1] - cumsum[i - h]) / (2 * h + 1)
    return out


def rects_from_landmarks(landmarks: np.ndarray, frame_size: tuple[int, int], *,
                         window: int = SMOOTH_WINDOW) -> np.ndarray:
    """Square crop rectangles ``[N, 4]`` int32 ``(x1, y1, x2, y2)``, x2/y2 exclusive.

    ``landmarks`` is ``[N, 5, 2]`` in MTCNN's order (left eye, right eye, nose, left and
    right mouth corner) with NaN for frames where no face was found; ``frame_size`` is
    ``(width, height)`` as OpenCV writes sizes. The side is fixed (median over frames,
    at most the frame's shorter side), the centre is smoothed over ``window`` frames, and
    each rectangle is shifted into the frame (a crop must never leave it: it is resized
    and pasted back whole). Raises ValueError when no frame has a face.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (5, 2) or len(landmarks) == 0:
        raise ValueError(f"landmarks must be [N, 5, 2] with N >= 1, got shape {landmarks.shape}")
    width, height = (int(v) for v in frame_size)
    if width <= 0 or height <= 0:
        raise ValueError(f"frame_size must be (width, height) > 0, got {frame_size}")
    geometry = face_geometry(landmarks)
    if np.isnan(geometry).any(axis=1).all():
        raise ValueError(f"no face in any of the {len(landmarks)} frames")
    geometry = fill_gaps(geometry)
    side = round(min(float(np.median(geometry[:, 2])), width, height))
    if side < 16:
        raise ValueError(f"face too small for a lip-sync crop: side {side} px (needs >= 16)")
    centre = moving_average(geometry[:, :2], window)
    x1 = np.clip(np.round(centre[:, 0] - side / 2), 0, width - side).astype(np.int32)
    y1 = np.clip(np.round(centre[:, 1]), 0, height - side).astype(np.int32)
    return np.stack([x1, y1, x1 + side, y1 + side], axis=1).astype(np.int32)


def mouth_in_crop(landmarks: np.ndarray, rects: np.ndarray) -> tuple[float, float, float]:
    """Median mouth (centre x, corner-line y, corner-to-corner width) over the frames with
    landmarks, in 328-crop pixel indices (pixel k's centre at k, as ``cv2.remap`` counts):
    where ``MouthSynth`` opens the mouth."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    known = ~np.isnan(landmarks).any(axis=(1, 2))
    if not known.any():
        raise ValueError("no frame has landmarks")
    marks, boxes = landmarks[known], np.asarray(rects, dtype=np.float64)[known]
    scale = CROP_SIZE / (boxes[:, 2] - boxes[:, 0])
    left, right = marks[:, 3], marks[:, 4]
    cx = ((left[:, 0] + right[:, 0]) / 2 - boxes[:, 0]) * scale - 0.5
    cy = ((left[:, 1] + right[:, 1]) / 2 - boxes[:, 1]) * scale - 0.5
    mouth_width = np.linalg.norm(right - left, axis=1) * scale
    return (round(float(np.median(cx)), 1), round(float(np.median(cy)), 1), round(float(np.median(mouth_width)), 1))


def check_rect(rect: Sequence[int], frame_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """``rect`` as four ints after checking that it is a non-empty square inside the frame."""
    if len(rect) != 4:
        raise ValueError(f"crop rectangle must be (x1, y1, x2, y2), got {rect!r}")
    x1, y1, x2, y2 = (int(v) for v in rect)
    height, width = frame_shape[:2]
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height and x2 - x1 == y2 - y1):
        raise ValueError(f"crop rectangle {[x1, y1, x2, y2]} is not a square inside the {width}x{height} frame")
    return x1, y1, x2, y2


def cut_crop(frame_rgb: np.ndarray, rect: Sequence[int]) -> np.ndarray:
    """The rectangle of an H x W x 3 uint8 frame resized (cubic, as the seeds) to 328 x 328."""
    x1, y1, x2, y2 = check_rect(rect, frame_rgb.shape)
    return cv2.resize(frame_rgb[y1:y2, x1:x2], (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_CUBIC)


def bgr_tensor(crops_rgb: Sequence[np.ndarray] | np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 ``[B, 3, 328, 328]`` BGR on ``device`` from RGB 328 x 328 x 3 crops (one copy
    to the device, the channel flip there)."""
    stacked = torch.from_numpy(np.ascontiguousarray(np.stack(list(crops_rgb)))).to(device)
    if stacked.ndim != 4 or stacked.shape[1:] != (CROP_SIZE, CROP_SIZE, 3) or stacked.dtype != torch.uint8:
        raise ValueError(f"crops must be uint8 {CROP_SIZE}x{CROP_SIZE}x3, got {tuple(stacked.shape)} {stacked.dtype}")
    return stacked.permute(0, 3, 1, 2).flip(1).contiguous()


def unet_inputs(crops_bgr: torch.Tensor) -> torch.Tensor:
    """The U-Net's ``[B, 6, 320, 320]`` float input from uint8 ``[B, 3, 328, 328]`` BGR crops.

    Channels 0-2: the inner 320 crop / 255 (the reference the model copies identity and
    pose from); channels 3-5: the same with the mask rectangle zeroed (the seeds'
    ``torch.cat([img_real_ex_T, img_masked_T])``). Runs on the tensor's device.
    """
    if crops_bgr.ndim != 4 or crops_bgr.shape[1:] != (3, CROP_SIZE, CROP_SIZE) or crops_bgr.dtype != torch.uint8:
        raise ValueError(f"crops must be uint8 [B, 3, {CROP_SIZE}, {CROP_SIZE}], "
                         f"got {tuple(crops_bgr.shape)} {crops_bgr.dtype}")
    real = crops_bgr[:, :, BORDER:BORDER + INNER, BORDER:BORDER + INNER].float().div_(255.0)
    masked = real.clone()
    masked[:, :, MASK_ROWS, MASK_COLS] = 0.0
    return torch.cat([real, masked], dim=1)


def patches_rgb(prediction_bgr: torch.Tensor) -> np.ndarray:
    """uint8 ``[B, 320, 320, 3]`` RGB patches (numpy, CPU) from the U-Net's ``[B, 3, 320, 320]``
    BGR output in 0..1. Rounds to nearest (the seeds truncate, a -0.5 level bias)."""
    if prediction_bgr.ndim != 4 or prediction_bgr.shape[1:] != (3, INNER, INNER):
        raise ValueError(f"prediction must be [B, 3, {INNER}, {INNER}], got {tuple(prediction_bgr.shape)}")
    as_bytes = prediction_bgr.detach().float().mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return as_bytes.flip(1).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def inner(crop_328: np.ndarray) -> np.ndarray:
    """The model's 320 x 320 view of a 328 crop (a view, not a copy)."""
    return crop_328[BORDER:BORDER + INNER, BORDER:BORDER + INNER]
