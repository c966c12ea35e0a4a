"""Low-fi stylization: palette grading, posterization, Sobel edges, animated warps.

Pure torch on batched float images ``[B, 3, H, W]`` in 0..1, on whatever device they
live on, with per-sample parameters, so one call styles every portrait of a micro-batch
even when they come from different sessions with different emotions. Nothing here
keeps state (temporal smoothing happens after it, in ``stages.generator.temporal``).

The pipeline of ``stylize``:

1. warp the photo (swirl, ripple, bulge, melt, shiver or wave) with ``grid_sample``,
   strength = emotion intensity × runtime strength, moving with the animation phase;
2. take its luminance, stretch it to a fixed contrast (so a dim room still uses the
   whole palette), soften it and posterize it into a few flat bands;
3. map the bands through the style's gradient palette (sliding along it over time),
   optionally mixed with the photo's own saturated, posterized colours;
4. draw Sobel edges in the palette's edge colour, darken the corners;
5. blend with the warped photo by the runtime strength (0 = photo, 1 = fully styled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F

from stages.prompt import StylePrompt

LUT_SIZE = 256
"""Entries of a gradient-map lookup table: one per 8-bit luminance level."""

_LUMA = (0.299, 0.587, 0.114)  # Rec. 601, what JPEG and the eye agree on well enough


@dataclass(kw_only=True, slots=True)
class LowFiBatch:
    """Per-sample parameters of one ``stylize`` call; tensors live on the images' device."""

    luts: torch.Tensor
    """[B, 3, LUT_SIZE] gradient palettes (see ``palette_lut``)."""
    edge_colours: torch.Tensor
    """[B, 3] colour of the edge overlay, 0..1."""
    levels: torch.Tensor
    """[B] posterize levels (float, >= 2)."""
    edges: torch.Tensor
    """[B] edge overlay strength, 0..1."""
    keep_colour: torch.Tensor
    """[B] share of the photo's own colours mixed into the palette, 0..1."""
    cycle_shift: torch.Tensor
    """[B] palette slide at this instant (see ``palette_shift``)."""
    vignette: torch.Tensor
    """[B] corner darkening, 0..1."""
    strength: torch.Tensor
    """[B] blend of styled over photo, 0..1 (runtime strength)."""
    warps: list[str]
    """Warp kind per sample."""
    warp_amounts: list[float]
    """Warp amount per sample, already multiplied by the runtime strength."""
    phases: list[float]
    """Animation phase per sample, radians in [0, 2π)."""
    mixes_colour: bool
    """Any sample keeps photo colours (decided on the host: no device sync per batch)."""
    vignettes: bool
    """Any sample darkens its corners."""

    @classmethod
    def from_prompts(cls, prompts: Sequence[StylePrompt], phases: Sequence[float], strength: float,
                     device: torch.device, lut_cache: dict[str, torch.Tensor] | None = None) -> "LowFiBatch":
        """Parameters for ``prompts`` at ``phases``; ``lut_cache`` (palette name → LUT on
        ``device``) saves rebuilding and re-uploading palettes every batch."""
        luts = []
        for p in prompts:
            lut = None if lut_cache is None else lut_cache.get(p.palette.name)
            if lut is None:
                lut = palette_lut(p.palette.stops, device=device)
                if lut_cache is not None:
                    lut_cache[p.palette.name] = lut
            luts.append(lut)

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        return cls(
            luts=torch.stack(luts),
            edge_colours=column([c / 255.0 for p in prompts for c in p.palette.edge]).view(len(prompts), 3),
            levels=column([float(p.levels) for p in prompts]),
            edges=column([p.edges for p in prompts]),
            keep_colour=column([p.keep_colour for p in prompts]),
            cycle_shift=column([palette_shift(p.cycle, ph) for p, ph in zip(prompts, phases)]),
            vignette=column([p.vignette for p in prompts]),
            strength=column([strength] * len(prompts)),
            warps=[p.warp for p in prompts],
            warp_amounts=[p.warp_amount * strength for p in prompts],
            phases=[float(ph) for ph in phases],
            mixes_colour=any(p.keep_colour > 0 for p in prompts),
            vignettes=any(p.vignette > 0 for p in prompts),
        )


def advance_phase(phase: float, dt_seconds: float, hz: float) -> float:
    """``phase`` moved on by ``dt_seconds`` at ``hz`` cycles per second, kept in [0, 2π)
    (in Python floats, so it never grows into float32 territory where it loses precision)."""
    return (phase + 2.0 * math.pi * hz * dt_seconds) % (2.0 * math.pi)


