"""The generator's two renderers: the learned style net (default) and the low-fi stylizer.

Both take a micro-batch of face crops ``[B, 3, S, S]`` (float 0..1, on the stage's
device) with one ``Mood`` per crop and return stylized images of the same shape in one
batched call, so one generator rank serves many sessions with different emotions:

* ``StyleNetRenderer`` — Magenta's 26-style transfer network (``stylenet``). With
  ``style: auto`` the face's emotion probabilities blend the 26 styles through the
  curated table of ``style_table``, so the look drifts as the mood does; a pinned style
  uses that look's fixed blend. ``strength`` blends the result with the photo.
* ``LowFiRenderer`` — palette grading, posterization, edges and animated warps
  (``lowfi``); no network, a few ms per portrait: the cheap fallback.

Renderers hold no per-session state: temporal smoothing happens after them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from core.settings import RuntimeSettings
from stages.generator import lowfi
from stages.generator.style_table import emotion_style_weights, named_style_weights
from stages.generator.stylenet import MIN_SIDE, load_style_net
from stages.prompt import style_prompt


@dataclass(frozen=True, slots=True)
class Mood:
    """What one portrait should express: its face's emotion, or neutral without a face."""

    emotion: str
    confidence: float
    probs: dict[str, float]
    """Emotion probabilities (smoothed by vision); ``{emotion: confidence}`` when absent."""
    phase: float
    """Animation phase in radians (the low-fi warps move; the style net ignores it)."""


CPU_NET_SIDE = 192
"""Largest side the style net runs at on a CPU unless told otherwise. One core takes
~25 ms per portrait at 192 px, ~46 ms at 256 and ~61 ms at 320 (``launch/bench.py
--sections models``); at 20 FPS a generator rank has 50 ms per frame, and at 256 the
stage (~53 ms with cropping and smoothing) fell behind and frames queued (p50 490 ms
glass-to-glass on the 3-rank pipeline); at 192 it keeps up with room to spare."""


class StyleNetRenderer:
    """The learned generator. ``net_side`` is the side the network runs at, the result
    resized to the crop's side; None means the crop's own side on a GPU and at most
    ``CPU_NET_SIDE`` on a CPU (the cost grows with the square of the side).

    On a CPU the images of a batch run one at a time: the activations of one portrait
    fit the cache and a batch's do not, so a batch of 8 costs more per image than 8
    single runs (measured: 60 vs 40 ms per image at 256 px). A GPU runs the batch in one
    call."""

    name = "stylenet"

    def __init__(self, device: torch.device, weights: Path | None = None, net_side: int | None = None) -> None:
        self.device = device
        self.net_side = net_side
        self.net = load_style_net(weights, device)

    def style_name(self, mood: Mood, settings: RuntimeSettings) -> str:
        return f"{settings.style}/{mood.emotion}"

    def render(self, crops: torch.Tensor, moods: list[Mood], settings: RuntimeSettings) -> torch.Tensor:
        weights = torch.stack([torch.as_tensor(self._weights(m, settings.style), dtype=torch.float32)
                               for m in moods]).to(self.device)
        side = crops.shape[-1]
        net_side = self.net_side or (min(side, CPU_NET_SIDE) if self.device.type == "cpu" else side)
        net_side = max(MIN_SIDE, min(net_side, side))
        x = crops if net_side == side else F.interpolate(crops, size=(net_side, net_side), mode="bilinear",
                                                         antialias=True, align_corners=False)
        with torch.inference_mode():
            if self.device.type == "cpu":
                styled = torch.cat([self.net(x[i:i + 1], weights[i:i + 1]) for i in range(len(x))])
            else:
                styled = self.net(x, weights)
        if net_side != side:
            styled = F.interpolate(styled, size=(side, side), mode="bilinear", align_corners=False).clamp_(0, 1)
        return torch.lerp(crops, styled, settings.strength)

    @staticmethod
    def _weights(mood: Mood, style: str):
        return emotion_style_weights(mood.probs) if style == "auto" else named_style_weights(style)


class LowFiRenderer:
    """The cheap fallback: ``lowfi.stylize`` with ``stages.prompt`` looks and moods."""

    name = "lowfi"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._luts: dict[str, torch.Tensor] = {}

    def style_name(self, mood: Mood, settings: RuntimeSettings) -> str:
        return style_prompt(mood.emotion, mood.confidence, settings.style).name

    def render(self, crops: torch.Tensor, moods: list[Mood], settings: RuntimeSettings) -> torch.Tensor:
        prompts = [style_prompt(m.emotion, m.confidence, settings.style) for m in moods]
        params = lowfi.LowFiBatch.from_prompts(prompts, [m.phase for m in moods], settings.strength,
                                               self.device, self._luts)
        return lowfi.stylize(crops, params)

    @staticmethod
    def speed(mood: Mood, settings: RuntimeSettings) -> float:
        """Animation speed of this mood relative to the base rate (faster when agitated)."""
        return style_prompt(mood.emotion, mood.confidence, settings.style).speed
