"""Temporal smoothing of portraits that calms flicker without leaving ghosts.

A plain EMA of successive outputs (``out = lerp(current, previous, alpha)``) steadies a
generator's frame-to-frame shimmer, but anything that moves leaves a fading copy behind:
at alpha 0.5 and 20 FPS a turned head shows two faces for most of a second.

The difference between shimmer and motion is its size: a style net or a palette map
wobbles a pixel by a few levels; motion changes it by a lot. So the blend weight is
gated per pixel by how far the two frames differ there:

    d     = mean over channels of |current - previous|          (0..1)
    keep  = alpha * exp(-(d / motion_scale)^2)
    out   = lerp(current, previous, keep)

Where a pixel barely changes it is smoothed at ``alpha``; where it changed by more than
about twice ``motion_scale`` the current frame shows through untouched, so a moving face
never drags a trail.
"""

from __future__ import annotations

import torch

DEFAULT_MOTION_SCALE = 0.08
"""Per-pixel change (0..1) at which the smoothing has fallen to 1/e of ``alpha``."""


def smooth(current: torch.Tensor, previous: torch.Tensor | None, alpha: float,
           motion_scale: float = DEFAULT_MOTION_SCALE) -> torch.Tensor:
    """Motion-gated EMA of a [3, H, W] (or [B, 3, H, W]) image in 0..1 with the previous
    output; ``current`` is returned as is without a comparable previous or with alpha 0."""
    if previous is None or alpha <= 0.0 or previous.shape != current.shape:
        return current
    previous = previous.to(current.device, current.dtype)
    change = (current - previous).abs().mean(dim=-3, keepdim=True)
    keep = change.div_(motion_scale).square_().neg_().exp_().mul_(alpha)
    return torch.lerp(current, previous, keep)
