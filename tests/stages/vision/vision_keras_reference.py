"""An independent numpy interpreter of fer's Keras model file, used to check the torch port.

It walks the stored ``model_config`` graph (layer by layer, following ``inbound_nodes``)
and computes each layer with TensorFlow's own semantics in channels_last layout, reading
the kernels in their Keras layout straight from the hdf5. Nothing here is shared with
``stages.vision.emotion_model``, so a layout, padding or wiring mistake in the port shows
up as a mismatch instead of being repeated.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], padding: str,
         value: float = 0.0) -> np.ndarray:
    if padding == "valid":
        return x
    (t, b), (l, r) = _same_pads(x.shape[1], kernel[0], stride[0]), _same_pads(x.shape[2], kernel[1], stride[1])
    return np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)), constant_values=value)


def _windows(x: np.ndarray, kh: int, kw: int, sh: int, sw: int):
    """Yield (i, j, strided view) for every kernel offset of a valid correlation."""
    oh = (x.shape[1] - kh) // sh + 1
    ow = (x.shape[2] - kw) // sw + 1
    for i in range(kh):
        for j in range(kw):
            yield i, j, x[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]


def conv2d(x: np.ndarray, kernel: np.ndarray, strides, padding: str) -> np.ndarray:
    kh, kw = kernel.shape[:2]
    x = _pad(x, (kh, kw), strides, padding)
    return sum(view @ kernel[i, j] for i, j, view in _windows(x, kh, kw, *strides))


def depthwise2d(x: np.ndarray, kernel: np.ndarray, strides, padding: str) -> np.ndarray:
    kh, kw = kernel.shape[:2]
    x = _pad(x, (kh, kw), strides, padding)
    return sum(view * kernel[i, j, :, 0] for i, j, view in _windows(x, kh, kw, *strides))


def batch_norm(x: np.ndarray, w: dict[str, np.ndarray], epsilon: float) -> np.ndarray:
    return (x - w["moving_mean"]) / np.sqrt(w["moving_variance"] + epsilon) * w["gamma"] + w["beta"]


def max_pool(x: np.ndarray, pool, strides, padding: str) -> np.ndarray:
    x = _pad(x, pool, strides, padding, value=-np.inf)
    return np.maximum.reduce([view for _, _, view in _windows(x, *pool, *strides)])


def activation(x: np.ndarray, name: str) -> np.ndarray:
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    if name == "linear":
        return x
    raise ValueError(f"activation {name!r} not implemented")


def run_keras_file(path: Path, x_nhwc: np.ndarray) -> np.ndarray:
    """Outputs of the Keras model stored at ``path`` for an NHWC float batch (float64)."""
    import h5py

    with h5py.File(path, "r") as f:
        config = json.loads(f.attrs["model_config"])
        groups = f["model_weights"]
        values: dict[str, np.ndarray] = {}
        for layer in config["config"]["layers"]:
            kind, cfg, name = layer["class_name"], layer["config"], layer["config"]["name"]
            inputs = [values[node[0]] for node in layer["inbound_nodes"][0]] if layer["inbound_nodes"] else []
            weights = {}
            if name in groups:
                group = groups[name]
                for full in group.attrs["weight_names"]:
                    full = full.decode() if isinstance(full, bytes) else full
                    weights[full.rsplit("/", 1)[-1].split(":")[0]] = np.asarray(group[full], np.float64)
            if kind == "InputLayer":
                out = x_nhwc.astype(np.float64)
            elif kind == "Conv2D":
                out = conv2d(inputs[0], weights["kernel"], cfg["strides"], cfg["padding"])
                if cfg["use_bias"]:
                    out = out + weights["bias"]
                out = activation(out, cfg["activation"])
            elif kind == "SeparableConv2D":
                out = depthwise2d(inputs[0], weights["depthwise_kernel"], cfg["strides"], cfg["padding"])
                out = conv2d(out, weights["pointwise_kernel"], (1, 1), "valid")
                if cfg["use_bias"]:
                    out = out + weights["bias"]
                out = activation(out, cfg["activation"])
            elif kind == "BatchNormalization":
                out = batch_norm(inputs[0], weights, cfg["epsilon"])
            elif kind == "Activation":
                out = activation(inputs[0], cfg["activation"])
            elif kind == "MaxPooling2D":
                out = max_pool(inputs[0], cfg["pool_size"], cfg["strides"], cfg["padding"])
            elif kind == "Add":
                out = sum(inputs)
            elif kind == "GlobalAveragePooling2D":
                out = inputs[0].mean(axis=(1, 2))
            else:
                raise ValueError(f"layer type {kind} not implemented")
            values[name] = out
        return values[config["config"]["output_layers"][0][0]]
