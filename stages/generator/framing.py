"""Where the portrait looks: the primary face, its landmark-aligned crop, and easing.

A portrait is a square window onto the camera frame, described by a ``Framing``: its
centre, side and rotation. This module decides that window per frame and cuts it out:

* ``choose_primary`` — the face the portrait follows: the one it followed last frame as
  long as that face is still confirmed (a second person walking in does not steal the
  portrait), otherwise the largest confirmed face. Vision only reports faces confirmed in
  the current frame, so a stale or false box cannot be chosen here.
* ``face_framing`` — the window around a face from its five landmarks: rotated so the
  eye line is level, centred between eyes and mouth (moved down by ``drop`` to show the
  chin), sized from the inter-ocular and eye-to-mouth distances so it does not breathe
  with the detector's box. Without landmarks, the box is used unrotated.
* ``full_frame`` — with no face, the whole frame, letterboxed: a calm picture of the
  scene rather than an arbitrary crop of it.
* ``FaceFollower`` — all of the above for one session, holding the face through short gaps;
  ``PortraitConfig`` holds its settings (and per-session state bounds) for every portrait
  stage's config section.
* ``FramingEaser`` — glides from the current window to the target with a time constant
  (exponential approach on the capture clock), so a new primary face, a face that comes
  or goes or a jittery box never makes the portrait jump.
* ``cut_out`` — samples the window into a ``size`` x ``size`` float image with one
  ``grid_sample`` on the frame's device (rotation and scale in one resampling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from core.config import check, check_range


@dataclass(kw_only=True, slots=True)
class PortraitConfig:
    """The fields every portrait stage shares (generator, diffusion): how it frames the
    face and how long it keeps per-session state. Stage configs extend it and call
    ``check_portrait`` from their ``__post_init__``."""

    face_margin: float = 0.45
    """Context kept around the face on each side, as a fraction of the face size (0..3)."""
    face_drop: float = 0.06
    """Window centre moved down the face by this fraction of its size, to show the chin."""
    min_face_quality: float = 0.0
    """Faces whose ``quality`` is below this are ignored (the frame counts as no-face)."""
    fallback_confidence: float = 0.5
    """Emotion confidence used when there is no face or the face has no probabilities."""
    face_hold_s: float = 0.3
    """After the primary face disappears, its framing and mood are kept this long before
    the portrait eases out to the whole frame (a missed frame or a blink does not zoom out)."""
    ease_s: float = 0.25
    """Time constant of the window's glide toward its target, in seconds (0 = no easing)."""
    max_sessions_state: int = 32
    """Sessions whose state is kept; the least recently seen is dropped beyond."""
    session_idle_s: float = 30.0
    """A session unseen for this long loses its state."""

    def check_portrait(self) -> None:
        check_range(self.face_margin, "face_margin", 0.0, 3.0)
        check_range(self.face_drop, "face_drop", -1.0, 1.0)
        check_range(self.min_face_quality, "min_face_quality", 0.0, 1.0)
        check_range(self.fallback_confidence, "fallback_confidence", 0.0, 1.0)
        check_range(self.face_hold_s, "face_hold_s", 0.0, 10.0)
        check_range(self.ease_s, "ease_s", 0.0, 5.0)
        check(self.max_sessions_state >= 1, "max_sessions_state", f"must be >= 1, got {self.max_sessions_state}")
        check(self.session_idle_s > 0.0, "session_idle_s", f"must be > 0, got {self.session_idle_s}")


EYE_WIDTHS_PER_FACE = 2.2
"""Face width (ear to ear at eye height) in inter-ocular distances, for typical adults."""
MOUTHS_PER_FACE = 2.6
"""Face height (brow to chin) in eye-to-mouth distances."""
MAX_ROTATION = math.radians(40)
"""Larger eye-line angles are landmark errors or people lying down: not levelled."""


