"""Loading a user's lip-sync U-Net (a SyncTalk_2D ``unet_328`` ``.pth``) and sizing it.

SyncTalk_2D's training saves ``torch.save(net.state_dict(), ...)``: a plain dict of
tensors, which is what ``load_unet`` expects. Two wrappers that other training scripts
commonly produce are unwrapped first, so users need not convert anything by hand:

- a checkpoint dict holding the weights under ``'state_dict'`` or ``'model'`` (next to
  optimiser state, an epoch number...): only that entry is used;
- key prefixes from wrappers around the network: ``module.`` (``nn.DataParallel`` /
  DistributedDataParallel) and ``_orig_mod.`` (a ``torch.compile``'d module), stripped
  when every key carries them.

Everything else goes through ``stages.weights``: ``read_weights`` (``weights_only``: a
weights file may hold tensors only, never code to run) and ``load_state`` (strict, key by
key and shape by shape, no NaN or infinity), so a file that does not fit fails with its
name and the mismatching tensors instead of loading half a model.

Audio modes: SyncTalk_2D's ``hubert`` checkpoints have the very same tensor names and
shapes as ``ave`` ones (one conv's stride differs), so the file cannot tell which mode it
was trained in; the avatar's manifest records ``audio_mode`` and it is passed here, where
every mode but ``ave`` is refused by name (``unet.check_audio_mode``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.lipsync.unet import BASE_CHANNELS, LipSyncUNet, channels, check_audio_mode
from stages.weights import load_state, read_weights

WHAT = "lip-sync U-Net weights"
SOURCE = "a SyncTalk_2D unet_328 state dict (.pth) trained in 'ave' mode"
"""Where such a file comes from, for the missing-file error (there is no converter to run)."""
WRAPPER_KEYS = ("state_dict", "model")
"""Checkpoint entries that may hold the state dict, tried in this order."""
WIDTH_KEY = "inc.inconv.0.conv.6.weight"
"""The first block's projection: [c0, 12, 1, 1], c0 = 32 x width."""
PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes of wrapper modules (DataParallel / DDP, torch.compile), stripped when on every key."""


def load_unet(path: Path, *, audio_mode: str = "ave", width: float | None = 1.0) -> LipSyncUNet:
    """The U-Net in ``path`` on the CPU, in eval mode without gradients; ``width`` None:
    the width the file was trained at (read from its first conv: 1.0 for SyncTalk_2D's
    own models, 0.5 for its mobile variant).

    Raises FileNotFoundError (no such file), ValueError (unreadable, not a state dict,
    keys or shapes that do not match a ``LipSyncUNet(width, audio_mode)``, non-finite
    values, an unsupported ``audio_mode``); every message names the file.
    """
    check_audio_mode(audio_mode)  # before reading: a hubert model must not load as ave
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{WHAT} not found: {path} (expected {SOURCE})")
    where = f"{WHAT} {path}"
    state = unwrap_state(read_weights(path, WHAT, SOURCE), where)
    if width is None:
        width = state_width(state, where)
    return load_state(LipSyncUNet(width=width, audio_mode=audio_mode), state, where)


def state_width(state: Any, where: str) -> float:
    """The width a U-Net state dict was made at, from ``WIDTH_KEY``'s output channels."""
    tensor = state.get(WIDTH_KEY) if isinstance(state, dict) else None
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
        raise ValueError(f"{where}: cannot tell the network's width: no 4-D tensor {WIDTH_KEY!r} "
                         "(not a SyncTalk_2D unet_328 state dict?)")
    width = tensor.shape[0] / BASE_CHANNELS[0]
    try:
        channels(width)
    except ValueError:
        raise ValueError(f"{where}: {WIDTH_KEY} has {tensor.shape[0]} output channels, not a width this "
                         f"network can have ({BASE_CHANNELS[0]} x width, e.g. 32 or 16)") from None
    return width


def unwrap_state(obj: Any, where: str) -> Any:
    """The state dict inside ``obj`` (a checkpoint's ``state_dict`` / ``model`` entry if it
    is one), with wrapper prefixes stripped; other objects are returned as they are, for
    ``load_state`` to refuse with its message."""
    if isinstance(obj, dict) and not _all_tensors(obj):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        else:
            others = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
            raise ValueError(f"{where}: expected a state dict of tensors (or a checkpoint with one under "
                             f"{' or '.join(repr(k) for k in WRAPPER_KEYS)}); entries that are not tensors: "
                             f"{others[:5]}{' ...' if len(others) > 5 else ''}")
    if isinstance(obj, dict) and obj:
        for prefix in PREFIXES:
            if all(isinstance(k, str) and k.startswith(prefix) for k in obj):
                obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def model_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers (each tensor once), for a byte budget."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _all_tensors(obj: dict) -> bool:
    return all(isinstance(v, torch.Tensor) for v in obj.values())
