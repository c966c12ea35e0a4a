"""DiffusionConfig's checks, and the stage without a model: honest about being unusable.

Nothing here needs diffusers: an unconfigured stage must work (and refuse) without it.
"""

from __future__ import annotations

import pytest
import torch
from diffusion_testutil import make_context

from comms.message import Kind, Message
from core.config import ConfigError, build
from stages.diffusion import DiffusionConfig, DiffusionStage
from stages.registry import stage_class


def test_defaults_are_a_one_step_turbo_schedule_without_a_model():
    config = DiffusionConfig()
    assert config.model_path is None and (config.steps, config.strength, config.guidance_scale) == (2, 0.5, 0.0)
    assert config.channels_last and not config.compile and not config.cuda_graphs


@pytest.mark.parametrize("fields, path, words", [
    ({"size": 100}, "size", "multiple of 8"),
    ({"size": 16}, "size", "32..2048"),
    ({"steps": 9}, "steps", "1..8"),
    ({"strength": 1.5}, "strength", "0..1"),
    ({"steps": 1, "strength": 0.5}, "strength", "no UNet step would run"),
    ({"dtype": "float64"}, "dtype", "'bfloat16'"),
    ({"similarity_threshold": 1.2}, "similarity_threshold", "0..1"),
    ({"regen_burst": 0}, "regen_burst", ">= 1"),
    ({"model_path": " "}, "model_path", "non-empty"),
])
def test_bad_values_are_refused_with_their_field(fields, path, words):
    with pytest.raises(ConfigError) as caught:
        DiffusionConfig(**fields)
    assert caught.value.path == path and words in str(caught.value)


def test_built_from_yaml_data_with_every_problem_reported():
    config = build(DiffusionConfig, {"model_path": "/models/sd-turbo", "size": 256, "cuda_graphs": True})
    assert (config.model_path, config.size, config.cuda_graphs) == ("/models/sd-turbo", 256, True)
    with pytest.raises(ConfigError) as caught:
        build(DiffusionConfig, {"size": 250, "steps": 0, "prompt": "x"}, "diffusion")
    assert {p.path for p in caught.value.problems} == {"diffusion.size", "diffusion.steps", "diffusion.prompt"}


def test_registered_as_kind_diffusion():
    assert stage_class("diffusion") is DiffusionStage


def test_without_a_model_it_loads_nothing_and_rejects_every_frame(monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("an unconfigured stage must not load a model")

    monkeypatch.setattr("stages.diffusion.stage.load_model", no_loading)
    events: list[Message] = []
    stage = DiffusionStage(DiffusionConfig(), make_context(events))
    assert stage.status() == {"ready": False, "reason": "diffusion: not set up"}
    stage.setup()
    assert stage.status() == {"ready": False, "reason": "diffusion: no model configured"}
    assert stage.unavailable() == "diffusion: no model configured"

    frames = [Message(kind=Kind.DATA, session=s, frame_id=i, tensors=[torch.zeros(48, 64, 3, dtype=torch.uint8)])
              for i, s in enumerate(["a", "b"], start=1)]
    assert stage.process(frames) == []
    assert [(e.kind, e.session, e.frame_id, e.meta) for e in events] == [
        (Kind.EVENT, "a", 1, {"code": "diffusion_unavailable", "message": "diffusion: no model configured"}),
        (Kind.EVENT, "b", 2, {"code": "diffusion_unavailable", "message": "diffusion: no model configured"})]
    assert stage.sessions_tracked == 0
    stage.teardown()
    stage.teardown()
    assert stage.unavailable() == "diffusion: no model configured"