@dataclass(frozen=True, slots=True)
class Framing:
    """A square window onto the frame: centre and side in input pixels, rotation in radians
    (the window's x axis points along ``angle`` in the frame; positive turns clockwise on
    screen, since image y points down)."""

    cx: float
    cy: float
    side: float
    angle: float = 0.0

    def fits(self, width: int, height: int) -> bool:
        """Whether the unrotated window lies inside a ``width`` x ``height`` frame (a held
        framing may not, once the capture size changed)."""
        half = self.side / 2.0
        return half <= self.cx <= width - half and half <= self.cy <= height - half

    def box(self) -> list[int]:
        """The unrotated window as [x, y, w, h] (for reporting)."""
        half = self.side / 2.0
        return [round(self.cx - half), round(self.cy - half), round(self.side), round(self.side)]


def choose_primary(faces: Sequence[dict[str, Any]], previous_id: Any,
                   min_quality: float = 0.0) -> dict[str, Any] | None:
    """The face to portray: ``previous_id`` while it is still among ``faces``, else the
    largest; faces below ``min_quality`` or without a usable box never count."""
    usable = [f for f in faces if _box_of(f) is not None and float(f.get("quality", 1.0)) >= min_quality]
    if previous_id is not None:
        for face in usable:
            if face.get("face_id") == previous_id:
                return face
    return max(usable, key=lambda f: _box_of(f)[2] * _box_of(f)[3], default=None)


def face_framing(face: dict[str, Any], margin: float, drop: float, width: int, height: int) -> Framing:
    """The window around ``face`` (see the module docstring), kept inside the frame."""
    x, y, w, h = _box_of(face)
    points = face.get("landmarks")
    if points and len(points) == 5:
        (lx, ly), (rx, ry), _, (mlx, mly), (mrx, mry) = ((float(px), float(py)) for px, py in points)
        eye = ((lx + rx) / 2.0, (ly + ry) / 2.0)
        mouth = ((mlx + mrx) / 2.0, (mly + mry) / 2.0)
        ocular = math.hypot(rx - lx, ry - ly)
        eye_mouth = math.hypot(mouth[0] - eye[0], mouth[1] - eye[1])
        size = max(EYE_WIDTHS_PER_FACE * ocular, MOUTHS_PER_FACE * eye_mouth, 1.0)
        angle = math.atan2(ry - ly, rx - lx)
        if abs(angle) > MAX_ROTATION:
            angle = 0.0
        # Down the face's own vertical axis (perpendicular to the eye line).
        down = (-math.sin(angle), math.cos(angle))
        cx = (eye[0] + mouth[0]) / 2.0 + down[0] * drop * size
        cy = (eye[1] + mouth[1]) / 2.0 + down[1] * drop * size
    else:
        size, angle = max(w, h), 0.0
        cx, cy = x + w / 2.0, y + h / 2.0 + drop * h
    side = min(size * (1.0 + 2.0 * margin), float(min(width, height)))
    half = side / 2.0
    return Framing(cx=min(max(cx, half), width - half), cy=min(max(cy, half), height - half),
                   side=side, angle=angle)


def full_frame(width: int, height: int) -> Framing:
    """The whole frame, centred in a square (letterboxed)."""
    return Framing(cx=width / 2.0, cy=height / 2.0, side=float(max(width, height)))


class FaceFollower:
    """One session's portrait window: follows the primary face, keeps its framing and the
    face itself through gaps shorter than ``hold_s`` (a missed detection does not zoom
    out), then eases out to the whole frame."""

    @classmethod
    def from_config(cls, config: PortraitConfig) -> "FaceFollower":
        return cls(margin=config.face_margin, drop=config.face_drop, hold_s=config.face_hold_s,
                   ease_s=config.ease_s, min_quality=config.min_face_quality)

    def __init__(self, *, margin: float, drop: float, hold_s: float, ease_s: float, min_quality: float) -> None:
        self.margin, self.drop, self.hold_s, self.min_quality = margin, drop, hold_s, min_quality
        self.easer = FramingEaser(ease_s)
        self.face: dict[str, Any] | None = None
        """The face followed (as last seen), or None."""
        self._primary_id: Any = None
        self._target: Framing | None = None
        self._seen = 0.0

    @property
    def face_id(self) -> Any:
        """The followed face's id, or None."""
        return None if self.face is None else self._primary_id

    def follow(self, faces: Sequence[dict[str, Any]], width: int, height: int, t: float) -> Framing:
        """The window for a ``width`` x ``height`` frame captured at ``t`` seconds."""
        face = choose_primary(faces, self._primary_id, self.min_quality)
        if face is not None:
            self._primary_id, self.face, self._seen = face.get("face_id"), face, t
            self._target = face_framing(face, self.margin, self.drop, width, height)
        elif self._target is None or t - self._seen > self.hold_s or not self._target.fits(width, height):
            self._primary_id, self._target, self.face = None, None, None
        return self.easer.step(self._target or full_frame(width, height), t)


