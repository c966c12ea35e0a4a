"""The non-neural mouth: opens the avatar's mouth with loudness, by warping pixels. No network.

This is the clearly labelled fallback for avatars without a trained lip-sync model (the
default astronaut). It knows nothing about phonemes; it is driven by one real audio
value per video frame, ``opening`` in 0..1 (the lead maps voice activity and loudness to
it), and must look like a mouth that opens and closes with the voice, not like a
generator's output.

Where the mouth is: ``crop.rects_from_landmarks`` puts the crop's top on the eye line and
makes it one face width tall, so the mouth-corner line sits at ~0.42 of the crop's
height, centred horizontally, the mouth ~0.45-0.5 of the crop wide (``crop.DEFAULT_MOUTH``:
x 164, corner line y 139, width 155 in 328-crop pixels). Each avatar records its own
measured mouth in ``Manifest.mouth`` (pass it as ``MouthSynth(mouth=...)``), including
the lip line: where the lips meet at the mouth's centre, which is below the corner line
(a little for a neutral mouth, a lot for a smile). ``find_lip_line`` finds it: the lower
edge of visible upper teeth, else the darkest row between the lips.

How it opens (all in the 328 crop, then the inner 320 is returned like a model's output):

* the lip line runs from the corners (corner-line height) down to the lip line at the
  centre (a parabola); the gap opens along it as a lens ``G(x) = opening * max_gap * w *
  (1 - v^2)^1.5`` tall (v = distance from the centre / half the mouth width): largest at
  the centre, closing smoothly at the corners;
* the upper lip moves up by ``up * G(x)``, the lower lip and jaw down by
  ``(1 - up) * G(x)``; below, the displacement stays constant over a rigid part of the jaw
  and then falls off smoothly (smoothstep) towards the neck; above, it falls off towards
  the nose. Nothing outside ``box()`` moves. It is an inverse map (each output pixel reads
  its source row; pixels only move vertically), monotonic in y, so nothing folds over;
* the gap shows a dark mouth interior, darkest in the middle and lit a little near the
  lips, tinted by the lips' own colour so it takes the avatar's lighting, anti-aliased.

At ``opening == 0`` the inner crop is returned unchanged, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from stages.lipsync.crop import BORDER, CROP_SIZE, DEFAULT_MOUTH, INNER

INTERIOR_RGB = np.array([30.0, 9.0, 12.0], dtype=np.float32)
"""Colour of the open mouth's interior at its darkest (dark red-brown)."""
EDGE_MARGIN = 4
"""Rows next to the inner crop's top and bottom edge that the warp never moves."""
LIP_LIGHT = 0.45
"""How much lighter the interior gets next to the lips (fraction of the darkest colour added)."""


def smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def find_lip_line(crop_rgb_328: np.ndarray, mouth: Sequence[float]) -> float:
    """Where the lips meet at the mouth's centre (y in 328-crop pixel rows), given ``mouth`` =
    (centre x, corner-line y, width[, ...]).

    Looks at the central columns (±15 % of the mouth width) from just above the corner line
    to 35 % of the mouth width below it. Rows of teeth are much less saturated than the
    chin's skin and at least as bright: if there are some, the lips part at the lower edge
    of the upper teeth. Otherwise the mouth is closed and the lips meet at the darkest row.
    """
    cx, cy, width = (float(v) for v in mouth[:3])
    hsv = cv2.cvtColor(crop_rgb_328, cv2.COLOR_RGB2HSV).astype(np.float32)
    c0, c1 = max(0, round(cx - 0.15 * width)), min(CROP_SIZE, round(cx + 0.15 * width) + 1)
    r0, r1 = max(0, round(cy - 0.05 * width)), min(CROP_SIZE, round(cy + 0.35 * width) + 1)
    if c1 - c0 < 3 or r1 - r0 < 5:
        return cy
    chin = hsv[min(CROP_SIZE - 2, round(cy + 0.38 * width)):min(CROP_SIZE, round(cy + 0.5 * width) + 1), c0:c1]
    if chin.size == 0:
        chin = hsv[r1 - 2:r1, c0:c1]
    skin_s, skin_v = float(np.median(chin[..., 1])), float(np.median(chin[..., 2]))
    band = hsv[r0:r1, c0:c1]
    teeth = ((band[..., 1] < 0.7 * skin_s) & (band[..., 2] > 0.9 * skin_v)).mean(axis=1) > 0.6
    rows = np.flatnonzero(teeth)
    if len(rows) >= max(3, round(0.04 * width)):
        end = rows[0]
        for row in rows[1:]:  # the first run of teeth rows (one-row holes allowed): the upper teeth
            if row > end + 2:
                break
            end = row
        return float(r0 + end) + 0.5  # between the last teeth row and the lower lip
    gray = cv2.cvtColor(crop_rgb_328, cv2.COLOR_RGB2GRAY).astype(np.float32)[r0:r1, c0:c1].mean(axis=1)
    smooth = np.convolve(gray, np.ones(3) / 3, mode="valid")  # smooth[k] is centred on band row k + 1
    limit = max(1, min(len(smooth), round(0.3 * width)))     # a closed mouth's lips meet near the corners
    return float(r0 + 1 + int(np.argmin(smooth[:limit])))


