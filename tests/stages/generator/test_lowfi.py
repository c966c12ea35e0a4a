"""lowfi ops: shapes, dtypes and ranges kept; looks differ per emotion; motion; smoothing."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import pytest
import torch
import torch.nn.functional as F

from stages.generator import lowfi
from stages.prompt import EMOTIONS, WARP_KINDS, style_prompt

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "astronaut_640x480.jpg"


@pytest.fixture(scope="module")
def face() -> torch.Tensor:
    """[1, 3, 128, 128] float crop around the fixture's face."""
    rgb = cv2.cvtColor(cv2.imread(str(FIXTURE)), cv2.COLOR_BGR2RGB)[40:280, 160:400]
    crop = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).float() / 255.0
    return F.interpolate(crop, size=(128, 128), mode="bilinear", antialias=True).clamp(0, 1)


def styled(face: torch.Tensor, emotion: str, style: str = "auto", phase: float = 0.3,
           strength: float = 1.0) -> torch.Tensor:
    prompt = style_prompt(emotion, 0.9, style)
    return lowfi.stylize(face, lowfi.LowFiBatch.from_prompts([prompt], [phase], strength, face.device))


def test_stylize_keeps_shape_dtype_range(face):
    batch = face.repeat(len(EMOTIONS), 1, 1, 1)
    prompts = [style_prompt(e, 0.7) for e in EMOTIONS]
    out = lowfi.stylize(batch, lowfi.LowFiBatch.from_prompts(prompts, [1.0] * len(prompts), 0.8, batch.device))
    assert out.shape == batch.shape and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0 and torch.isfinite(out).all()


def test_emotions_look_different(face):
    happy, sad = styled(face, "happy"), styled(face, "sad")
    # Mean colour distance (0..1 RGB): a warm sunburst against a muted rain blue.
    distance = (happy.mean(dim=(2, 3)) - sad.mean(dim=(2, 3))).norm()
    assert distance > 0.2
    means = torch.stack([styled(face, e).mean(dim=(2, 3))[0] for e in EMOTIONS])
    gaps = torch.cdist(means, means) + torch.eye(len(EMOTIONS))
    assert gaps.min() > 0.03  # every pair of emotions differs in overall colour


def test_strength_zero_is_the_photo(face):
    assert torch.allclose(styled(face, "angry", strength=0.0), face, atol=1e-6)


def test_batched_equals_one_by_one(face):
    prompts = [style_prompt("fear", 0.8), style_prompt("happy", 0.5, "pop")]
    batch = torch.cat([face, face.flip(3)])
    together = lowfi.stylize(batch, lowfi.LowFiBatch.from_prompts(prompts, [0.5, 2.0], 0.9, batch.device))
    for i, (prompt, phase) in enumerate(zip(prompts, [0.5, 2.0])):
        alone = lowfi.stylize(batch[i:i + 1], lowfi.LowFiBatch.from_prompts([prompt], [phase], 0.9, batch.device))
        assert torch.allclose(together[i:i + 1], alone, atol=1e-5)


def test_animation_changes_output_over_time(face):
    a, b = styled(face, "surprise", phase=0.0), styled(face, "surprise", phase=math.pi / 2)
    assert (a - b).abs().mean() > 0.01
    assert torch.allclose(styled(face, "surprise", phase=0.0), styled(face, "surprise", phase=2 * math.pi),
                          atol=1e-4)


@pytest.mark.parametrize("kind", WARP_KINDS)
def test_every_warp_stays_in_frame_and_moves(face, kind):
    grid = lowfi.warp_grid([kind], [1.0], [1.0], 64, 80, torch.device("cpu"))
    assert grid.shape == (1, 64, 80, 2) and grid.abs().max() < 1.5
    warped = lowfi.warp(face, [kind], [1.0], [1.0])
    assert warped.shape == face.shape
    assert ((warped - face).abs().mean() > 1e-3) == (kind != "none")


def test_advance_phase_wraps():
    assert lowfi.advance_phase(0.0, 0.125, 1.0) == pytest.approx(2 * math.pi * 0.125)
    assert lowfi.advance_phase(6.0, 1.0, 1.0) == pytest.approx(6.0)  # one full cycle later
    assert 0.0 <= lowfi.advance_phase(6.2, 0.1, 3.0) < 2 * math.pi


def test_building_blocks():
    lut = lowfi.palette_lut([(0, 0, 0), (255, 0, 0), (255, 255, 255)])
    assert lut.shape == (3, lowfi.LUT_SIZE)
    assert torch.allclose(lut[:, 0], torch.zeros(3)) and torch.allclose(lut[:, -1], torch.ones(3))
    assert torch.allclose(lut[:, 128], torch.tensor([1.0, 0.0, 0.0]), atol=0.01)
    ramp = torch.linspace(0, 1, 100).view(1, 1, 1, 100)
    assert lowfi.posterize(ramp, torch.tensor([4.0])).unique().numel() == 4
    step = torch.zeros(1, 1, 8, 8)
    step[..., 4:] = 1.0
    edges = lowfi.sobel(step)
    assert edges[..., 3:5].min() > 1.0 and edges[..., :2].max() == pytest.approx(0.0, abs=1e-5)
