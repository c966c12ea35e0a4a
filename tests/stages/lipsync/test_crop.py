"""The lip-sync crop: geometry from landmarks, smoothing, cutting, and the U-Net's input layout."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from stages.lipsync.crop import (
    CROP_SIZE,
    INNER,
    bgr_tensor,
    cut_crop,
    inner,
    mouth_in_crop,
    patches_rgb,
    rects_from_landmarks,
    unet_inputs,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


@pytest.fixture(scope="module")
def astronaut() -> tuple[np.ndarray, np.ndarray]:
    """The photo (RGB) and its hand-placed five landmarks [5, 2]."""
    rgb = cv2.cvtColor(cv2.imread(str(FIXTURES / "astronaut_640x480.jpg")), cv2.COLOR_BGR2RGB)
    points = json.loads((FIXTURES / "astronaut_landmarks.json").read_text())["points"]
    return rgb, np.asarray(points, dtype=np.float64)


def test_rect_covers_the_lower_face_like_the_seeds(astronaut) -> None:
    _, marks = astronaut
    (x1, y1, x2, y2), = rects_from_landmarks(marks[None], (640, 480)).tolist()
    side = x2 - x1
    assert side == y2 - y1
    assert 110 <= side <= 118            # cheek to cheek: her face is ~112 px wide at the eyes
    eye_y = marks[:2, 1].mean()
    assert abs(y1 - eye_y) <= 1          # top on the eye line
    assert 226 <= y2 <= 250              # one face width down: below the chin (y ~213), into the neck
    # The mouth lies inside the masked area of the 320 view, well away from its edges.
    scale = CROP_SIZE / side
    for x, y in marks[2:]:
        cx, cy = (x - x1) * scale - 4, (y - y1) * scale - 4
        assert 40 < cx < INNER - 40 and 40 < cy < INNER - 100, (x, y, cx, cy)
    mouth_y = (marks[3:, 1].mean() - y1) / side
    assert 0.38 < mouth_y < 0.46


def test_side_is_fixed_and_the_centre_smoothed() -> None:
    rng = np.random.default_rng(0)
    base = np.array([[254.0, 126.0], [308.3, 129.0], [279.5, 158.5], [254.5, 175.0], [305.5, 176.5]])
    drift = np.linspace(0, 20, 60)[:, None, None] * np.array([1.0, 0.5])  # a slow head movement
    jitter = rng.normal(0, 1.5, (60, 5, 2))
    rects = rects_from_landmarks(base + drift + jitter, (640, 480))
    sides = rects[:, 2] - rects[:, 0]
    assert (sides == sides[0]).all() and (rects[:, 3] - rects[:, 1] == sides).all()
    raw = rects_from_landmarks(base + drift + jitter, (640, 480), window=1)
    steps = lambda r: np.abs(np.diff(r[:, 0].astype(float), 2)).mean()
    assert steps(rects) < 0.5 * steps(raw)
    assert abs(float(rects[-1, 0] - rects[0, 0]) - 20) <= 3  # the movement itself is followed


def test_frames_without_a_face_are_interpolated() -> None:
    base = np.array([[254.0, 126.0], [308.3, 129.0], [279.5, 158.5], [254.5, 175.0], [305.5, 176.5]])
    marks = np.stack([base + [dx, 0] for dx in (0, 10, 20, 30, 40)])
    marks[2] = np.nan
    rects = rects_from_landmarks(marks, (640, 480), window=1)
    assert rects[2, 0] == pytest.approx((rects[1, 0] + rects[3, 0]) / 2, abs=1)
    marks[:] = np.nan
    with pytest.raises(ValueError, match="no face in any of the 5 frames"):
        rects_from_landmarks(marks, (640, 480))


def test_rects_stay_inside_the_frame() -> None:
    corner = np.array([[4.0, 3.0], [58.0, 4.0], [30.0, 30.0], [8.0, 50.0], [56.0, 50.0]])
    rects = rects_from_landmarks(corner[None] - [20, 0], (640, 480))
    x1, y1, x2, y2 = rects[0]
    assert x1 == 0 and y1 >= 0 and x2 - x1 == y2 - y1
    huge = corner * 8
    (x1, y1, x2, y2), = rects_from_landmarks(huge[None], (200, 150)).tolist()
    assert (x1, y1, x2, y2) == (x1, 0, x1 + 150, 150) and 0 <= x1 <= 50
    with pytest.raises(ValueError, match=r"\[N, 5, 2\]"):
        rects_from_landmarks(np.zeros((3, 4, 2)), (640, 480))


def test_mouth_position_in_the_crop(astronaut) -> None:
    _, marks = astronaut
    rects = rects_from_landmarks(marks[None], (640, 480))
    cx, cy, width = mouth_in_crop(marks[None], rects)
    side = rects[0, 2] - rects[0, 0]
    assert cx == pytest.approx(((254.5 + 305.5) / 2 - rects[0, 0]) * 328 / side - 0.5, abs=0.1)
    assert width == pytest.approx(51.0 * 328 / side, abs=1)
    assert 130 < cy < 150


def test_cut_crop(astronaut) -> None:
    rgb, _ = astronaut
    crop = cut_crop(rgb, [200, 100, 300, 200])
    assert crop.shape == (CROP_SIZE, CROP_SIZE, 3) and crop.dtype == np.uint8
    expected = cv2.resize(rgb[100:200, 200:300], (328, 328), interpolation=cv2.INTER_CUBIC)
    assert np.array_equal(crop, expected)
    for bad in ([600, 100, 700, 200], [200, 100, 300, 201], [10, 10, 10, 10], [-1, 0, 99, 100]):
        with pytest.raises(ValueError, match="not a square inside the 640x480 frame"):
            cut_crop(rgb, bad)


def test_unet_inputs_match_the_seeds_layout() -> None:
    rng = np.random.default_rng(1)
    crops_bgr = rng.integers(0, 256, (2, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
    x = unet_inputs(torch.from_numpy(crops_bgr).permute(0, 3, 1, 2))
    assert x.shape == (2, 6, INNER, INNER) and x.dtype == torch.float32
    for b in range(2):
        real = crops_bgr[b, 4:324, 4:324].copy()
        masked = cv2.rectangle(real.copy(), (5, 5, 310, 305), (0, 0, 0), -1)  # the seeds' mask, literally
        assert torch.equal(x[b, :3], torch.from_numpy(real.transpose(2, 0, 1).astype(np.float32) / 255.0))
        assert torch.equal(x[b, 3:], torch.from_numpy(masked.transpose(2, 0, 1).astype(np.float32) / 255.0))
    assert (x[:, 3:, 5:310, 5:315] == 0).all() and (x[:, 3:, 4, :] != 0).any() and (x[:, 3:, 310, :] != 0).any()


def test_unet_inputs_refuse_wrong_crops() -> None:
    with pytest.raises(ValueError, match="uint8"):
        unet_inputs(torch.zeros(1, 3, CROP_SIZE, CROP_SIZE))
    with pytest.raises(ValueError, match="328"):
        unet_inputs(torch.zeros(1, 3, 320, 320, dtype=torch.uint8))


def test_rgb_bgr_round_trip(astronaut) -> None:
    rgb, _ = astronaut
    crops = [cut_crop(rgb, [200, 100, 300, 200]), cut_crop(rgb, [250, 150, 330, 230])]
    tensor = bgr_tensor(crops)
    assert tensor.shape == (2, 3, CROP_SIZE, CROP_SIZE) and tensor.dtype == torch.uint8
    assert torch.equal(tensor[0, 0], torch.from_numpy(crops[0][..., 2]))  # channel 0 is blue
    prediction = unet_inputs(tensor)[:, :3]       # an "identity model": its output = the real crop
    patches = patches_rgb(prediction)
    assert patches.shape == (2, INNER, INNER, 3) and patches.dtype == np.uint8
    for crop, patch in zip(crops, patches):
        assert np.array_equal(patch, inner(crop))
    with pytest.raises(ValueError, match="prediction"):
        patches_rgb(torch.zeros(1, 3, 328, 328))
