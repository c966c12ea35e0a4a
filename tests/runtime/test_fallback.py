"""Degrade, don't reject: a stage may name a fallback that takes its frames whenever it
cannot — its config, the plan's links, each rank's part, the router's choice, and the
availability the control plane spreads."""

import threading
import time
from dataclasses import dataclass

import pytest
import torch

from comms.inprocess import inprocess_link
from comms.message import Kind, Message
from core.config import ConfigError
from runtime.availability import AVAILABILITY_OP, StageAvailability, availability_message
from runtime.compose import CompositionError, compose, format_part
from runtime.config import config_from_dict
from runtime.metrics import StageMetrics
from runtime.planner import LinkKind, plan
from runtime.stage_loop import Fallback, Router
from stages.base import Payload, Stage
from stages.registry import register_stage

AUDIO = Payload("audio.f32", (torch.float32,))
TEXT = Payload("text.u8", (torch.uint8,))


@dataclass
class NoSettings:
    pass


def kind(name, accepts, emits):
    return register_stage(type(f"Fallback_{name}", (Stage,), {
        "kind": name, "Config": NoSettings, "accepts": accepts, "emits": emits,
        "process": lambda self, batch: batch}))


kind("fb_source", None, AUDIO)
kind("fb_filter", AUDIO, AUDIO)
kind("fb_words", AUDIO, TEXT)
kind("fb_sink", AUDIO, None)


def chain(**primary):
    return [{"name": "src", "kind": "fb_source"}, {"name": "heavy", "kind": "fb_filter", **primary},
            {"name": "light", "kind": "fb_filter"}, {"name": "sink", "kind": "fb_sink", "placement": "server"}]


def job(stages):
    return config_from_dict({"pipeline": {"name": "fb", "stages": stages}})


# -- config ------------------------------------------------------------------------

def test_the_fallback_is_beside_its_stage_not_in_the_chain():
    pipeline = job(chain(fallback="light", fallback_after_ms=20)).pipeline
    assert [s.name for s in pipeline.chain] == ["src", "heavy", "sink"]
    assert pipeline.fallback_of("heavy").name == "light" and pipeline.fallback_of("src") is None


@pytest.mark.parametrize("stages, problem", [
    (chain(fallback="nothing"), r"stages\[1\]\.fallback: no stage named 'nothing'"),
    (chain(fallback="heavy"), r"stages\[1\]\.fallback: must name another stage, not 'heavy' itself"),
    (chain(fallback="light", fallback_after_ms=5000),
     r"stages\[1\]\.fallback_after_ms: must be within 0\.\.1000, got 5000"),
    ([{"name": "src", "kind": "fb_source", "fallback": "light"}, {"name": "light", "kind": "fb_filter"},
      {"name": "sink", "kind": "fb_sink", "placement": "server"}],
     r"only a stage between two others can have a fallback"),
    (chain(fallback="light")[:2] + [{"name": "light", "kind": "fb_filter", "fallback": "sink"},
                                     {"name": "sink", "kind": "fb_sink", "placement": "server"}],
     r"'light' is the fallback of 'heavy' and cannot have a fallback itself"),
])
def test_bad_fallbacks_are_refused_with_the_field(stages, problem):
    with pytest.raises(ConfigError, match=problem):
        job(stages)


def test_a_fallback_must_take_and_make_what_its_stage_does():
    stages = chain(fallback="light")
    stages[2]["kind"] = "fb_words"
    with pytest.raises(CompositionError, match=r"'light' \(fb_words\) is the fallback of 'heavy', so it must take "
                                               r"audio\.f32 \[float32\] and make audio\.f32 \[float32\]"):
        compose(plan(job(stages).pipeline, 4), 0, job(stages))


# -- plan and parts ----------------------------------------------------------------

def test_the_plan_wires_the_fallback_like_its_stage():
    config = job(chain(fallback="light", fallback_after_ms=20))
    p = plan(config.pipeline, 4)
    data = sorted(link.name for link in p.links if link.kind is LinkKind.DATA)
    assert data == ["heavy#0->sink#0", "light#0->sink#0", "src#0->heavy#0", "src#0->light#0"]
    ranks = {r.stages[0].stage: r.rank for r in p.ranks if r.stages}
    source = compose(p, ranks["src"], config).runners[0]
    assert source.outputs == ("src#0->heavy#0",) and source.fallback_outputs == ("src#0->light#0",)
    assert source.next_stage == "heavy" and source.fallback_after_ms == 20
    light = compose(p, ranks["light"], config).runners[0]
    assert light.inputs == ("src#0->light#0",) and light.outputs == ("light#0->sink#0",)
    assert "fallback: src#0->light#0 (heavy unavailable, or after 20 ms without a credit)" in format_part(
        compose(p, ranks["src"], config))


def test_without_a_fallback_nothing_changes():
    config = job(chain())
    p = plan(config.pipeline, 4)
    assert sorted(link.name for link in p.links if link.kind is LinkKind.DATA) == [
        "heavy#0->light#0", "light#0->sink#0", "src#0->heavy#0"]
    assert all(not r.fallback_outputs for rank in range(4) for r in compose(p, rank, config).runners)


# -- the router --------------------------------------------------------------------

def msg(i):
    return Message(kind=Kind.DATA, session="s", frame_id=i)


