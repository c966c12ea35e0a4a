"""Motion-gated temporal smoothing: calms flicker, leaves no ghost of what moved."""

from __future__ import annotations

import torch

from stages.generator.temporal import smooth


def test_small_changes_are_smoothed():
    previous = torch.full((3, 8, 8), 0.50)
    current = torch.full((3, 8, 8), 0.52)  # shimmer: about five levels of 255
    out = smooth(current, previous, alpha=0.5)
    assert torch.allclose(out, torch.full_like(out, 0.51), atol=1e-3)


def test_motion_leaves_no_ghost():
    previous = torch.zeros((3, 16, 16))
    previous[:, 4:8, 4:8] = 1.0  # a bright square that then moves away
    current = torch.zeros((3, 16, 16))
    current[:, 10:14, 10:14] = 1.0
    out = smooth(current, previous, alpha=0.9)
    assert out[:, 4:8, 4:8].max() < 0.01  # where it was: no trace
    assert out[:, 10:14, 10:14].min() > 0.99  # where it is: at full brightness


def test_no_previous_or_no_alpha_or_new_size_is_the_current_frame():
    current = torch.rand(3, 8, 8)
    assert smooth(current, None, 0.5) is current
    assert smooth(current, torch.rand(3, 8, 8), 0.0) is current
    assert smooth(current, torch.rand(3, 4, 4), 0.5) is current


def test_batched_images_are_gated_per_image():
    previous = torch.stack([torch.full((3, 4, 4), 0.5), torch.zeros(3, 4, 4)])
    current = torch.stack([torch.full((3, 4, 4), 0.52), torch.ones(3, 4, 4)])
    out = smooth(current, previous, alpha=0.5)
    assert torch.allclose(out[0], torch.full((3, 4, 4), 0.51), atol=1e-3)
    assert torch.allclose(out[1], torch.ones(3, 4, 4), atol=1e-3)
