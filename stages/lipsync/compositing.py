"""Putting a generated mouth back into the avatar frame.

The seeds' paste: the 320 x 320 prediction replaces the inner ``[4:324, 4:324]`` of the
frame's 328 crop, that crop is resized (cubic) back to the rectangle's size and written
over the rectangle. The up-then-down resampling is not quite the identity, so even a
perfect prediction leaves a faint square where the rectangle's edge meets untouched
pixels; ``feather_px`` hides it by blending the pasted square into the frame over a
ramp of that many pixels inside the rectangle's edge (where the model was shown the real
frame anyway: its mask keeps a 5-px border of the 320 crop).

During silence the caller does not paste at all: ``compose_frame`` with no patch returns
the background frame itself, bit for bit.

Frames coming from ``BackgroundCache`` are shared and read-only; ``paste_patch`` never
writes into its input, it returns a new frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import cv2
import numpy as np

from stages.lipsync.crop import BORDER, CROP_SIZE, INNER, check_rect, cut_crop


@lru_cache(maxsize=64)
def feather_weights(side: int, feather_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Blend weights ``(pasted, original)`` for a ``side`` x ``side`` square, float32, summing to 1:
    the pasted crop's weight rises smoothly (smoothstep) from 0 at the edge to 1 at
    ``feather_px`` inside it. Cached: one avatar has one side."""
    centres = np.arange(side, dtype=np.float32) + 0.5
    to_edge = np.minimum(centres, side - centres)
    distance = np.minimum(to_edge[:, None], to_edge[None, :])
    t = np.clip(distance / feather_px, 0.0, 1.0)
    pasted = (t * t * (3 - 2 * t)).astype(np.float32)
    pasted.setflags(write=False)
    original = (1.0 - pasted).astype(np.float32)
    original.setflags(write=False)
    return pasted, original


def paste_patch(frame_rgb: np.ndarray, rect: Sequence[int], patch_rgb_320: np.ndarray, feather_px: int = 0, *,
                crop328: np.ndarray | None = None) -> np.ndarray:
    """A new frame: ``frame_rgb`` with the 320 x 320 RGB ``patch`` pasted through ``rect``'s crop.

    ``crop328`` is ``cut_crop(frame_rgb, rect)`` if the caller already has it (it cut it
    for the model's input); it is not modified. ``feather_px`` > 0 blends the pasted
    square into the frame over that many pixels inside the rectangle's edge.
    """
    x1, y1, x2, y2 = check_rect(rect, frame_rgb.shape)
    if patch_rgb_320.shape != (INNER, INNER, 3) or patch_rgb_320.dtype != np.uint8:
        raise ValueError(f"patch must be uint8 {INNER}x{INNER}x3, got {patch_rgb_320.shape} {patch_rgb_320.dtype}")
    if type(feather_px) is not int or feather_px < 0:
        raise ValueError(f"feather_px must be an integer >= 0, got {feather_px!r}")
    if crop328 is None:
        crop = cut_crop(frame_rgb, rect)
    elif crop328.shape != (CROP_SIZE, CROP_SIZE, 3) or crop328.dtype != np.uint8:
        raise ValueError(f"crop328 must be uint8 {CROP_SIZE}x{CROP_SIZE}x3, got {crop328.shape} {crop328.dtype}")
    else:
        crop = crop328.copy()
    crop[BORDER:BORDER + INNER, BORDER:BORDER + INNER] = patch_rgb_320
    side = x2 - x1
    back = cv2.resize(crop, (side, side), interpolation=cv2.INTER_CUBIC)
    out = frame_rgb.copy()
    if feather_px == 0:
        out[y1:y2, x1:x2] = back
    else:
        pasted, original = feather_weights(side, min(feather_px, side // 2 or 1))
        out[y1:y2, x1:x2] = cv2.blendLinear(back, np.ascontiguousarray(frame_rgb[y1:y2, x1:x2]), pasted, original)
    return out


def compose_frame(frame_rgb: np.ndarray, rect: Sequence[int], patch_rgb_320: np.ndarray | None,
                  feather_px: int = 0, *, crop328: np.ndarray | None = None) -> np.ndarray:
    """The output frame: the background ``frame_rgb`` itself (not a copy) when there is no
    patch (silence: nothing was generated), else ``paste_patch``."""
    if patch_rgb_320 is None:
        return frame_rgb
    return paste_patch(frame_rgb, rect, patch_rgb_320, feather_px, crop328=crop328)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)
