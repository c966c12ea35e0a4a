"""Composing one rank from the plan, as plain data: runners and their links, the front
door, control ends; and the payload check that refuses a miswired pipeline."""

import re
from dataclasses import dataclass

import pytest
import torch

from core.config import ConfigError
from runtime.compose import FRONT_DOOR, CompositionError, check_payloads, compose, format_part
from runtime.config import config_from_dict
from runtime.planner import plan
from stages.base import ANY, SAME, Payload, Stage
from stages.payloads import IMAGE_RGB
from stages.registry import register_stage
from stages.server.hooks import CAMERA_JPEG, OUTPUT_JPEG

AUDIO = Payload("audio.f32", (torch.float32,))


@dataclass
class NoSettings:
    pass


def stage_kind(kind, accepts, emits):
    """Register a stage kind that only declares its payloads (process is never called here)."""
    return register_stage(type(f"Test_{kind}", (Stage,), {
        "kind": kind, "Config": NoSettings, "accepts": accepts, "emits": emits,
        "process": lambda self, batch: batch}))


stage_kind("t_mic", None, AUDIO)
stage_kind("t_gain", AUDIO, AUDIO)
stage_kind("t_meter", AUDIO, None)
stage_kind("t_audio_in", CAMERA_JPEG, AUDIO)
stage_kind("t_pass", ANY, SAME)
stage_kind("t_image_sink", IMAGE_RGB, None)


def job(*stages, **pipeline):
    return config_from_dict({"pipeline": {"stages": list(stages), **pipeline}})


def test_each_rank_gets_its_runners_with_their_links():
    config = config_from_dict({})
    p = plan(config.pipeline, 4)
    server, vision, gen0, gen1 = (compose(p, rank, config) for rank in range(4))
    assert [r.label for r in server.runners] == ["ingest#0", "display#0"]
    ingest, display = server.runners
    assert ingest.inputs == (FRONT_DOOR,) and ingest.outputs == ("ingest#0->vision#0",)
    assert display.inputs == ("generator#0->display#0", "generator#1->display#0") and display.outputs == (FRONT_DOOR,)
    assert (ingest.accepts, ingest.emits, display.emits) == (CAMERA_JPEG, IMAGE_RGB, OUTPUT_JPEG)
    (v,) = vision.runners
    assert v.inputs == ("ingest#0->vision#0",) and v.outputs == ("vision#0->generator#0", "vision#0->generator#1")
    assert [r.label for r in gen1.runners] == ["generator#1"] and gen1.runners[0].device == "cpu"
    assert server.front_door.feeds == "ingest#0" and server.front_door.shows == "display#0"
    assert vision.front_door is None


def test_control_ends_hub_on_the_server_rank_client_elsewhere():
    config = config_from_dict({})
    p = plan(config.pipeline, 3)
    server, worker = compose(p, 0, config), compose(p, 2, config)
    assert server.control.hub and server.control.sends == {1: "control:0->1", 2: "control:0->2"}
    assert server.control.receives == {1: "status:1->0", 2: "status:2->0"}
    assert not worker.control.hub
    assert (worker.control.sends, worker.control.receives) == ({0: "status:2->0"}, {0: "control:0->2"})
    assert worker.control.roles[0] == "server+ingest+display"
    assert {link.name for link in worker.links} == {"vision#0->generator#0", "generator#0->display#0",
                                                    "control:0->2", "status:2->0"}
    assert compose(plan(config.pipeline, 1), 0, config).control is None


def test_a_pipeline_of_source_and_sink_needs_no_front_door_ends():
    config = job({"name": "mic", "kind": "t_mic"}, {"name": "gain", "kind": "t_gain", "replicas": "auto"},
                 {"name": "meter", "kind": "t_meter", "placement": "server"})
    p = plan(config.pipeline, 3)
    server, mic = compose(p, 0, config), compose(p, 1, config)
    assert server.front_door.feeds is None and server.front_door.shows is None
    (meter,) = server.runners
    assert meter.inputs == ("gain#0->meter#0",) and meter.outputs == ()
    assert mic.runners[0].inputs == () and mic.runners[0].accepts is None


def test_a_pass_through_stage_takes_the_type_of_what_comes_before():
    payloads = check_payloads(job({"name": "mic", "kind": "t_mic"}, {"name": "p", "kind": "t_pass"},
                                  {"name": "meter", "kind": "t_meter", "placement": "server"}).pipeline)
    assert payloads["p"] == (AUDIO, AUDIO)
    miswired = job({"name": "mic", "kind": "t_mic"}, {"name": "p", "kind": "t_pass"},
                   {"name": "sink", "kind": "t_image_sink"})
    with pytest.raises(CompositionError, match=r"stage 'sink' \(t_image_sink\) accepts image\.rgb \[uint8\], but "
                                               r"stage 'p' before it emits audio\.f32 \[float32\]"):
        check_payloads(miswired.pipeline)


