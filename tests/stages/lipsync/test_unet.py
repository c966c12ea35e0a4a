"""The lip-sync U-Net: SyncTalk_2D ``unet_328`` (``ave``) state-dict compatibility, checked
against a key/shape list written out here from the original's layer plan (not from our
module), its parameter count, and the forward's shapes, range and wiring (half width)."""

from __future__ import annotations

import pytest
import torch

from stages.lipsync.unet import (
    InvertedResidual,
    LipSyncUNet,
    Up,
    channels,
    check_audio_mode,
    parameter_count,
)

FULL_WIDTH_PARAMETERS = 12_186_935
"""SyncTalk_2D's 'ave' unet_328 has 12.19 M parameters."""


def _bn(keys: dict, prefix: str, c: int) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{prefix}.{name}"] = (c,)
    keys[f"{prefix}.num_batches_tracked"] = ()


def _block(keys: dict, prefix: str, cin: int, cout: int) -> None:
    """One inverted residual (expand 2): 1x1, BN, ReLU, 3x3 depthwise, BN, ReLU, 1x1, BN."""
    hidden = 2 * cin
    keys[f"{prefix}.conv.0.weight"] = (hidden, cin, 1, 1)
    _bn(keys, f"{prefix}.conv.1", hidden)
    keys[f"{prefix}.conv.3.weight"] = (hidden, 1, 3, 3)
    _bn(keys, f"{prefix}.conv.4", hidden)
    keys[f"{prefix}.conv.6.weight"] = (cout, hidden, 1, 1)
    _bn(keys, f"{prefix}.conv.7", cout)


def _double(keys: dict, prefix: str, cin: int, cout: int) -> None:
    _block(keys, f"{prefix}.double_conv.0", cin, cout)
    _block(keys, f"{prefix}.double_conv.1", cout, cout)


def synctalk_ave_keys() -> dict[str, tuple[int, ...]]:
    """Every state-dict key and shape of SyncTalk_2D's ``Model(6, 'ave')``, in its order,
    from its layer plan with the literal full-width channel numbers."""
    keys: dict[str, tuple[int, ...]] = {}
    _block(keys, "audio_model.conv1", 32, 64)
    _block(keys, "audio_model.conv2", 64, 128)
    keys["audio_model.conv3.weight"], keys["audio_model.conv3.bias"] = (256, 128, 3, 3), (256,)
    _bn(keys, "audio_model.bn3", 256)
    _block(keys, "audio_model.conv4", 256, 256)
    keys["audio_model.conv5.weight"], keys["audio_model.conv5.bias"] = (512, 256, 3, 3), (512,)
    _bn(keys, "audio_model.bn5", 512)
    _block(keys, "audio_model.conv6", 512, 512)
    _block(keys, "audio_model.conv7", 512, 512)
    _double(keys, "fuse_conv.0", 1024, 512)
    _double(keys, "fuse_conv.1", 512, 256)
    _block(keys, "inc.inconv.0", 6, 32)
    for name, cin, cout in (("down1", 32, 32), ("down2", 32, 64), ("down3", 64, 128), ("down4", 128, 256),
                            ("down5", 256, 512)):
        _double(keys, f"{name}.maxpool_conv.0", cin, cout)
    for name, cin, cout in (("up1", 512, 128), ("up2", 256, 64), ("up3", 128, 32), ("up4", 64, 32),
                            ("up5", 64, 16)):
        _double(keys, f"{name}.conv", cin, cout)
    keys["outc.conv.weight"], keys["outc.conv.bias"] = (3, 16, 1, 1), (3,)
    return keys


@pytest.fixture(scope="module")
def full() -> LipSyncUNet:
    with torch.device("meta"):  # shapes only: no memory, no init time
        return LipSyncUNet()