class FramingEaser:
    """Eases a session's window toward each new target with time constant ``tau_s``."""

    def __init__(self, tau_s: float) -> None:
        self.tau_s = tau_s
        self.current: Framing | None = None
        self._clock: float | None = None

    def step(self, target: Framing, t: float) -> Framing:
        """The window at capture time ``t`` (seconds); the first call snaps to ``target``.

        Time going backwards (reordered frames) or standing still moves nothing; a long
        pause moves at most all the way."""
        if self.current is None or self._clock is None or self.tau_s <= 0.0:
            self.current, self._clock = target, t
            return target
        dt = max(0.0, t - self._clock)
        self._clock = max(self._clock, t)
        k = 1.0 - math.exp(-dt / self.tau_s)
        c = self.current
        self.current = Framing(cx=c.cx + k * (target.cx - c.cx), cy=c.cy + k * (target.cy - c.cy),
                               side=c.side + k * (target.side - c.side), angle=c.angle + k * (target.angle - c.angle))
        return self.current


def cut_out(frame: torch.Tensor, framing: Framing, size: int) -> torch.Tensor:
    """The window of an H x W x 3 uint8 frame as a [1, 3, size, size] float image in 0..1,
    on the frame's device; parts outside the frame are black."""
    height, width = int(frame.shape[0]), int(frame.shape[1])
    # Only the window's bounding region is converted to float and resampled.
    reach = framing.side / 2.0 * (abs(math.cos(framing.angle)) + abs(math.sin(framing.angle)))
    x0 = max(0, int(math.floor(framing.cx - reach)))
    y0 = max(0, int(math.floor(framing.cy - reach)))
    x1 = min(width, int(math.ceil(framing.cx + reach)))
    y1 = min(height, int(math.ceil(framing.cy + reach)))
    if x1 <= x0 or y1 <= y0:
        return torch.zeros(1, 3, size, size, device=frame.device)
    region = frame[y0:y1, x0:x1].permute(2, 0, 1).unsqueeze(0)
    cx, cy, side = framing.cx - x0, framing.cy - y0, framing.side
    shrink = side / size
    if shrink > 1.5:
        # grid_sample does not filter: pre-shrink (antialiased) so it resamples near 1:1.
        rw, rh = max(1, round(region.shape[3] / shrink)), max(1, round(region.shape[2] / shrink))
        fx, fy = rw / region.shape[3], rh / region.shape[2]
        if region.device.type == "cpu":  # the CPU has a SIMD uint8 path for this resize
            region = F.interpolate(region, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
        else:
            region = F.interpolate(region.float(), size=(rh, rw), mode="bilinear", antialias=True,
                                   align_corners=False)
        cx, cy, side = cx * fx, cy * fy, side * (fx + fy) / 2.0
    region = region.float().div_(255.0)
    rh, rw = region.shape[2], region.shape[3]
    cos, sin = math.cos(framing.angle), math.sin(framing.angle)
    # Output (u, v) in -1..1 -> frame pixel centre + R(angle) (u, v) side/2 -> grid_sample's
    # -1..1 (align_corners=False: -1 and 1 are the outer edges of the border pixels).
    theta = torch.tensor([[[side * cos / rw, -side * sin / rw, 2.0 * cx / rw - 1.0],
                           [side * sin / rh, side * cos / rh, 2.0 * cy / rh - 1.0]]],
                         dtype=region.dtype, device=region.device)
    grid = F.affine_grid(theta, [1, 3, size, size], align_corners=False)
    return F.grid_sample(region, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp_(0.0, 1.0)


def _box_of(face: dict[str, Any]) -> tuple[float, float, float, float] | None:
    box = face.get("bbox")
    if not box or len(box) != 4:
        return None
    x, y, w, h = (float(v) for v in box)
    return (x, y, w, h) if w > 0 and h > 0 else None
