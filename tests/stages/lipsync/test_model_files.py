"""Loading U-Net weights files: a round trip, the checkpoint wrappers users have, and every
way a file can be wrong, each failing with the file's name and what does not fit."""

from __future__ import annotations

import pytest
import torch

from stages.lipsync.model_files import load_unet, model_bytes, state_width
from stages.lipsync.unet import LipSyncUNet, parameter_count

WIDTH = 0.5


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    """A half-width state dict with every float tensor random (so a round trip that loses
    or mixes up any tensor shows), as training would have saved it."""
    generator = torch.Generator().manual_seed(0)
    state = LipSyncUNet(width=WIDTH).state_dict()
    return {k: (torch.rand(v.shape, generator=generator) + 0.5 if v.is_floating_point() else v + 7)
            for k, v in state.items()}


def save(obj, path):
    torch.save(obj, path)
    return path


def assert_same_state(model: LipSyncUNet, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert list(loaded) == list(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_round_trip_gives_the_same_tensors_in_eval_mode_without_gradients(tmp_path, state):
    model = load_unet(save(state, tmp_path / "unet.pth"), width=WIDTH)
    assert isinstance(model, LipSyncUNet) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert_same_state(model, state)


@pytest.mark.parametrize("wrap", [
    lambda s: {"state_dict": s, "epoch": 12},
    lambda s: {"model": s, "optimizer": {"lr": 1e-3}},
    lambda s: {f"module.{k}": v for k, v in s.items()},
    lambda s: {"state_dict": {f"module._orig_mod.{k}": v for k, v in s.items()}, "epoch": 3},
], ids=["state_dict", "model", "DataParallel prefix", "wrapped and compiled"])
def test_checkpoint_wrappers_are_unwrapped(tmp_path, state, wrap):
    assert_same_state(load_unet(save(wrap(state), tmp_path / "ckpt.pth"), width=WIDTH), state)


def test_width_none_reads_the_width_from_the_file(tmp_path, state):
    model = load_unet(save({"state_dict": state}, tmp_path / "half.pth"), width=None)
    assert model.width == 0.5
    assert_same_state(model, state)
    with torch.device("meta"):
        full = LipSyncUNet().state_dict()
    assert state_width(full, "x") == 1.0
    odd = dict(state)
    odd["inc.inconv.0.conv.6.weight"] = torch.zeros(1, 12, 1, 1)
    with pytest.raises(ValueError, match="has 1 output channels, not a width"):
        load_unet(save(odd, tmp_path / "odd.pth"), width=None)
    del odd["inc.inconv.0.conv.6.weight"]
    path = save(odd, tmp_path / "no-inc.pth")
    with pytest.raises(ValueError, match="cannot tell the network's width") as error:
        load_unet(path, width=None)
    assert str(path) in str(error.value)


def test_a_renamed_key_is_named_as_missing_and_unexpected(tmp_path, state):
    renamed = dict(state)
    renamed["outc.conv.weights"] = renamed.pop("outc.conv.weight")
    path = save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match="keys do not match") as error:
        load_unet(path, width=WIDTH)
    message = str(error.value)
    assert str(path) in message
    assert "missing ['outc.conv.weight']" in message and "unexpected ['outc.conv.weights']" in message


def test_a_wrong_shape_is_named_with_both_shapes(tmp_path, state):
    path = save(state, tmp_path / "half.pth")
    with pytest.raises(ValueError) as error:
        load_unet(path, width=1.0)  # a half-width file read as full width
    message = str(error.value)
    assert str(path) in message and "has shape" in message and "expected" in message
    wrong = dict(state)
    wrong["audio_model.conv5.bias"] = torch.zeros(3)
    path = save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"audio_model\.conv5\.bias has shape \(3,\), expected \(256,\)"):
        load_unet(path, width=WIDTH)


def test_non_finite_values_are_refused(tmp_path, state):
    bad = dict(state)
    bad["up3.conv.double_conv.0.conv.0.weight"] = bad["up3.conv.double_conv.0.conv.0.weight"].clone()
    bad["up3.conv.double_conv.0.conv.0.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"up3\.conv\.double_conv\.0\.conv\.0\.weight holds NaN"):
        load_unet(save(bad, tmp_path / "nan.pth"), width=WIDTH)


def test_a_missing_file_is_named(tmp_path):
    path = tmp_path / "nowhere" / "unet.pth"
    with pytest.raises(FileNotFoundError, match="lip-sync U-Net weights not found") as error:
        load_unet(path)
    assert str(path) in str(error.value) and "SyncTalk_2D" in str(error.value)


def test_files_without_a_state_dict_are_refused(tmp_path):
    not_torch = tmp_path / "notes.pth"
    not_torch.write_text("these are not weights")
    with pytest.raises(ValueError, match="not a readable torch state_dict") as error:
        load_unet(not_torch)
    assert str(not_torch) in str(error.value)
    with pytest.raises(ValueError, match="expected a dict of tensors, got list"):
        load_unet(save([1, 2, 3], tmp_path / "list.pth"))
    path = save({"epoch": 3, "lr": 0.1, "weights": torch.zeros(2)}, tmp_path / "meta.pth")
    with pytest.raises(ValueError, match=r"entries that are not tensors: \['epoch', 'lr'\]") as error:
        load_unet(path)
    assert str(path) in str(error.value)


def test_only_the_ave_audio_mode_loads(tmp_path, state):
    path = save(state, tmp_path / "unet.pth")
    with pytest.raises(ValueError, match="hubert mode is not supported"):
        load_unet(path, audio_mode="hubert", width=WIDTH)


def test_model_bytes_counts_parameters_and_buffers_once():
    model = LipSyncUNet(width=WIDTH)
    expected = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert model_bytes(model) == expected
    # fp32 parameters are most of it; the BN running statistics add the rest.
    assert parameter_count(model) * 4 < expected < parameter_count(model) * 4 * 1.05
    half = model.to(torch.bfloat16)
    floats = sum(t.numel() for t in half.state_dict().values() if t.is_floating_point())
    counters = sum(1 for k in half.state_dict() if k.endswith("num_batches_tracked"))
    assert model_bytes(half) == floats * 2 + counters * 8
    with torch.device("meta"):
        full = LipSyncUNet()
    assert 48e6 < model_bytes(full) < 50e6  # 12.19 M fp32 parameters and their BN statistics
