"""The lip-sync U-Net: SyncTalk_2D's ``unet_328`` generator in its ``ave`` audio mode.

The network paints a talking mouth into an avatar's face crop. Its input is two 320x320
BGR images in 0..1 stacked to ``[B, 6, 320, 320]`` (a reference crop of the avatar and
the same crop with everything but a ~5 px border blanked) and an audio window
``[B, 32, 16, 16]`` (16 audio-encoder features of 512 around the frame, reshaped); its
output is the filled crop ``[B, 3, 320, 320]``, BGR, sigmoid 0..1.

Every block is a MobileNetV2 inverted residual (1x1 expand x2, BN, ReLU; 3x3 depthwise
with the block's stride, BN, ReLU; 1x1 project, BN; plus the input when the block is
residual), so the 12.19 M-parameter network costs about 9.8 GFLOP per frame (convs,
2 per multiply-add; 2.6 at half width), most of it at the two full-resolution ends:

    inc      6 -> c0 at 320                 (one block, stride 1)
    down1-5  c0 -> c0 -> c1 -> c2 -> c3 -> c4, 320 -> 160 -> 80 -> 40 -> 20 -> 10
             (two blocks each, the first with stride 2)
    audio    [32, 16, 16] -> c1 -> c2 (blocks), 3x3 conv c3 + BN + ReLU, residual block,
             3x3 stride 2 pad 3 conv c4 + BN + ReLU (16 -> 10), two residual blocks
    fuse     concat(image 10x10 c4, audio 10x10 c4) -> c4 -> c3 (two double blocks)
    up1-5    bilinear x2 (align_corners), concat with the skip, a double block (stride 1):
             c3/2, c2/2, c1/2, c0, c0/2 channels out
    outc     1x1 conv c0/2 -> 3, sigmoid

with channels ``(c0..c4) = (32, 64, 128, 256, 512) * width``. ``width`` 0.5 is the
original's own "mobile" channel list (16..256), used here to keep CPU tests fast; the
audio branch still takes the window's 32 channels at any width (the window's format does
not change with the network).

Attribute names and ``nn.Sequential`` nesting follow the original module for module, so
a user's SyncTalk_2D ``.pth`` (``torch.save(net.state_dict())``) loads strictly: the
state-dict keys and shapes are the compatibility contract, tested key by key. The class
names are ours and do not matter to a state dict.

Audio modes. SyncTalk_2D trains the same U-Net with three audio front ends. ``ave`` (its
own Wav2Lip-style mel encoder, what ``stages.lipsync.audio_encoder`` implements) is the
only one supported. A ``hubert`` checkpoint has exactly the same tensor names and shapes
(only the stride of ``audio_model.conv3`` differs, and it expects HuBERT features), so it
would load without complaint and produce nonsense: that is why an avatar's manifest
records its ``audio_mode`` and this module refuses any other mode by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

AUDIO_MODES = ("ave",)
"""Audio modes this module builds."""
KNOWN_AUDIO_MODES = ("ave", "hubert", "wenet")
"""SyncTalk_2D's modes; the ones not in ``AUDIO_MODES`` are refused with a reason."""
BASE_CHANNELS = (32, 64, 128, 256, 512)
"""The original's channel list at width 1."""
IMAGE_CHANNELS = 6
"""Reference crop (BGR) and masked crop (BGR)."""
AUDIO_CHANNELS, AUDIO_SIZE = 32, 16
"""The audio window: 16 x 512 encoder features reshaped to [32, 16, 16]."""
SIZE = 320
"""Side of the crop the network sees (the inner part of the 328 crop)."""
OUT_CHANNELS = 3
EXPAND = 2
"""Expansion ratio of every inverted residual in the network."""


def check_audio_mode(audio_mode: str) -> None:
    """Raise a ValueError naming the allowed modes unless ``audio_mode`` is supported."""
    if audio_mode in AUDIO_MODES:
        return
    if audio_mode in KNOWN_AUDIO_MODES:
        raise ValueError(f"audio_mode {audio_mode!r}: SyncTalk_2D's {audio_mode} mode is not supported (it needs "
                         f"its own audio features); supported: {', '.join(AUDIO_MODES)}")
    raise ValueError(f"audio_mode {audio_mode!r}: unknown; supported: {', '.join(AUDIO_MODES)}")


def channels(width: float) -> tuple[int, ...]:
    """The five channel counts at ``width``; a ValueError unless they are whole numbers."""
    base = BASE_CHANNELS[0] * width
    # The skips only line up when each level has twice the channels of the one above
    # (up4 takes c1/2 + c0 = c1 channels), so the list is scaled as a whole.
    if not (base >= 2 and float(base).is_integer()):
        raise ValueError(f"width {width}: 32 * width must be a whole number >= 2 (e.g. 1.0 or 0.5)")
    return tuple(int(base) * 2**i for i in range(len(BASE_CHANNELS)))


