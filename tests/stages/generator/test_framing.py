"""Primary face choice, landmark-aligned windows, easing and the cut-out itself."""

from __future__ import annotations

import math

import pytest
import torch

from stages.generator.framing import (
    FaceFollower,
    Framing,
    FramingEaser,
    choose_primary,
    cut_out,
    face_framing,
    full_frame,
)

W, H = 640, 480


def face(face_id, x, y, side=100, angle_deg=0.0, **extra):
    """A face whose five landmarks sit where a real face's do, tilted by ``angle_deg``."""
    cx, cy = x + side / 2, y + side / 2
    a = math.radians(angle_deg)

    def at(dx, dy):  # a point of the upright face, turned about the box centre
        return [cx + dx * math.cos(a) - dy * math.sin(a), cy + dx * math.sin(a) + dy * math.cos(a)]

    s = side
    points = [at(-0.2 * s, -0.12 * s), at(0.2 * s, -0.12 * s), at(0, 0.05 * s), at(-0.15 * s, 0.2 * s),
              at(0.15 * s, 0.2 * s)]
    return {"face_id": face_id, "bbox": [x, y, side, side], "landmarks": points, "quality": 0.9, **extra}


def test_primary_is_the_largest_then_sticky_while_it_stays():
    small, large = face(1, 50, 50, 60), face(2, 300, 100, 120)
    assert choose_primary([small, large], None)["face_id"] == 2
    # A larger face walking in does not steal the portrait from the one it follows.
    assert choose_primary([small, large], previous_id=1)["face_id"] == 1
    # Once the followed face is gone, the largest remaining one takes over.
    assert choose_primary([large], previous_id=1)["face_id"] == 2
    assert choose_primary([], previous_id=1) is None


def test_primary_ignores_low_quality_and_broken_boxes():
    blurry, sharp = face(1, 0, 0, 200, quality=0.1), face(2, 300, 0, 80)
    assert choose_primary([blurry, sharp], None, min_quality=0.5)["face_id"] == 2
    assert choose_primary([{"face_id": 3, "bbox": [1, 2]}, {"face_id": 4, "bbox": [0, 0, 0, 5]}], None) is None


def test_window_levels_the_eye_line_and_centres_the_face():
    upright = face_framing(face(1, 270, 190, 100), margin=0.5, drop=0.0, width=W, height=H)
    assert upright.angle == pytest.approx(0.0)
    # Centred between eyes and mouth; sized from the landmarks (2.2 eye distances), plus margins.
    assert (upright.cx, upright.cy) == pytest.approx((320, 244))
    assert upright.side == pytest.approx(2.2 * 40 * 2.0)
    tilted = face_framing(face(1, 270, 190, 100, angle_deg=20), margin=0.5, drop=0.0, width=W, height=H)
    assert math.degrees(tilted.angle) == pytest.approx(20.0)
    assert tilted.side == pytest.approx(upright.side)


def test_window_drop_moves_down_the_face_axis():
    tilted = face(1, 270, 190, 100, angle_deg=30)
    plain = face_framing(tilted, margin=0.5, drop=0.0, width=W, height=H)
    dropped = face_framing(tilted, margin=0.5, drop=0.1, width=W, height=H)
    dx, dy = dropped.cx - plain.cx, dropped.cy - plain.cy
    assert math.degrees(math.atan2(dy, dx)) == pytest.approx(90 + 30, abs=1e-6)


def test_window_stays_inside_the_frame():
    corner = face_framing(face(1, 600, 440, 60), margin=0.5, drop=0.0, width=W, height=H)
    half = corner.side / 2
    assert half <= corner.cx <= W - half and half <= corner.cy <= H - half
    huge = face_framing(face(1, 0, 0, 600), margin=1.0, drop=0.0, width=W, height=H)
    assert huge.side == H


def test_window_without_landmarks_uses_the_box():
    plain = face_framing({"face_id": 1, "bbox": [100, 100, 80, 120]}, margin=0.25, drop=0.0, width=W, height=H)
    assert (plain.cx, plain.cy, plain.side, plain.angle) == pytest.approx((140, 160, 180, 0))


def test_absurd_tilt_is_not_levelled():
    lying = face_framing(face(1, 270, 190, 100, angle_deg=80), margin=0.5, drop=0.0, width=W, height=H)
    assert lying.angle == 0.0


