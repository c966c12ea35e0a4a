"""Section 'synthetic': the ideal bounds, the chains' configs and plans, rows and targets,
then one real quick run."""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
import pytest

from runtime.bench import pipeline, synthetic
from runtime.bench.client import ClientResult
from runtime.bench.options import BenchOptions
from runtime.bench.progress import Progress
from runtime.bench.synthetic import Chain, chain_config, ideal_fps, single_ideal_fps
from runtime.bench.sysmon import Usage
from runtime.compose import check_payloads
from runtime.config import config_from_dict
from runtime.planner import plan


def test_ideal_is_set_by_the_slowest_stage_per_replica():
    assert ideal_fps((20.0, 20.0, 20.0), (1, 1, 1)) == 50.0
    assert ideal_fps((10.0, 40.0, 10.0), (1, 2, 1)) == 50.0
    assert ideal_fps((10.0, 40.0, 10.0), (1, 1, 1)) == 25.0
    assert ideal_fps((5.0,), (4,)) == 800.0


def test_one_process_ideal_overlaps_sleeps_and_serialises_busy_work():
    assert single_ideal_fps("sleep", (10.0, 40.0, 10.0)) == 25.0
    assert single_ideal_fps("busy", (20.0, 20.0)) == 25.0


def test_chain_shape_is_checked():
    with pytest.raises(ValueError, match="one replica count per cost"):
        Chain(name="x", mode="sleep", costs_ms=(1.0, 2.0), replicas=(1,))
    with pytest.raises(ValueError, match="costs must be > 0 and replicas >= 1"):
        Chain(name="x", mode="sleep", costs_ms=(0.0,), replicas=(1,))


@pytest.mark.parametrize("chain", synthetic.CHAINS, ids=lambda c: c.key)
def test_every_chain_is_a_valid_config_with_one_rank_per_replica(chain):
    config = config_from_dict(chain_config(chain, iterations_per_ms=1000.0))
    check_payloads(config.pipeline)  # ingest -> pass-through synthetic stages -> display fits
    stages = config.pipeline.stages
    assert [s.kind for s in stages] == ["ingest", *["synthetic"] * len(chain.costs_ms), "display"]
    assert [config.stage_config(s).cost_ms for s in stages[1:-1]] == list(chain.costs_ms)
    assert {config.stage_config(s).mode for s in stages[1:-1]} == {chain.mode}
    the_plan = plan(config.pipeline, chain.world_size, 1, 0)
    assert [len(a.stages) for a in the_plan.ranks[1:]] == [1] * sum(chain.replicas)
    assert chain.window == sum(chain.replicas) + 2
    assert plan(config.pipeline, 1, 1, 0).single_process


def test_small_frame_is_a_64x64_jpeg():
    image = cv2.imdecode(np.frombuffer(synthetic.small_frame(), np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (64, 64, 3)


def fake(fps: float) -> ClientResult:
    return ClientResult(input="max", measured_s=5.0, window_start=0.0, window_end=5.0, sent=10, received=10,
                        dropped=0, fps_in=fps, fps=fps, latencies_ms=[30.0, 50.0], ttff_ms=10.0, stats=None)


def row(name: str, single_fps: float, dist_fps: float) -> dict:
    chain = next(c for c in synthetic.CHAINS if c.name == name)
    return synthetic.chain_row(chain, fake(single_fps), usage(90.0, 1.0), fake(dist_fps), usage(180.0, 3.0))


def usage(job_cpu: float, other_cpu: float) -> Usage:
    return Usage(samples=4, mean={"job_cpu_pct": job_cpu, "other_cpu_pct": other_cpu})


def test_row_figures():
    r = row("sleep unequal", 24.0, 47.5)
    assert (r["costs"], r["replicas"], r["ranks"]) == ("10/40/10", "1/2/1", 5)
    assert r["ideal_fps"] == 50.0 and r["single_ideal_fps"] == 25.0
    assert r["achieved"] == 0.95 and r["speedup"] == 47.5 / 24.0 and r["dist_p50_ms"] == 40.0
    assert (r["single_cpu_pct"], r["dist_cpu_pct"], r["other_cpu_pct"]) == (90.0, 180.0, 3.0)
    assert r["dist_cpu_ms_per_frame"] == 1800.0 / 47.5
    assert {c.key for c in synthetic.COLUMNS} <= set(r)


@pytest.mark.parametrize("single_other, dist_other, expected", [
    (math.nan, 3.0, 3.0), (3.0, math.nan, 3.0), (1.0, 3.0, 3.0)])
def test_others_cpu_is_the_higher_of_the_runs_that_have_one(single_other, dist_other, expected):
    chain = synthetic.CHAINS[0]
    r = synthetic.chain_row(chain, fake(20.0), usage(90.0, single_other), fake(40.0), usage(180.0, dist_other))
    assert r["other_cpu_pct"] == expected


def test_max_known_skips_nan_and_is_nan_only_without_a_number():
    assert synthetic.max_known(math.nan, 2.0, 1.0) == 2.0
    assert math.isnan(synthetic.max_known(math.nan, math.nan))


@pytest.mark.parametrize("dist, met", [(46.0, True), (44.0, False)])
def test_sleep_target(dist, met):
    (sleep, _) = synthetic.targets([row("sleep x3", 49.0, dist)])
    assert sleep.met is met and "of 50.0 FPS" in sleep.measured and "(20/20/20 ms)" in sleep.name


@pytest.mark.parametrize("dist, met", [(36.0, True), (33.0, False), (33.96, False)])
def test_busy_target(dist, met):
    (_, busy) = synthetic.targets([row("busy x2", 20.0, dist)])
    assert busy.met is met and f"{dist / 20.0:.3f}x" in busy.measured


def test_targets_of_chains_not_run_are_unmeasured():
    assert [t.met for t in synthetic.targets([])] == [None, None]


def test_notes_warn_of_server_errors_next_to_the_run_s_breakdown(tmp_path):
    result = fake(40.0)
    result.errors, result.error_count = ["busy: queue full"], 1
    details = {"jobs": {}, "runs": {"busy x2, distributed": pipeline.run_details(result, usage(180.0, 3.0))}}
    text = synthetic.notes(BenchOptions(out_dir=tmp_path), 1000.0, details)
    assert text[-2:] == ["busy x2, distributed: 1 error message(s) from the server, e.g. busy: queue full",
                         "busy x2, distributed: compute p50 ms: ; hops p50: none; drops: none"]


def test_quick_run_produces_every_figure(tmp_path):
    options = BenchOptions(out_dir=tmp_path, quick=True)
    result = synthetic.run(options, Progress(synthetic.steps(options), stream=io.StringIO()))
    assert [r["chain"] for r in result.rows] == list(synthetic.QUICK_CHAINS)
    for r in result.rows:
        for key in ("ideal_fps", "dist_fps", "single_fps", "achieved", "speedup", "dist_p50_ms", "dist_cpu_pct"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert result.details["iterations_per_ms"] > 0
    assert all(job["clean_stop"] for job in result.details["jobs"].values())
