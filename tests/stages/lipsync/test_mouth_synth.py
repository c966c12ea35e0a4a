"""The non-neural mouth: unchanged when closed, opens in the mouth region only, monotonically."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from stages.lipsync.crop import (
    BORDER,
    CROP_SIZE,
    INNER,
    cut_crop,
    inner,
    mouth_in_crop,
    rects_from_landmarks,
)
from stages.lipsync.mouth_synth import MouthSynth, find_lip_line

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


@pytest.fixture(scope="module")
def astronaut() -> tuple[np.ndarray, tuple[float, float, float, float], np.ndarray]:
    """The astronaut's 328 crop, her mouth in it (with the lip line) and the rect."""
    rgb = cv2.cvtColor(cv2.imread(str(FIXTURES / "astronaut_640x480.jpg")), cv2.COLOR_BGR2RGB)
    marks = np.asarray(json.loads((FIXTURES / "astronaut_landmarks.json").read_text())["points"])[None]
    rects = rects_from_landmarks(marks, (640, 480))
    crop = cut_crop(rgb, rects[0])
    crop.setflags(write=False)
    mouth = mouth_in_crop(marks, rects)
    return crop, (*mouth, find_lip_line(crop, mouth)), rects[0]


def mouth_box(mouth) -> tuple[slice, slice]:
    """Rows/columns of the 320 patch around the lips: corners to corners, upper lip to chin."""
    cx, cy, width, lip = mouth
    rows = slice(round(min(cy, lip) - 0.1 * width) - BORDER, round(lip + 0.35 * width) - BORDER)
    cols = slice(round(cx - 0.45 * width) - BORDER, round(cx + 0.45 * width) - BORDER)
    return rows, cols


def diff_inside_outside(a: np.ndarray, b: np.ndarray, box) -> tuple[float, float]:
    change = np.abs(a.astype(float) - b.astype(float)).mean(axis=2)
    inside = np.zeros(change.shape, bool)
    inside[box] = True
    return float(change[inside].mean()), float(change[~inside].mean())


def test_closed_is_the_crop_unchanged(astronaut) -> None:
    crop, mouth, _ = astronaut
    patch = MouthSynth(mouth).render(crop, 0.0)
    assert patch.shape == (INNER, INNER, 3) and patch.dtype == np.uint8
    assert np.array_equal(patch, inner(crop))


def test_open_changes_the_mouth_far_more_than_the_rest(astronaut) -> None:
    crop, mouth, _ = astronaut
    synth = MouthSynth(mouth)
    patch = synth.render(crop, 1.0)
    inside, elsewhere = diff_inside_outside(patch, inner(crop), mouth_box(mouth))
    assert inside >= 20                      # visibly open: a dark gap and a dropped jaw
    assert inside >= 5 * elsewhere, (inside, elsewhere)
    x0, y0, x1, y1 = synth.box()
    untouched = np.ones((CROP_SIZE, CROP_SIZE), bool)
    untouched[y0:y1, x0:x1] = False
    assert np.array_equal(patch[untouched[BORDER:-BORDER, BORDER:-BORDER]],
                          inner(crop)[untouched[BORDER:-BORDER, BORDER:-BORDER]])


def test_opening_is_monotonic(astronaut) -> None:
    crop, mouth, _ = astronaut
    synth = MouthSynth(mouth)
    box = mouth_box(mouth)
    changes = [diff_inside_outside(synth.render(crop, o), inner(crop), box)[0] for o in (0, 0.2, 0.4, 0.6, 0.8, 1.0)]
    assert changes[0] == 0
    assert all(b > a for a, b in itertools.pairwise(changes)), changes
    # The dark gap between the lips grows.
    dark = [int((synth.render(crop, o)[box].mean(axis=2) < 60).sum()) for o in (0, 0.3, 0.6, 1.0)]
    assert all(b > a for a, b in itertools.pairwise(dark)) and dark[-1] > 10 * dark[0], dark


def test_the_patch_edges_never_move(astronaut) -> None:
    """The compositor pastes only the 320 view: its rim must match the untouched crop ring."""
    crop, mouth, _ = astronaut
    patch = MouthSynth(mouth, below=3.0, above=2.0).render(crop, 1.0)
    reference = inner(crop)
    for edge in (np.s_[:3], np.s_[-3:], np.s_[:, :3], np.s_[:, -3:]):
        assert np.abs(patch[edge].astype(int) - reference[edge]).max() <= 1


def test_input_is_not_modified_and_opening_is_clamped(astronaut) -> None:
    crop, mouth, _ = astronaut
    synth = MouthSynth(mouth)
    assert np.array_equal(synth.render(crop, 3.0), synth.render(crop, 1.0))
    assert np.array_equal(synth.render(crop, -1.0), inner(crop))
    with pytest.raises(ValueError, match="finite"):
        synth.render(crop, float("nan"))
    with pytest.raises(ValueError, match="uint8 328x328x3"):
        synth.render(crop[:-1], 0.5)
    with pytest.raises(ValueError, match="mouth must"):
        MouthSynth((400.0, 100.0, 50.0))


def test_lip_line_under_a_smiles_upper_teeth(astronaut) -> None:
    _crop, mouth, rect = astronaut
    side = rect[2] - rect[0]
    lip_in_frame = rect[1] + (mouth[3] + 0.5) * side / CROP_SIZE
    assert 183 <= lip_in_frame <= 189  # her upper teeth end at y ~185.5, the lower lip starts at ~186


def test_lip_line_of_a_closed_mouth_is_its_darkest_row() -> None:
    crop = np.zeros((CROP_SIZE, CROP_SIZE, 3), np.uint8)
    crop[:] = (205, 160, 140)
    crop[135:165, 100:230] = (185, 110, 105)   # lips
    crop[151:153, 105:225] = (95, 50, 50)      # where they meet
    assert find_lip_line(crop, (164.0, 140.0, 130.0)) == pytest.approx(151.5, abs=1)
    patch = MouthSynth((164.0, 140.0, 130.0, 151.5)).render(crop, 0.7)
    assert patch[151 - BORDER:158 - BORDER, 164 - BORDER].mean() < 60  # opened at the lips, dark inside