def test_easing_glides_on_the_capture_clock():
    easer = FramingEaser(tau_s=0.25)
    start, target = Framing(100, 100, 200), Framing(300, 200, 100)
    assert easer.step(start, 0.0) == start  # the first frame snaps
    after = easer.step(target, 0.25)  # one time constant: 63 % of the way
    assert after.cx == pytest.approx(100 + 200 * (1 - math.exp(-1)))
    assert easer.step(target, 0.20) == after  # a reordered, older frame moves nothing
    steps = [easer.step(target, 0.25 + 0.05 * i) for i in range(1, 40)]
    moves = [abs(b.cx - a.cx) for a, b in zip([after, *steps], steps)]
    assert all(m2 <= m1 + 1e-9 for m1, m2 in zip(moves, moves[1:]))  # never a jump, only slowing down
    assert steps[-1].cx == pytest.approx(300, abs=0.1)
    assert FramingEaser(tau_s=0.0).step(target, 5.0) == target


def test_full_frame_is_letterboxed():
    whole = full_frame(W, H)
    assert (whole.cx, whole.cy, whole.side) == (320, 240, 640)
    image = torch.full((H, W, 3), 200, dtype=torch.uint8)
    out = cut_out(image, whole, 64)
    assert out.shape == (1, 3, 64, 64)
    assert out[0, :, 32].min() == pytest.approx(200 / 255, abs=1e-3)  # the picture in the middle
    assert out[0, :, 2].max() == 0.0 and out[0, :, 61].max() == 0.0  # black bars above and below


def test_cut_out_samples_the_window():
    image = torch.zeros((H, W, 3), dtype=torch.uint8)
    image[200:280, 300:340] = 255  # a bright bar, taller than wide
    out = cut_out(image, Framing(320, 240, 160), 80)[0, 0]
    lit = (out > 0.5).nonzero()
    assert lit[:, 0].min() == 20 and lit[:, 0].max() == 59  # rows 200..279 -> 20..59
    assert lit[:, 1].min() == 30 and lit[:, 1].max() == 49
    # Turned by 90 degrees the bar lies across the window.
    turned = cut_out(image, Framing(320, 240, 160, angle=math.pi / 2), 80)[0, 0]
    lit = (turned > 0.5).nonzero()
    assert lit[:, 1].max() - lit[:, 1].min() > lit[:, 0].max() - lit[:, 0].min()


def test_cut_out_shrinks_large_windows_without_aliasing():
    stripes = torch.zeros((H, W, 3), dtype=torch.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: pure aliasing if sampled without filtering
    out = cut_out(stripes, Framing(320, 240, 480), 60)
    assert out[0, :, 5:-5, 5:-5].std() < 0.05 and out[0, :, 5:-5, 5:-5].mean() == pytest.approx(0.5, abs=0.05)


def test_cut_out_outside_the_frame_is_black():
    image = torch.full((H, W, 3), 255, dtype=torch.uint8)
    assert cut_out(image, Framing(-500, -500, 100), 16).max() == 0.0


def test_a_window_knows_whether_it_fits_a_frame():
    window = Framing(100, 100, 80)
    assert window.fits(640, 480) and window.fits(140, 140)
    assert not window.fits(120, 480)  # the capture shrank under a held framing


def test_the_follower_holds_a_face_through_a_short_gap_then_lets_go():
    follower = FaceFollower(margin=0.5, drop=0.0, hold_s=0.3, ease_s=0.0, min_quality=0.0)
    seen = follower.follow([face(4, 270, 190, 100)], W, H, t=10.0)
    assert follower.face_id == 4 and seen.side < H
    held = follower.follow([], W, H, t=10.2)  # a missed detection: same window, same face
    assert held == seen and follower.face_id == 4
    gone = follower.follow([], W, H, t=10.5)  # longer than hold_s: the whole frame
    assert gone == full_frame(W, H) and follower.face is None and follower.face_id is None
    smaller = follower.follow([face(4, 100, 100, 100)], 320, 240, t=10.6)
    # The capture shrank: the held window no longer fits, so it is let go at once.
    assert follower.follow([], 200, 150, t=10.7) == full_frame(200, 150)
    assert smaller.side <= 240