@pytest.mark.parametrize("stages, path, match", [
    ([{"name": "ingest", "placement": "server"}, {"name": "gain", "kind": "t_gain"},
      {"name": "display", "placement": "server"}],
     "pipeline.stages[1].kind", r"stage 'gain' \(t_gain\) accepts audio\.f32 \[float32\], but stage 'ingest' "
                                r"before it emits image\.rgb \[uint8\]"),
    ([{"name": "gain", "kind": "t_gain"}, {"name": "meter", "kind": "t_meter"}],
     "pipeline.stages[0].kind", r"stage 'gain' \(t_gain\) comes first, so it must take the page's camera frames "
                                r"\(camera\.jpeg \[uint8\]\) or audio \(audio\.pcm16 \[int16\]\), or be a source "
                                r"\(accept nothing\); it accepts audio\.f32"),
    ([{"name": "mic", "kind": "t_mic"}, {"name": "gain", "kind": "t_gain"}],
     "pipeline.stages[1].kind", r"stage 'gain' \(t_gain\) comes last, so it must make frames for the page "
                                r"\(output\.jpeg \[uint8\]\) or be a sink \(emit nothing\); it emits audio\.f32"),
    ([{"name": "mic", "kind": "t_mic"}, {"name": "mic2", "kind": "t_mic"}],
     "pipeline.stages[1].kind", r"stage 'mic2' \(t_mic\) is a source \(accepts nothing\), but it follows stage "
                                r"'mic'; a source can only come first"),
    ([{"name": "mic", "kind": "t_mic"}, {"name": "meter", "kind": "t_meter"}, {"name": "gain", "kind": "t_gain"}],
     "pipeline.stages[2].kind", r"stage 'gain' \(t_gain\) accepts audio\.f32 \[float32\], but stage 'meter' "
                                r"before it is a sink"),
    ([{"name": "cam", "kind": "t_audio_in"}, {"name": "meter", "kind": "t_meter"}],
     "pipeline.stages[0].placement", r"stage 'cam' takes the page's camera frames, so it must run on the server "
                                     r"rank next to the web server: set placement: server"),
])
def test_a_miswired_pipeline_is_refused_with_the_stage_names(stages, path, match):
    config = job(*stages)
    with pytest.raises(CompositionError) as info:
        compose(plan(config.pipeline, 1), 0, config)
    assert isinstance(info.value, ConfigError) and info.value.path == path
    assert re.search(match, info.value.reason), info.value.reason


def test_format_part_shows_runners_links_payloads_and_control():
    config = config_from_dict({})
    p = plan(config.pipeline, 3)
    text = format_part(compose(p, 0, config))
    assert text.splitlines()[0] == "rank 0 (server+ingest+display) on node 0, cpu:"
    assert "  front door: web server; the page's frames feed ingest#0; the page shows display#0" in text
    assert "  ingest#0 (ingest on cpu): camera.jpeg [uint8] -> image.rgb [uint8]" in text
    assert "    in:  front door" in text and "    out: ingest#0->vision#0" in text
    assert "  control hub: sends control:0->1, control:0->2; receives status:1->0, status:2->0" in text
    assert "  control client: sends status:2->0; receives control:0->2" in format_part(compose(p, 2, config))


def test_a_pipeline_that_takes_the_pages_audio():
    config = config_from_dict({"pipeline": {"name": "lipsync", "stages": [
        {"name": "speech", "placement": "server", "routing": "affinity"}, {"name": "lipsync", "replicas": 2},
        {"name": "composite"}, {"name": "present", "placement": "server"}]}})
    p = plan(config.pipeline, 4)
    server = compose(p, 0, config)
    assert server.front_door.takes == "audio" and server.front_door.feeds == "speech#0"
    (speech, present) = server.runners
    assert speech.inputs == (FRONT_DOOR,) and speech.spec.routing == "affinity"
    assert speech.outputs == ("speech#0->lipsync#0", "speech#0->lipsync#1") and speech.next_kind == "lipsync"
    assert "the page's audio feed speech#0" in format_part(server)
    assert compose(plan(config_from_dict({}).pipeline, 3), 0, config_from_dict({})).front_door.takes == "camera"
