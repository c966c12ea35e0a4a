"""SyntheticStage: frames pass through unchanged after a known cost (sleep or fixed busy work)."""

from __future__ import annotations

import logging
import math
import time

import pytest
import torch

from comms.message import Kind, Message
from core.config import ConfigError, build
from core.settings import RuntimeSettings, RuntimeView
from stages import synthetic
from stages.base import StageContext
from stages.synthetic import SyntheticConfig, SyntheticStage, calibrate, spin


def make_stage(**config) -> SyntheticStage:
    context = StageContext(rank=1, role="s1", replica=0, device=torch.device("cpu"),
                           logger=logging.getLogger("test.synthetic"),
                           runtime=lambda: RuntimeView(revision=1, settings=RuntimeSettings()))
    stage = SyntheticStage(build(SyntheticConfig, config), context)
    stage.setup()
    return stage


def frame(frame_id: int) -> Message:
    msg = Message(kind=Kind.DATA, session="s", frame_id=frame_id, revision=3, capture_ts=12.5,
                  meta={"width": 4, "height": 2}, tensors=[torch.arange(24, dtype=torch.uint8).reshape(2, 4, 3)])
    return msg.stamp("ingest.end")


def test_frames_pass_through_unchanged_in_order():
    stage = make_stage(cost_ms=0.0)
    batch = [frame(7), frame(8)]
    outputs = stage.process(batch)
    assert [m.frame_id for m in outputs] == [7, 8]
    for out, msg in zip(outputs, batch):
        assert out is not msg
        assert (out.kind, out.session, out.revision, out.capture_ts) == (Kind.DATA, "s", 3, 12.5)
        assert out.meta == msg.meta and out.trace == msg.trace
        assert len(out.tensors) == 1 and torch.equal(out.tensors[0], msg.tensors[0])


def test_sleep_costs_at_least_cost_ms_per_frame_of_the_batch():
    stage = make_stage(mode="sleep", cost_ms=15.0)
    start = time.perf_counter()
    stage.process([frame(1), frame(2)])
    assert time.perf_counter() - start >= 0.030


def test_busy_does_a_fixed_number_of_iterations_per_frame(monkeypatch):
    calls = []
    monkeypatch.setattr(synthetic, "spin", calls.append)
    stage = make_stage(mode="busy", cost_ms=2.5, iterations_per_ms=1000.0)
    assert stage.config.iterations == 2500
    assert len(stage.process([frame(1), frame(2), frame(3)])) == 3
    assert calls == [7500]


def test_spin_is_deterministic_pure_python_work():
    assert spin(0) == 0
    assert spin(1000) == spin(1000) == sum(i * i for i in range(1000)) % 1_000_003


def test_calibrate_measures_a_positive_rate():
    rate = calibrate(sample_ms=5.0, rounds=2)
    assert math.isfinite(rate) and rate > 0
    with pytest.raises(ValueError, match="sample_ms > 0 and rounds >= 1"):
        calibrate(sample_ms=0)


@pytest.mark.parametrize("data, match", [
    ({"mode": "spin"}, r"^mode: got 'spin'; allowed: 'sleep', 'busy'$"),
    ({"cost_ms": -1}, r"^cost_ms: must be within 0\.\.10000, got -1$"),
    ({"iterations_per_ms": -5}, r"^iterations_per_ms: must be >= 0"),
    ({"mode": "busy", "cost_ms": 5}, r"^iterations_per_ms: mode 'busy' needs the busy loop's speed"),
    ({"cost": 5}, r"^cost: unknown key; allowed: cost_ms, iterations_per_ms, mode$"),
])
def test_bad_config_names_the_field(data, match):
    with pytest.raises(ConfigError, match=match):
        build(SyntheticConfig, data)
