"""The three MTCNN networks (Zhang et al. 2016) and the loader for their converted weights.

Layer for layer the networks of facenet-pytorch 2.6.0 (``facenet_pytorch/models/mtcnn.py``),
which carry the original Caffe weights via davidsandberg/facenet's TensorFlow port, with
the same parameter names so the converted state dicts map one to one:

    PNet  12x12 window, fully convolutional: conv3 10, PReLU, maxpool 2/2, conv3 16, PReLU,
          conv3 32, PReLU, then 1x1 heads: face logits (2) and box offsets (4)
    RNet  24x24 crop: conv3 28, PReLU, maxpool 3/2, conv3 48, PReLU, maxpool 3/2,
          conv2 64, PReLU, dense 128, PReLU, heads: face logits (2), box offsets (4)
    ONet  48x48 crop: conv3 32, PReLU, maxpool 3/2, conv3 64, PReLU, maxpool 3/2,
          conv3 64, PReLU, maxpool 2/2, conv2 128, PReLU, dense 256, PReLU,
          heads: face logits (2), box offsets (4), landmarks (10: five x, then five y)

All max pools round up (``ceil_mode``) as Caffe does. The networks take NCHW RGB images
normalised as ``(x - 127.5) / 128`` in their natural orientation: the Caffe models were
trained on transposed (column-major) images, and facenet-pytorch already folded that
transpose into the conv kernels. facenet-pytorch still flattened the last conv map in
(W, H, C) order before the dense layer; ``launch/convert_mtcnn_weights.py`` permutes the
dense layer's input columns instead, so these modules flatten plainly in (C, H, W) order.

The networks are returned in channels_last memory format and run fastest on channels_last
input (which ``stages.vision.mtcnn`` builds). Heads return probabilities (softmax over
the two face logits; index 1 is "face") and offsets as fractions of the input window's
side, exactly as the reference does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from stages.weights import load_state, read_weights

WEIGHTS_DESCRIPTION = "MTCNN weights"


class PNet(nn.Module):
    """Proposal net: ``[N, 3, H, W]`` -> face probability ``[N, H', W']``, offsets ``[N, 4, H', W']``.

    Each output cell scores the 12x12 input window at (2 * row, 2 * col).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, 3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, 3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return torch.softmax(self.conv4_1(x), dim=1)[:, 1], self.conv4_2(x)


class RNet(nn.Module):
    """Refinement net: ``[N, 3, 24, 24]`` -> face probability ``[N]``, box offsets ``[N, 4]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, 3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, 3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, 2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu4(self.dense4(self.prelu3(self.conv3(x)).flatten(1)))
        return torch.softmax(self.dense5_1(x), dim=1)[:, 1], self.dense5_2(x)


class ONet(nn.Module):
    """Output net: ``[N, 3, 48, 48]`` -> probability ``[N]``, offsets ``[N, 4]``, landmarks ``[N, 10]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, 3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, 2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu5(self.dense5(self.prelu4(self.conv4(x)).flatten(1)))
        return torch.softmax(self.dense6_1(x), dim=1)[:, 1], self.dense6_2(x), self.dense6_3(x)


NETWORKS: dict[str, type[nn.Module]] = {"pnet": PNet, "rnet": RNet, "onet": ONet}
"""Key in the weights file -> network class."""


def load_mtcnn_nets(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, nn.Module, nn.Module]:
    """Load the converted weights file and return (PNet, RNet, ONet) in eval mode on ``device``.

    Raises ``FileNotFoundError`` when the file is missing and ``ValueError`` naming the file
    when it is not the expected ``{"pnet": ..., "rnet": ..., "onet": ...}`` of state dicts.
    """
    path = Path(path)
    bundle = read_weights(path, WEIGHTS_DESCRIPTION, "launch/convert_mtcnn_weights.py")
    if not isinstance(bundle, dict) or set(bundle) != set(NETWORKS):
        got = sorted(bundle) if isinstance(bundle, dict) else type(bundle).__name__
        raise ValueError(f"{WEIGHTS_DESCRIPTION} {path}: expected a dict with keys {sorted(NETWORKS)}, got {got}")

    def ready(name: str) -> nn.Module:
        # channels_last: on CPU, max pooling NHWC is ~10x faster than NCHW and the convs gain too.
        model = load_state(NETWORKS[name](), bundle[name], f"{WEIGHTS_DESCRIPTION} {path}: {name}")
        return model.to(device, memory_format=torch.channels_last)

    return ready("pnet"), ready("rnet"), ready("onet")