class InvertedResidual(nn.Module):
    """1x1 expand, BN, ReLU; 3x3 depthwise (``stride``), BN, ReLU; 1x1 project, BN;
    the input added back when ``residual`` (same channels and stride 1 only)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, residual: bool = False,
                 expand: int = EXPAND) -> None:
        super().__init__()
        if residual and (stride != 1 or in_channels != out_channels):
            raise ValueError("a residual block keeps its shape: stride 1 and as many channels out as in")
        hidden = in_channels * expand
        self.residual = residual
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.residual else y


class DoubleBlock(nn.Module):
    """Two inverted residuals: ``in -> out`` with ``stride``, then a residual ``out -> out``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(InvertedResidual(in_channels, out_channels, stride),
                                         InvertedResidual(out_channels, out_channels, 1, residual=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class InputBlock(nn.Module):
    """The first block: one non-residual inverted residual at full resolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.inconv = nn.Sequential(InvertedResidual(in_channels, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inconv(x)


class Down(nn.Module):
    """Halve the resolution: a double block with stride 2 (the original's name says
    max-pool; there is none, the depthwise conv strides)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(DoubleBlock(in_channels, out_channels, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    """Double the resolution (bilinear, corners aligned), pad to the skip's size, concat
    [upsampled, skip] and mix with a stride-1 double block."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = DoubleBlock(in_channels, out_channels, stride=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        dy, dx = skip.shape[2] - x.shape[2], skip.shape[3] - x.shape[3]
        if dy or dx:  # as the original, for odd sides; at 320 every level halves exactly
            x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([x, skip], dim=1))


class OutConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class AudioAve(nn.Module):
    """The ``ave`` audio branch: ``[B, 32, 16, 16]`` -> ``[B, c4, 10, 10]``, the size of
    the image path's bottleneck."""

    def __init__(self, ch: tuple[int, ...]) -> None:
        super().__init__()
        self.conv1 = InvertedResidual(AUDIO_CHANNELS, ch[1])
        self.conv2 = InvertedResidual(ch[1], ch[2])
        self.conv3 = nn.Conv2d(ch[2], ch[3], kernel_size=3, stride=1, padding=1)
        self.bn3 = nn.BatchNorm2d(ch[3])
        self.conv4 = InvertedResidual(ch[3], ch[3], residual=True)
        # 16 -> 10: (16 + 2*3 - 3) // 2 + 1, matching 320 / 2**5.
        self.conv5 = nn.Conv2d(ch[3], ch[4], kernel_size=3, stride=2, padding=3)
        self.bn5 = nn.BatchNorm2d(ch[4])
        self.relu = nn.ReLU()
        self.conv6 = InvertedResidual(ch[4], ch[4], residual=True)
        self.conv7 = InvertedResidual(ch[4], ch[4], residual=True)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(audio))
        x = self.conv4(self.relu(self.bn3(self.conv3(x))))
        x = self.relu(self.bn5(self.conv5(x)))
        return self.conv7(self.conv6(x))


class LipSyncUNet(nn.Module):
    """``forward(x [B, 6, 320, 320], audio [B, 32, 16, 16]) -> [B, 3, 320, 320]`` in 0..1
    (BGR in, BGR out); state-dict compatible with SyncTalk_2D's ``Model(6, 'ave')``."""

    def __init__(self, width: float = 1.0, audio_mode: str = "ave") -> None:
        super().__init__()
        check_audio_mode(audio_mode)
        ch = channels(width)
        self.width, self.audio_mode = width, audio_mode
        self.audio_model = AudioAve(ch)
        self.fuse_conv = nn.Sequential(DoubleBlock(ch[4] * 2, ch[4], stride=1),
                                       DoubleBlock(ch[4], ch[3], stride=1))
        self.inc = InputBlock(IMAGE_CHANNELS, ch[0])
        self.down1 = Down(ch[0], ch[0])
        self.down2 = Down(ch[0], ch[1])
        self.down3 = Down(ch[1], ch[2])
        self.down4 = Down(ch[2], ch[3])
        self.down5 = Down(ch[3], ch[4])
        # Each up block's input is the level below (after its own up block) plus the skip:
        # c3 + c3 = c4, c3/2 + c2 = c3, c2/2 + c1 = c2, c1/2 + c0 = c1, c0 + c0 = c1.
        self.up1 = Up(ch[4], ch[3] // 2)
        self.up2 = Up(ch[3], ch[2] // 2)
        self.up3 = Up(ch[2], ch[1] // 2)
        self.up4 = Up(ch[1], ch[0])
        self.up5 = Up(ch[1], ch[0] // 2)
        self.outc = OutConv(ch[0] // 2, OUT_CHANNELS)

    def forward(self, x: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1:] != (IMAGE_CHANNELS, SIZE, SIZE):
            # The image path must reach the audio branch's 10x10 at its bottleneck: 320 / 2**5.
            raise ValueError(f"x must be [B, {IMAGE_CHANNELS}, {SIZE}, {SIZE}], got {tuple(x.shape)}")
        if audio.shape != (x.shape[0], AUDIO_CHANNELS, AUDIO_SIZE, AUDIO_SIZE):
            raise ValueError(f"audio must be [{x.shape[0]}, {AUDIO_CHANNELS}, {AUDIO_SIZE}, {AUDIO_SIZE}], "
                             f"got {tuple(audio.shape)}")
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x6 = self.down5(x5)
        y = self.fuse_conv(torch.cat([x6, self.audio_model(audio)], dim=1))
        y = self.up1(y, x5)
        y = self.up2(y, x4)
        y = self.up3(y, x3)
        y = self.up4(y, x2)
        y = self.up5(y, x1)
        return torch.sigmoid(self.outc(y))


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