def palette_shift(cycle: float, phase: float) -> float:
    """How far the palette slides at ``phase``: smooth, periodic, 0 at phase 0."""
    return cycle * 0.5 * (1.0 - math.cos(phase))


def palette_lut(stops: Sequence[tuple[int, int, int]], size: int = LUT_SIZE,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """[3, size] lookup table interpolating the RGB ``stops`` (0..255) evenly from dark to light."""
    if len(stops) < 2:
        raise ValueError("a palette needs at least two stops")
    colours = torch.tensor(stops, dtype=torch.float32, device=device).t().unsqueeze(0) / 255.0  # [1,3,K]
    return F.interpolate(colours, size=size, mode="linear", align_corners=True)[0]


def luminance(images: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] luma of [B, 3, H, W] RGB."""
    r, g, b = images.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def normalise_contrast(lum: torch.Tensor, spread: float = 2.2) -> torch.Tensor:
    """Stretch each image's luma to mean 0.5 and ±``spread`` std over the 0..1 range.

    Mean/std rather than percentiles: two reductions instead of a sort, and stable
    enough from frame to frame that the bands do not pump."""
    mean = lum.mean(dim=(1, 2, 3), keepdim=True)
    std = lum.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
    return ((lum - mean) / (2.0 * spread * std) + 0.5).clamp(0.0, 1.0)


def posterize(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Quantise 0..1 values to ``levels`` ([B]) evenly spaced values per sample."""
    n = levels.view(-1, 1, 1, 1)
    return (x * n).floor().clamp(max=n - 1) / (n - 1)


def gradient_map(t: torch.Tensor, luts: torch.Tensor) -> torch.Tensor:
    """Map [B, 1, H, W] values in 0..1 through per-sample [B, 3, N] tables → [B, 3, H, W]."""
    b, _, h, w = t.shape
    n = luts.shape[-1]
    index = (t * (n - 1)).round().long().view(b, 1, h * w).expand(b, 3, h * w)
    return torch.gather(luts, 2, index).view(b, 3, h, w)


def sobel(lum: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude [B, 1, H, W] of [B, 1, H, W] (about 0..4 for 0..1 input)."""
    # Separable, by slicing: on one CPU thread this is ~4x faster than a 2-kernel conv2d.
    p = F.pad(lum, (1, 1, 1, 1), mode="replicate")
    smooth_v = p[..., :-2, :] + 2.0 * p[..., 1:-1, :] + p[..., 2:, :]
    smooth_h = p[..., :-2] + 2.0 * p[..., 1:-1] + p[..., 2:]
    gx = smooth_v[..., 2:] - smooth_v[..., :-2]
    gy = smooth_h[..., 2:, :] - smooth_h[..., :-2, :]
    return torch.sqrt(gx.square() + gy.square() + 1e-12)


def box_blur3(x: torch.Tensor) -> torch.Tensor:
    """3x3 mean with replicated borders, [B, C, H, W] → same (separable slices, like ``sobel``)."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    rows = p[..., :-2] + p[..., 1:-1] + p[..., 2:]
    return (rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]) * (1.0 / 9.0)


def edge_mask(magnitude: torch.Tensor, threshold: float = 0.25, softness: float = 0.3) -> torch.Tensor:
    """0..1 ink from a gradient magnitude: nothing below ``threshold``, full above it + ``softness``."""
    return ((magnitude - threshold) / softness).clamp(0.0, 1.0)


def warp_grid(kinds: Sequence[str], amounts: Sequence[float], phases: Sequence[float],
              height: int, width: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, H, W, 2] sampling grid for ``grid_sample`` (x, y in -1..1), one warp per sample."""
    x, y, r = _base_grid(height, width, device, dtype)
    grids = []
    for kind, a, ph in zip(kinds, amounts, phases):
        if kind == "none" or a <= 0.0:
            sx, sy = x, y
        elif kind == "swirl":
            # Twist strongest at the centre, fading out before the corners; it breathes.
            angle = a * 2.2 * (0.6 + 0.4 * math.sin(ph)) * (1.0 - r).clamp_min(0.0).square()
            c, s = torch.cos(angle), torch.sin(angle)
            sx, sy = c * x - s * y, s * x + c * y
        elif kind == "ripple":
            # Rings travelling outwards from the centre.
            d = a * 0.035 * torch.sin(r * 22.0 - ph) / r.clamp_min(1e-3)
            sx, sy = x + d * x, y + d * y
        elif kind == "bulge":
            # Fisheye on the face that pulses.
            f = 1.0 - a * 0.45 * (0.8 + 0.2 * math.sin(ph)) * (1.0 - r.square()).clamp_min(0.0)
            sx, sy = x * f, y * f
        # The separable warps below evaluate their sines on one row or column (x[:1],
        # y[:, :1]) and broadcast: H+W sines instead of H*W.
        elif kind == "melt":
            # The lower half drips: rows sample from higher up, more so in wavy columns.
            drip = (0.55 + 0.45 * torch.sin(x[:1] * 5.0 + ph)) * ((y[:, :1] + 1.0) * 0.5).pow(1.5)
            sx, sy = x, y - a * 0.22 * drip
        elif kind == "shiver":
            # Horizontal tearing bands; integer phase multiples keep it continuous at 2π.
            sx = x + a * 0.03 * math.sin(3.0 * ph) * torch.sin(y[:, :1] * 38.0 + 2.0 * ph)
            sy = y + a * 0.008 * torch.sin(x[:1] * 29.0 + ph)
        elif kind == "wave":
            # A flag in a light breeze.
            sx = x + a * 0.05 * torch.sin(y[:, :1] * 4.0 + ph)
            sy = y + a * 0.03 * torch.sin(x[:1] * 3.0 + ph)
        else:
            raise ValueError(f"unknown warp {kind!r}")
        grids.append(torch.stack((sx, sy), dim=-1))
    return torch.stack(grids)


def warp(images: torch.Tensor, kinds: Sequence[str], amounts: Sequence[float],
         phases: Sequence[float]) -> torch.Tensor:
    """Warp [B, 3, H, W] images; samples whose amount is 0 are returned unchanged."""
    if all(k == "none" or a <= 0.0 for k, a in zip(kinds, amounts)):
        return images
    b, _, h, w = images.shape
    grid = warp_grid(kinds, amounts, phases, h, w, images.device, images.dtype)
    # Reflection keeps the borders filled with picture instead of black wedges.
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def saturate(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Push colours away from their luma by ``factor`` (1 = unchanged)."""
    lum = luminance(images)
    return (lum + (images - lum) * factor).clamp(0.0, 1.0)


def stylize(images: torch.Tensor, params: LowFiBatch) -> torch.Tensor:
    """Style [B, 3, H, W] float images in 0..1 → same shape, dtype and range."""
    b, _, h, w = images.shape
    per = lambda v: v.view(b, 1, 1, 1)  # noqa: E731 - per-sample scalar broadcasting
    warped = warp(images, params.warps, params.warp_amounts, params.phases)

    tone = normalise_contrast(luminance(warped))
    # A 3x3 box blur before quantising keeps skin from breaking into JPEG-noise speckles.
    tone = box_blur3(tone)
    ink = edge_mask(sobel(tone)) * per(params.edges)

    bands = posterize(tone, params.levels)
    # Slide along the palette with a triangle fold so the darkest and lightest ends never
    # jump into each other while it moves.
    slid = bands + per(params.cycle_shift)
    slid = 1.0 - (slid.remainder(2.0) - 1.0).abs()
    styled = gradient_map(slid, params.luts)

    if params.mixes_colour:
        own = posterize(saturate(warped, 1.6), params.levels)
        styled = torch.lerp(styled, own, per(params.keep_colour))

    styled = torch.lerp(styled, params.edge_colours.view(b, 3, 1, 1).expand_as(styled), ink)
    if params.vignettes:
        styled = styled * (1.0 - per(params.vignette) * _vignette(h, w, images.device, images.dtype))
    # Every term above stays within 0..1 (lerps, a ≤1 vignette factor), so no final clamp.
    return torch.lerp(warped, styled, per(params.strength))


@lru_cache(maxsize=8)
def _base_grid(height: int, width: int, device: torch.device,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Pixel centres in grid_sample's align_corners=False convention.
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height * 2.0 - 1.0
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width * 2.0 - 1.0
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return x, y, torch.sqrt(x.square() + y.square())


@lru_cache(maxsize=8)
def _vignette(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    x, y, r = _base_grid(height, width, device, dtype)
    return ((r - 0.6) / 0.8).clamp(0.0, 1.0).square()
