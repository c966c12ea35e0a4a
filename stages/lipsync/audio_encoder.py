"""SyncTalk_2D's audio encoder: a 16-frame mel window in, one 512-d feature out.

The lip-sync U-Net was trained on the features of this exact network (SyncTalk_2D's
``AudioEncoder`` in ``utils.py``, the audio half of Wav2Lip's encoder with its weights in
``audio_visual_encoder.pth``), so the layer layout and the parameter names below are
fixed by that file, not a design choice: ``audio_encoder.<i>.conv_block.0`` is the
convolution of block i and ``audio_encoder.<i>.conv_block.1`` its BatchNorm.

Each block is Conv2d + BatchNorm2d, then ReLU; a residual block adds its input before
the ReLU. On a [B, 1, 80, 16] mel window (80 bands x 16 frames = 0.2 s):

    block  channels   kernel stride pad  residual   output (bands x frames)
    0      1 -> 32    3      1      1               80 x 16
    1-2    32         3      1      1    yes        80 x 16
    3      32 -> 64   3      (3,1)  1               27 x 16
    4-5    64         3      1      1    yes        27 x 16
    6      64 -> 128  3      3      1                9 x 6
    7-8    128        3      1      1    yes         9 x 6
    9      128 -> 256 3      (3,2)  1                3 x 3
    10     256        3      1      1    yes         3 x 3
    11     256 -> 512 3      1      0                1 x 1
    12     512        1      1      0                1 x 1

``load_audio_encoder`` reads either SyncTalk's file (its keys lack the
``audio_encoder.`` prefix: SyncTalk loads it into the inner Sequential) or a state dict
of this module (with the prefix).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from stages.weights import load_state, read_weights

PREFIX = "audio_encoder."
MEL_BANDS = 80
MEL_FRAMES = 16
FEATURE_DIM = 512

# (in, out, kernel, stride, padding, residual) per block, in order; see the table above.
_LAYOUT: tuple[tuple[int, int, int, int | tuple[int, int], int, bool], ...] = (
    (1, 32, 3, 1, 1, False),
    (32, 32, 3, 1, 1, True),
    (32, 32, 3, 1, 1, True),
    (32, 64, 3, (3, 1), 1, False),
    (64, 64, 3, 1, 1, True),
    (64, 64, 3, 1, 1, True),
    (64, 128, 3, 3, 1, False),
    (128, 128, 3, 1, 1, True),
    (128, 128, 3, 1, 1, True),
    (128, 256, 3, (3, 2), 1, False),
    (256, 256, 3, 1, 1, True),
    (256, 512, 3, 1, 0, False),
    (512, 512, 1, 1, 0, False),
)


class ConvBlock(nn.Module):
    """Conv2d + BatchNorm2d (``conv_block.0`` / ``conv_block.1``), optional residual, ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int | tuple[int, int],
                 padding: int, residual: bool = False) -> None:
        super().__init__()
        if residual and (cin != cout or stride != 1):
            raise ValueError(f"a residual block keeps its shape; got {cin}->{cout} stride {stride}")
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel_size, stride, padding),
                                        nn.BatchNorm2d(cout))
        self.act = nn.ReLU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return self.act(out)


class AudioEncoder(nn.Module):
    """[B, 1, 80, 16] normalised mel windows -> [B, 512] features (SyncTalk_2D layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_encoder = nn.Sequential(*(ConvBlock(*spec) for spec in _LAYOUT))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.dim() != 4 or tuple(mel.shape[1:]) != (1, MEL_BANDS, MEL_FRAMES):
            raise ValueError(f"AudioEncoder: expected mel windows [B, 1, {MEL_BANDS}, {MEL_FRAMES}], "
                             f"got {tuple(mel.shape)}")
        return self.audio_encoder(mel).flatten(1)


def _with_prefix(state: object) -> object:
    """SyncTalk's keys ('0.conv_block.0.weight') -> ours ('audio_encoder.0.conv_block...').
    Only a dict whose keys all lack the prefix is rewritten; anything else goes to
    ``load_state`` unchanged so its errors name the keys as they are in the file."""
    if not isinstance(state, dict) or not state:
        return state
    keys = [str(k) for k in state]
    if any(k.startswith(PREFIX) for k in keys):
        return state
    return {PREFIX + k: v for k, v in zip(keys, state.values())}


def _fill_batch_counters(state: object, model: nn.Module) -> object:
    """Checkpoints written by old torch versions (or stripped ones) lack the BatchNorm
    ``num_batches_tracked`` counters; they only matter for training with momentum=None,
    never in eval, so a missing counter is set to 0 instead of refusing the file."""
    if not isinstance(state, dict):
        return state
    filled = dict(state)
    for key, tensor in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in filled:
            filled[key] = torch.zeros_like(tensor)
    return filled


def load_audio_encoder(path: Path, device: torch.device | str = "cpu") -> AudioEncoder:
    """The encoder with the weights in ``path``, in eval mode without gradients, on
    ``device``. Raises FileNotFoundError for a missing file and ValueError naming the
    file and the mismatching tensors (missing, unexpected, wrong shape, non-finite)."""
    path = Path(path)
    what = "audio encoder weights"
    if not path.is_file():  # read_weights would suggest a converter; there is none for this file
        raise FileNotFoundError(f"{what} not found: {path} (expected SyncTalk_2D's "
                                "audio_visual_encoder.pth or a saved AudioEncoder state_dict)")
    state = read_weights(path, what, converter="-")
    model = AudioEncoder()
    state = _fill_batch_counters(_with_prefix(state), model)
    return load_state(model, state, f"{what} {path}").to(device)
