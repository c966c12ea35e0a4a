"""Offline model loading: a diffusers-format directory loads through from_pretrained with
local_files_only, and every way it can be unusable says what and where."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from diffusion_testutil import make_context, require_diffusers

from stages.diffusion import DiffusionConfig, DiffusionStage
from stages.diffusion.loading import DiffusionModelError, load_model, resolve_dtype

require_diffusers()

CPU = torch.device("cpu")


def test_loads_every_component_offline(tiny_model_dir):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model = load_model(str(tiny_model_dir), CPU, torch.float32)
    assert isinstance(model.unet, UNet2DConditionModel) and isinstance(model.autoencoder, AutoencoderKL)
    assert [type(m) for m in model.text_encoders] == [CLIPTextModel]
    assert [type(t) for t in model.tokenizers] == [CLIPTokenizer]
    assert isinstance(model.scheduler, EulerDiscreteScheduler)
    assert model.scheduler.config.timestep_spacing == "trailing"
    assert not model.unet.training and not any(p.requires_grad for p in model.unet.parameters())
    # The real CLIP vocabulary: "portrait" is one token between the start and end markers.
    assert model.tokenizers[0]("portrait").input_ids == [49406, 5352, 49407]


def test_loads_in_the_asked_dtype(tiny_model_dir):
    model = load_model(str(tiny_model_dir), CPU, torch.bfloat16)
    assert {p.dtype for p in model.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.text_encoders[0].parameters()} == {torch.bfloat16}
    assert model.autoencoder_dtype == torch.bfloat16


def test_auto_dtype_is_half_on_cuda_only():
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16


def test_tiny_autoencoder_replaces_the_vae(tiny_model_dir, tiny_autoencoder_dir, tmp_path):
    from diffusers import AutoencoderTiny

    without_vae = tmp_path / "no-vae"
    shutil.copytree(tiny_model_dir, without_vae, ignore=shutil.ignore_patterns("vae"))
    model = load_model(str(without_vae), CPU, torch.float32, tiny_autoencoder_path=str(tiny_autoencoder_dir))
    assert isinstance(model.autoencoder, AutoencoderTiny)


def _error(path, **kwargs) -> str:
    with pytest.raises(DiffusionModelError) as caught:
        load_model(str(path), CPU, torch.float32, **kwargs)
    return str(caught.value)


def test_missing_directory_is_named(tmp_path):
    message = _error(tmp_path / "sd-turbo")
    assert str(tmp_path / "sd-turbo") in message and "is not a directory" in message


def test_directory_without_model_index_is_named(tmp_path):
    message = _error(tmp_path)
    assert str(tmp_path) in message and "no model_index.json" in message


@pytest.mark.parametrize("component", ["unet", "text_encoder", "tokenizer", "scheduler", "vae"])
def test_missing_component_folder_is_named(tiny_model_dir, tmp_path, component):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken, ignore=shutil.ignore_patterns(component))
    message = _error(broken)
    assert str(broken) in message and f"no {component}/ folder" in message


def test_component_not_listed_or_from_elsewhere_is_named(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "unet": [None, None]}))
    assert "lists no 'unet' component" in _error(broken)
    (broken / "model_index.json").write_text(json.dumps({**index, "unet": ["os", "system"]}))
    assert "only diffusers and transformers components" in _error(broken)


def test_unreadable_weights_are_named(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    message = _error(broken)
    assert "cannot load unet" in message and str(broken / "unet") in message
    message = _error(tiny_model_dir, variant="fp16")  # no fp16 weight files in this directory
    assert "cannot load unet" in message and "diffusion_pytorch_model.fp16" in message


def test_bad_tiny_autoencoder_path_is_named(tiny_model_dir, tmp_path):
    message = _error(tiny_model_dir, tiny_autoencoder_path=str(tmp_path))
    assert str(tmp_path) in message and "AutoencoderTiny" in message


def test_missing_diffusers_says_how_to_install(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # what an absent package looks like to import
    assert "pip install -e '.[diffusion]'" in _error(tiny_model_dir)


def test_stage_with_a_bad_model_path_fails_startup(tmp_path):
    stage = DiffusionStage(DiffusionConfig(model_path=str(tmp_path / "missing")), make_context())
    with pytest.raises(DiffusionModelError, match="missing"):
        stage.setup()
    assert stage.status()["ready"] is False