class MouthSynth:
    """Opens the mouth of 328 crops in proportion to ``opening``; see the module docstring.

    ``mouth`` = (centre x, corner-line y, width[, lip-line y]) in 328-crop pixels (a
    manifest's ``mouth``; without the lip line it is taken 6 % of the width below the
    corners); ``max_gap`` = lip gap at opening 1 as a fraction of the mouth width; ``up``
    = the upper lip's share of the gap; ``above``/``below`` = how far (in mouth widths)
    the displacement reaches above the upper lip and below the lower lip; ``rigid`` = the
    part of ``below`` that moves as one piece with the lower lip (the jaw).
    """

    def __init__(self, mouth: Sequence[float] | None = None, *, max_gap: float = 0.3, up: float = 0.25,
                 above: float = 0.35, below: float = 0.9, rigid: float = 0.4) -> None:
        values = [float(v) for v in (DEFAULT_MOUTH if mouth is None else mouth)]
        if len(values) == 3:
            values.append(values[1] + 0.06 * values[2])
        if len(values) != 4 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"mouth must be (x, corner_y, width[, lip_y]), got {mouth!r}")
        cx, cy, width, lip = values
        if not (0 <= cx <= CROP_SIZE and 0 <= cy <= CROP_SIZE and 8 <= width <= CROP_SIZE
                and cy - 0.1 * width <= lip <= cy + 0.5 * width):
            raise ValueError(f"mouth must lie inside the {CROP_SIZE} crop, width >= 8, lip line within "
                             f"-0.1..0.5 widths of the corner line; got {mouth!r}")
        for name, value, low, high in (("max_gap", max_gap, 0.0, 1.0), ("up", up, 0.0, 1.0),
                                       ("above", above, 0.05, 2.0), ("below", below, 0.05, 3.0),
                                       ("rigid", rigid, 0.0, 0.9)):
            if not low <= value <= high:
                raise ValueError(f"{name} must be in {low}..{high}, got {value}")
        self.mouth = (cx, cy, width, lip)
        self.max_gap, self.up, self.rigid = max_gap * width, up, rigid
        # The warp must fade out inside the model's 320 view: the compositor pastes only that,
        # and a displaced pixel at its edge would leave a step against the untouched border.
        low_edge, high_edge = BORDER + EDGE_MARGIN, BORDER + INNER - 1 - EDGE_MARGIN
        self.above = min(above * width, max(4.0, min(cy, lip) - up * self.max_gap - low_edge))
        self.below = min(below * width, max(4.0, high_edge - max(cy, lip) - (1 - up) * self.max_gap))
        half = 0.5 * width
        self.x0, self.x1 = max(0, math.floor(cx - half)), min(CROP_SIZE, math.ceil(cx + half) + 1)
        xs = np.arange(self.x0, self.x1, dtype=np.float32)
        v = np.clip(np.abs(xs + 0.5 - cx) / half, 0.0, 1.0)[None, :]
        self.shape = ((1.0 - v * v) ** 1.5).astype(np.float32)
        self.lip = (cy + (lip - cy) * (1.0 - v * v)).astype(np.float32)
        reach_up = self.above + self.up * self.max_gap
        reach_down = self.below + (1 - self.up) * self.max_gap
        self.y0 = max(BORDER, math.floor(min(cy, lip) - reach_up) - 1)
        self.y1 = min(BORDER + INNER, math.ceil(max(cy, lip) + reach_down) + 2)
        self.ys = np.arange(self.y0, self.y1, dtype=np.float32)[:, None]
        self.map_x = np.ascontiguousarray(np.broadcast_to(xs[None, :], (self.y1 - self.y0, len(xs)))).astype(np.float32)

    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) in 328-crop pixels outside which ``render`` never changes a pixel."""
        return self.x0, self.y0, self.x1, self.y1

    def source_rows(self, opening: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each output pixel of ``box()``: the source row it reads, the interior's weight
        (0 outside the lip gap) and the position across the gap (0 at the lips, 1 mid-gap)."""
        gap = opening * self.max_gap * self.shape
        top = self.lip - self.up * gap
        bottom = self.lip + (1 - self.up) * gap
        ys = self.ys
        above = smoothstep(1.0 - (top - ys) / self.above)       # 1 at the upper lip, 0 at the reach
        below = 1.0 - smoothstep(((ys - bottom) / self.below - self.rigid) / (1.0 - self.rigid))
        rows = np.where(ys <= top, ys + (self.lip - top) * above,
                        np.where(ys >= bottom, ys - (bottom - self.lip) * below, self.lip))
        inside = np.minimum(ys + 0.5 - top, bottom - (ys - 0.5))  # pixel-row overlap with the gap
        weight = np.clip(inside, 0.0, 1.0)
        depth = np.clip(np.minimum(ys + 0.5 - top, bottom - ys - 0.5) / np.maximum(gap / 2, 1e-3), 0.0, 1.0)
        return rows.astype(np.float32), weight.astype(np.float32), depth.astype(np.float32)

    def render(self, crop_rgb_328: np.ndarray, opening: float) -> np.ndarray:
        """The 320 x 320 x 3 uint8 RGB patch (the inner crop) with the mouth opened by ``opening``
        (clamped to 0..1)."""
        if crop_rgb_328.shape != (CROP_SIZE, CROP_SIZE, 3) or crop_rgb_328.dtype != np.uint8:
            raise ValueError(f"crop must be uint8 {CROP_SIZE}x{CROP_SIZE}x3, got {crop_rgb_328.shape} "
                             f"{crop_rgb_328.dtype}")
        opening = float(opening)
        if not math.isfinite(opening):
            raise ValueError(f"opening must be a finite number in 0..1, got {opening}")
        opening = min(1.0, max(0.0, opening))
        if opening == 0.0:
            return crop_rgb_328[BORDER:BORDER + INNER, BORDER:BORDER + INNER].copy()
        rows, weight, depth = self.source_rows(opening)
        warped = cv2.remap(crop_rgb_328, self.map_x, rows, interpolation=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
        # Tint from the lips: the source pixels just above and below the lip line.
        lip_rows = np.clip(np.round(self.lip[0] + np.array([[-3.0], [3.0]])), 0, CROP_SIZE - 1).astype(int)
        tint = crop_rgb_328[lip_rows, np.arange(self.x0, self.x1)].astype(np.float32).mean(axis=0)
        tint = tint / np.maximum(tint.mean(axis=1, keepdims=True), 1.0)      # the lips' hue, not brightness
        shade = (1.0 + LIP_LIGHT * (1.0 - depth))[..., None]                 # lighter near the lips
        interior = INTERIOR_RGB * shade * (0.5 + 0.5 * tint[None, :, :])
        w = weight[..., None]
        region = warped * (1.0 - w) + interior * w
        out = crop_rgb_328.copy()
        out[self.y0:self.y1, self.x0:self.x1] = np.clip(region + 0.5, 0, 255).astype(np.uint8)
        return out[BORDER:BORDER + INNER, BORDER:BORDER + INNER].copy()