def calibrated(model: LipSyncUNet, seed: int = 0) -> LipSyncUNet:
    """``model`` in eval mode with each BatchNorm's running statistics set to those of one
    random batch: with the default ones (mean 0, variance 1) the signal of a random-weight
    network fades layer by layer and the output barely depends on its inputs."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average: one batch sets the statistics
    with torch.no_grad():
        model.train()(torch.rand(2, 6, 320, 320, generator=generator), torch.randn(2, 32, 16, 16, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def half() -> LipSyncUNet:
    torch.manual_seed(0)
    return calibrated(LipSyncUNet(width=0.5))


def test_full_width_has_the_original_parameter_count(full):
    assert parameter_count(full) == FULL_WIDTH_PARAMETERS
    assert round(FULL_WIDTH_PARAMETERS / 1e6, 2) == 12.19
    # The key list below counts the same parameters (BN running stats are buffers).
    spec = synctalk_ave_keys()
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    counted = sum(torch.Size(shape).numel() for key, shape in spec.items() if not key.endswith(buffers))
    assert counted == FULL_WIDTH_PARAMETERS


def test_state_dict_keys_and_shapes_are_synctalks(full):
    got = {key: tuple(value.shape) for key, value in full.state_dict().items()}
    expected = synctalk_ave_keys()
    assert sorted(set(got) - set(expected)) == [] and sorted(set(expected) - set(got)) == []
    assert list(got) == list(expected)  # same registration order as the original, too
    assert [k for k in expected if got[k] != expected[k]] == []
    assert len(got) == 556


@pytest.mark.parametrize(("key", "shape"), [
    ("audio_model.conv1.conv.0.weight", (64, 32, 1, 1)),
    ("audio_model.conv5.weight", (512, 256, 3, 3)),
    ("fuse_conv.0.double_conv.0.conv.0.weight", (2048, 1024, 1, 1)),
    ("inc.inconv.0.conv.0.weight", (12, 6, 1, 1)),
    ("down5.maxpool_conv.0.double_conv.0.conv.3.weight", (512, 1, 3, 3)),
    ("up1.conv.double_conv.1.conv.7.running_var", (128,)),
    ("outc.conv.weight", (3, 16, 1, 1)),
    ("outc.conv.bias", (3,)),
])
def test_known_synctalk_tensors(full, key, shape):
    assert tuple(full.state_dict()[key].shape) == shape


def test_half_width_is_the_mobile_channel_list_with_the_same_keys(full, half):
    assert channels(0.5) == (16, 32, 64, 128, 256) and channels(1.0) == (32, 64, 128, 256, 512)
    state = half.state_dict()
    assert list(state) == list(full.state_dict())
    assert tuple(state["outc.conv.weight"].shape) == (3, 8, 1, 1)
    assert tuple(state["inc.inconv.0.conv.0.weight"].shape) == (12, 6, 1, 1)
    # The audio window keeps its 32 channels at any width.
    assert tuple(state["audio_model.conv1.conv.0.weight"].shape) == (64, 32, 1, 1)
    assert tuple(state["audio_model.conv1.conv.6.weight"].shape) == (32, 64, 1, 1)
    assert parameter_count(half) < FULL_WIDTH_PARAMETERS / 3


def test_forward_gives_three_channels_at_320_strictly_inside_0_1(half):
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, 6, 320, 320, generator=generator)
    audio = torch.randn(2, 32, 16, 16, generator=generator)
    with torch.no_grad():
        y = half(x, audio)
        quiet = half(x[:1], torch.zeros(1, 32, 16, 16))
    assert y.shape == (2, 3, 320, 320) and y.dtype == torch.float32
    assert 0.0 < y.min() and y.max() < 1.0
    # The audio reaches the output (the fuse path is wired), and rows stay apart in eval mode.
    assert (quiet - y[:1]).abs().max() > 1e-3
    assert (y[0] - y[1]).abs().max() > 1e-3


def test_forward_refuses_other_shapes(half):
    with pytest.raises(ValueError, match=r"x must be \[B, 6, 320, 320\]"):
        half(torch.zeros(1, 6, 160, 160), torch.zeros(1, 32, 16, 16))
    with pytest.raises(ValueError, match=r"audio must be \[1, 32, 16, 16\]"):
        half(torch.zeros(1, 6, 320, 320), torch.zeros(1, 16, 32, 32))


def test_inverted_residual_adds_its_input_only_when_residual():
    torch.manual_seed(0)
    residual, plain = InvertedResidual(4, 4, residual=True).eval(), InvertedResidual(4, 4).eval()
    for block in (residual, plain):
        torch.nn.init.zeros_(block.conv[7].weight)  # the last BN outputs zeros: the branch is silent
        torch.nn.init.zeros_(block.conv[7].bias)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        assert torch.equal(residual(x), x)
        assert torch.equal(plain(x), torch.zeros_like(x))
        strided = InvertedResidual(4, 8, stride=2).eval()(x)
    assert strided.shape == (1, 8, 3, 3)
    with pytest.raises(ValueError, match="residual block keeps its shape"):
        InvertedResidual(4, 8, residual=True)


def test_up_doubles_pads_to_the_skip_and_concatenates():
    up = Up(4 + 4, 5).eval()
    with torch.no_grad():
        assert up(torch.randn(1, 4, 5, 5), torch.randn(1, 4, 10, 10)).shape == (1, 5, 10, 10)
        assert up(torch.randn(1, 4, 5, 5), torch.randn(1, 4, 11, 11)).shape == (1, 5, 11, 11)


def test_widths_and_audio_modes_are_checked():
    for width in (0.3, 0.0, -1.0):
        with pytest.raises(ValueError, match="32 \\* width must be a whole number"):
            LipSyncUNet(width=width)
    check_audio_mode("ave")
    with pytest.raises(ValueError, match="hubert mode is not supported.*supported: ave"):
        LipSyncUNet(audio_mode="hubert")
    with pytest.raises(ValueError, match="'mel': unknown; supported: ave"):
        check_audio_mode("mel")
