"""Loading the shipped (or a user's) converted weights: one careful path for every network.

The stages' networks (emotion, MTCNN, style net) load converted state dicts from files
the project ships or a user names. A bad file must fail at startup with its name and
what is wrong, never load half a model: ``read_weights`` opens the file (``weights_only``:
it holds plain tensors, so nothing in it may run code), ``load_state`` checks a state
dict against the network key by key and shape by shape, refuses non-finite values and
loads it strictly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def read_weights(path: Path, what: str, converter: str) -> Any:
    """The object saved in ``path``; ``what`` names the weights in errors ('style net
    weights'), ``converter`` is the script that makes the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path} (convert them with {converter})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files; name the file once
        raise ValueError(f"{what} {path}: not a readable torch state_dict ({e})") from e


def load_state(model: M, state: object, where: str) -> M:
    """``model`` with ``state`` loaded strictly, in eval mode without gradients; a
    ValueError starting with ``where`` (e.g. 'emotion weights /x.pt') if it does not fit."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{where}: expected a dict of tensors, got {type(state).__name__}")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: keys do not match {type(model).__name__}; "
                         f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise ValueError(f"{where}: {key} has shape {tuple(state[key].shape)}, expected {tuple(tensor.shape)}")
        if state[key].is_floating_point() and not torch.isfinite(state[key]).all():
            raise ValueError(f"{where}: {key} holds NaN or infinite values")
    model.load_state_dict(state)
    model.eval().requires_grad_(False)
    return model
