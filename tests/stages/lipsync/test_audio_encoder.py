"""SyncTalk_2D's audio encoder: its parameter names and shapes, its blocks, its loader.

Random weights appear here only to check shapes and that a saved file loads back to
the same network; no output of an untrained encoder is judged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stages.lipsync.audio_encoder import AudioEncoder, ConvBlock, load_audio_encoder

# SyncTalk_2D utils.py AudioEncoder, block by block: (in, out, kernel) of its Conv2d.
SYNCTALK_CONVS = [(1, 32, 3), (32, 32, 3), (32, 32, 3), (32, 64, 3), (64, 64, 3), (64, 64, 3),
                  (64, 128, 3), (128, 128, 3), (128, 128, 3), (128, 256, 3), (256, 256, 3),
                  (256, 512, 3), (512, 512, 1)]
PER_BLOCK = ["conv_block.0.weight", "conv_block.0.bias", "conv_block.1.weight", "conv_block.1.bias",
             "conv_block.1.running_mean", "conv_block.1.running_var", "conv_block.1.num_batches_tracked"]


def synctalk_keys() -> list[str]:
    return [f"audio_encoder.{i}.{name}" for i in range(len(SYNCTALK_CONVS)) for name in PER_BLOCK]


def random_encoder(seed: int = 0) -> AudioEncoder:
    torch.manual_seed(seed)
    model = AudioEncoder()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a loader that drops them shows
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_state_dict_names_and_shapes_match_synctalk() -> None:
    state = AudioEncoder().state_dict()
    assert list(state) == synctalk_keys()
    for i, (cin, cout, k) in enumerate(SYNCTALK_CONVS):
        assert state[f"audio_encoder.{i}.conv_block.0.weight"].shape == (cout, cin, k, k)
        assert state[f"audio_encoder.{i}.conv_block.1.running_var"].shape == (cout,)


def test_output_is_512_per_window() -> None:
    model = random_encoder()
    with torch.no_grad():
        out = model(torch.randn(3, 1, 80, 16))
    assert out.shape == (3, 512)
    with pytest.raises(ValueError, match=r"\[B, 1, 80, 16\]"):
        model(torch.randn(3, 1, 80, 15))


def test_strides_follow_synctalk() -> None:
    shapes = []
    x = torch.randn(1, 1, 80, 16)
    with torch.no_grad():
        for block in random_encoder().audio_encoder:
            x = block(x)
            shapes.append(tuple(x.shape[2:]))
    assert shapes == [(80, 16)] * 3 + [(27, 16)] * 3 + [(9, 6)] * 3 + [(3, 3)] * 2 + [(1, 1)] * 2


@pytest.mark.parametrize("residual", [True, False])
def test_residual_is_added_before_the_relu(residual: bool) -> None:
    """Conv output 0, BatchNorm shift -1: relu(x - 1) with the residual, 0 without (a
    residual added after the ReLU would give x instead)."""
    block = ConvBlock(4, 4, 3, 1, 1, residual=residual).eval()
    with torch.no_grad():
        block.conv_block[0].weight.zero_()
        block.conv_block[0].bias.zero_()
        block.conv_block[1].bias.fill_(-1.0)   # BN(0) = -1 with mean 0, var 1, weight 1
        x = 3 * torch.randn(2, 4, 5, 5)
        out = block(x)
    want = torch.relu(x - 1) if residual else torch.zeros_like(x)
    assert torch.allclose(out, want, atol=1e-5)


def test_loads_synctalk_file_without_prefix(tmp_path: Path) -> None:
    source = random_encoder(1)
    path = tmp_path / "audio_visual_encoder.pth"
    torch.save(source.audio_encoder.state_dict(), path)         # SyncTalk's layout: '0.conv_block...'
    assert next(iter(torch.load(path))).startswith("0.conv_block")
    loaded = load_audio_encoder(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(2, 1, 80, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


def test_loads_own_state_dict_with_prefix(tmp_path: Path) -> None:
    source = random_encoder(2)
    path = tmp_path / "encoder.pt"
    torch.save(source.state_dict(), path)
    loaded = load_audio_encoder(path)
    for key, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_missing_batch_counters_are_tolerated(tmp_path: Path) -> None:
    state = {k: v for k, v in random_encoder(3).state_dict().items() if "num_batches_tracked" not in k}
    path = tmp_path / "old.pt"
    torch.save(state, path)
    loaded = load_audio_encoder(path)
    assert torch.equal(loaded.state_dict()["audio_encoder.4.conv_block.1.running_mean"],
                       state["audio_encoder.4.conv_block.1.running_mean"])


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    state = random_encoder().state_dict()
    del state["audio_encoder.12.conv_block.0.weight"]
    state["audio_encoder.13.conv_block.0.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        load_audio_encoder(path)
    message = str(err.value)
    assert str(path) in message
    assert "audio_encoder.12.conv_block.0.weight" in message and "audio_encoder.13.conv_block.0.weight" in message


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    state = random_encoder().audio_encoder.state_dict()
    state["11.conv_block.0.weight"] = torch.zeros(512, 256, 1, 1)
    path = tmp_path / "shape.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"audio_encoder\.11\.conv_block\.0\.weight has shape \(512, 256, 1, 1\), "
                                         r"expected \(512, 256, 3, 3\)") as err:
        load_audio_encoder(path)
    assert str(path) in str(err.value)


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    state = random_encoder().state_dict()
    state["audio_encoder.0.conv_block.0.bias"][0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match="audio_encoder.0.conv_block.0.bias holds NaN"):
        load_audio_encoder(path)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="audio encoder weights not found: .*nothing.pth"):
        load_audio_encoder(tmp_path / "nothing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pth: not a readable torch state_dict"):
        load_audio_encoder(junk)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ValueError, match="expected a dict of tensors"):
        load_audio_encoder(listed)
