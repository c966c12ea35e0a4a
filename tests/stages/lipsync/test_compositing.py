"""Pasting a mouth patch back: identity round trip, untouched surroundings, feathering, silence."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from stages.lipsync.compositing import compose_frame, feather_weights, paste_patch, psnr
from stages.lipsync.crop import INNER, cut_crop, inner

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
RECTS = ([225, 128, 337, 240], [100, 50, 400, 350], [0, 380, 100, 480], [540, 0, 640, 100])
"""The astronaut's lip-sync crop, a large one, and two touching the frame's corners."""


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    rgb = cv2.cvtColor(cv2.imread(str(FIXTURES / "astronaut_640x480.jpg")), cv2.COLOR_BGR2RGB)
    rgb.setflags(write=False)  # as BackgroundCache hands frames out
    return rgb


def outside(image: np.ndarray, rect) -> np.ndarray:
    x1, y1, x2, y2 = rect
    keep = np.ones(image.shape[:2], bool)
    keep[y1:y2, x1:x2] = False
    return image[keep]


@pytest.mark.parametrize("rect", RECTS)
@pytest.mark.parametrize("feather", [0, 6])
def test_identity_prediction_round_trips(frame: np.ndarray, rect, feather: int) -> None:
    patch = inner(cut_crop(frame, rect)).copy()  # what a perfect "copy the input" model returns
    out = paste_patch(frame, rect, patch, feather)
    x1, y1, x2, y2 = rect
    assert psnr(out[y1:y2, x1:x2], frame[y1:y2, x1:x2]) > 40
    assert np.array_equal(outside(out, rect), outside(frame, rect))  # not one pixel outside changes
    assert out is not frame and out.flags.writeable


def test_the_patch_lands_inside_the_rect(frame: np.ndarray) -> None:
    rect = RECTS[1]  # 300 px: the 328 crop's 4-px ring (kept from the frame) is ~3.7 frame px
    patch = np.zeros((INNER, INNER, 3), np.uint8)
    patch[:] = (255, 0, 0)
    out = paste_patch(frame, rect, patch)
    x1, y1, x2, y2 = rect
    centre = out[y1 + 5:y2 - 5, x1 + 5:x2 - 5].reshape(-1, 3)
    assert (np.abs(centre.astype(int) - (255, 0, 0)).max(axis=1) <= 8).mean() > 0.99
    # The rect's outermost columns and rows still show the frame, as in the seeds' paste.
    for got, want in ((out[y1 + 10:y2 - 10, x1], frame[y1 + 10:y2 - 10, x1]),
                      (out[y2 - 1, x1 + 10:x2 - 10], frame[y2 - 1, x1 + 10:x2 - 10])):
        assert np.abs(got.astype(int) - want).mean() < 6


def test_feather_blends_the_seam(frame: np.ndarray) -> None:
    rect = RECTS[1]
    patch = np.full((INNER, INNER, 3), 255, np.uint8)
    hard = paste_patch(frame, rect, patch, 0)
    soft = paste_patch(frame, rect, patch, 20)
    x1, y1, x2, y2 = rect
    edge = lambda img: img[y1 + 3, x1 + 40:x2 - 40].astype(float)
    original = frame[y1 + 3, x1 + 40:x2 - 40].astype(float)
    assert np.abs(edge(soft) - original).mean() < 0.5 * np.abs(edge(hard) - original).mean()
    middle = (slice(y1 + 30, y2 - 30), slice(x1 + 30, x2 - 30))
    assert np.array_equal(soft[middle], hard[middle])  # the feather only touches the rim


def test_feather_weights() -> None:
    pasted, original = feather_weights(50, 5)
    assert pasted.shape == (50, 50) and np.allclose(pasted + original, 1)
    assert pasted[25, 25] == 1 and pasted[0, 25] < 0.05 and pasted[25, 0] < 0.05
    assert (np.diff(pasted[25, :25]) >= 0).all()


def test_silence_sends_the_background_untouched(frame: np.ndarray) -> None:
    out = compose_frame(frame, RECTS[0], None, 6)
    assert out is frame
    patch = inner(cut_crop(frame, RECTS[0])).copy()
    assert not np.array_equal(compose_frame(frame, RECTS[0], patch, 0), frame)  # a patch is pasted


def test_reuses_the_callers_crop(frame: np.ndarray) -> None:
    crop = cut_crop(frame, RECTS[0])
    before = crop.copy()
    patch = np.full((INNER, INNER, 3), 9, np.uint8)
    assert np.array_equal(paste_patch(frame, RECTS[0], patch, 3, crop328=crop), paste_patch(frame, RECTS[0], patch, 3))
    assert np.array_equal(crop, before)


def test_bad_inputs(frame: np.ndarray) -> None:
    patch = np.zeros((INNER, INNER, 3), np.uint8)
    with pytest.raises(ValueError, match="patch must be uint8 320x320x3"):
        paste_patch(frame, RECTS[0], patch[:-1])
    with pytest.raises(ValueError, match="patch must be uint8"):
        paste_patch(frame, RECTS[0], patch.astype(np.float32))
    with pytest.raises(ValueError, match="feather_px"):
        paste_patch(frame, RECTS[0], patch, -1)
    with pytest.raises(ValueError, match="not a square inside"):
        paste_patch(frame, [600, 400, 700, 500], patch)