def router(primary_capacity=2, wait_s=0.0):
    primary, primary_in = inprocess_link("heavy", primary_capacity)
    spare, spare_in = inprocess_link("light", 64)
    availability, metrics = StageAvailability(), StageMetrics("src#0")
    r = Router([primary], "round_robin", threading.Event(),
               Fallback(outlets=[spare], stage="heavy", wait_s=wait_s, availability=availability), metrics)
    return r, primary_in, spare_in, availability, metrics


def drain(reader):
    got = []
    while True:
        try:
            got.append(reader.recv(0).frame_id)
        except Exception:
            return got


def test_frames_go_to_the_stage_while_it_has_credit_then_to_the_fallback():
    r, heavy, light, _, metrics = router(primary_capacity=2)
    for i in range(5):
        assert r.send(msg(i))
    assert drain(heavy) == [0, 1] and drain(light) == [2, 3, 4]
    assert metrics.snapshot()["diverted"] == {"saturated": 3, "unavailable": 0}


def test_a_wait_lets_a_slow_stage_catch_up_before_diverting():
    r, heavy, light, _, _ = router(primary_capacity=1, wait_s=0.5)
    assert r.send(msg(0))
    threading.Timer(0.1, lambda: heavy.recv(1)).start()  # the stage takes frame 0 after 100 ms
    started = time.monotonic()
    assert r.send(msg(1))
    assert 0.05 < time.monotonic() - started < 0.45 and drain(light) == []
    started = time.monotonic()
    assert r.send(msg(2))  # nobody takes frame 1: after 0.5 s frame 2 goes to the fallback
    assert time.monotonic() - started >= 0.45 and drain(light) == [2]


def test_only_the_first_frame_of_a_saturation_waits():
    r, heavy, light, _, _ = router(primary_capacity=1, wait_s=0.3)
    assert r.send(msg(0))  # takes the only credit; nobody reads it yet
    started = time.monotonic()
    r.send(msg(1))
    assert time.monotonic() - started >= 0.25  # waited for the stage, then diverted
    started = time.monotonic()
    r.send(msg(2))
    r.send(msg(3))
    assert time.monotonic() - started < 0.2  # still saturated: straight to the fallback
    assert drain(light) == [1, 2, 3] and drain(heavy) == [0]  # the stage frees its credit
    r.send(msg(4))
    assert drain(heavy) == [4]  # and gets frames again


def test_an_unavailable_stage_gets_nothing_until_it_recovers():
    r, heavy, light, availability, metrics = router()
    availability.set_local("heavy", "diffusion: no model configured")
    for i in range(3):
        r.send(msg(i))
    assert drain(heavy) == [] and drain(light) == [0, 1, 2]
    availability.set_local("heavy", None)
    r.send(msg(3))
    assert drain(heavy) == [3]
    assert metrics.snapshot()["diverted"] == {"saturated": 0, "unavailable": 3}


def test_a_fallback_without_outlets_is_refused():
    with pytest.raises(ValueError, match="a fallback needs at least one outlet"):
        Router([inprocess_link("o", 1)[0]], "round_robin", threading.Event(),
               Fallback(outlets=[], stage="x", wait_s=0, availability=StageAvailability()))


# -- availability across ranks -----------------------------------------------------

def test_the_hub_merges_ranks_and_says_when_to_broadcast():
    hub = StageAvailability()
    assert hub.merge_rank(2, {"heavy": "no model"}) is True
    assert hub.merge_rank(2, {"heavy": "no model"}) is False  # unchanged: no broadcast
    assert hub.merge_rank(3, {}) is False
    assert hub.reason("heavy") == "no model"
    assert hub.merge_rank(2, {}) is True and hub.reason("heavy") is None
    broadcast = availability_message({"heavy": "no model"})
    assert broadcast.kind == Kind.CONTROL and broadcast.meta == {"op": AVAILABILITY_OP,
                                                                 "unavailable": {"heavy": "no model"}}
    worker = StageAvailability()
    worker.set_remote(broadcast.meta["unavailable"])
    worker.set_local("light", "warming up")
    assert worker.reason("heavy") == "no model" and worker.local() == {"light": "warming up"}


def test_lost_replicas_and_stages_travel_with_the_reasons():
    hub = StageAvailability()
    hub.merge_rank(2, {"heavy": "warming up"})
    assert hub.mark_lost(2, ["heavy#0"], {"heavy": "rank 2 (heavy) was lost"}) is True
    assert hub.mark_lost(2, ["heavy#0"], {"heavy": "rank 2 (heavy) was lost"}) is False  # nothing new
    assert hub.reason("heavy") == "rank 2 (heavy) was lost"  # not what the lost rank last said
    hub.merge_rank(3, {"light": "busy"})
    assert hub.message().meta == {"op": AVAILABILITY_OP, "lost": ["heavy#0"],
                                  "unavailable": {"heavy": "rank 2 (heavy) was lost", "light": "busy"}}
    worker = StageAvailability()
    worker.set_remote(hub.message().meta["unavailable"], hub.message().meta["lost"])
    assert worker.is_lost("heavy#0") and not worker.is_lost("heavy#1") and worker.lost() == {"heavy#0"}
    worker.set_remote({})  # a later broadcast without lost replicas: none are
    assert not worker.is_lost("heavy#0")
