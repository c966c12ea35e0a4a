"""The lip-sync GPU benchmark: the stream simulation and the capacity search driven by fake
timing functions (exact answers known), the plans, budget and targets, the whole
measurement run on the CPU with a tiny plan, and (where CUDA is) a tiny plan on the GPU."""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch

from runtime.bench import lipsync_gpu as bench
from runtime.bench import lipsync_gpu_report as report
from runtime.bench.lipsync_gpu_plan import (
    COMPILED,
    COMPILED_GRAPHS,
    EAGER,
    GRAPHS,
    PLANS,
    Budget,
    Case,
    dtype_name,
    tiny_plan,
)
from runtime.bench.lipsync_streams import StreamRun, capacity_guess, simulate_streams, stream_capacity
from runtime.bench.options import BenchOptions
from runtime.bench.progress import Progress

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def quiet_progress(total: int = 1) -> Progress:
    return Progress(total, stream=io.StringIO())


def linear_service(fixed_ms: float, per_frame_ms: float, sizes: list[int] | None = None):
    """A fake GPU: each batch costs ``fixed_ms + per_frame_ms * frames``; batch sizes go to ``sizes``."""
    def serve(streams: list[int]) -> float:
        if sizes is not None:
            sizes.append(len(streams))
        return fixed_ms + per_frame_ms * len(streams)
    return serve


def run_at(n: int, capacity: int) -> StreamRun:
    """A probe result that is sustained exactly up to ``capacity`` streams."""
    p95 = 10.0 if n <= capacity else 100.0
    return StreamRun(streams=n, frames=25 * n, p50_ms=p95, p95_ms=p95, max_ms=p95, batches=1, mean_batch=1.0,
                     busy=0.5, aborted=False)


# ------------------------------------------------------------------ simulation

def test_an_idle_server_serves_each_frame_on_arrival():
    run = simulate_streams(1, linear_service(10.0, 0.0), duration_s=1.0)
    assert run.p50_ms == run.p95_ms == run.max_ms == pytest.approx(10.0)
    assert run.batches == 25 and run.mean_batch == 1.0 and run.sustained and not run.aborted
    assert run.busy == pytest.approx(25 * 10.0 / (24 * 40.0 + 10.0))  # the last frame ends 10 ms after its arrival
    # Staggered streams with a free server: every frame alone, no waiting at all.
    run = simulate_streams(16, linear_service(0.0, 0.0), duration_s=1.0)
    assert run.batches == 16 * 25 and run.p95_ms == 0.0 and run.sustained


def test_frames_that_queue_while_the_server_works_go_in_one_batch():
    sizes: list[int] = []
    # 20 streams (a frame every 2 ms), 15 ms per batch whatever its size: a frame waits at
    # most for the batch in progress and then its own, and rides with those that queued.
    run = simulate_streams(20, linear_service(15.0, 0.0, sizes), duration_s=1.0)
    assert run.sustained and 15.0 < run.p95_ms <= 30.0 and run.max_ms <= 30.0
    assert max(sizes) >= 6 and run.mean_batch == pytest.approx(sum(sizes) / len(sizes))
    assert sum(sizes) == 20 * 25


def test_batches_never_exceed_max_batch():
    sizes: list[int] = []
    simulate_streams(50, linear_service(20.0, 0.1, sizes), duration_s=0.5, max_batch=8)
    assert max(sizes) == 8


def test_an_overloaded_server_is_not_sustained_and_the_probe_stops_early():
    sizes: list[int] = []
    run = simulate_streams(400, linear_service(100.0, 0.0, sizes), duration_s=2.0, max_batch=16)
    assert run.aborted and not run.sustained
    assert len(sizes) < 10  # stopped once a frame had waited ABORT_MS, not after all 20,000 frames


def test_bounded_latency_over_one_frame_interval_is_not_sustained():
    # 4 streams, 50 ms per batch: the server keeps up (batches of ~5 frames every 50 ms),
    # but frames wait 50..100 ms.
    run = simulate_streams(4, linear_service(50.0, 0.0), duration_s=2.0)
    assert not run.aborted and 50.0 < run.p95_ms <= 100.0 and run.max_ms <= 100.0 and not run.sustained


def test_a_server_slower_than_the_frame_rate_falls_behind():
    run = simulate_streams(1, linear_service(45.0, 0.0), duration_s=2.0)  # 45 ms per 40 ms frame
    assert not run.sustained and run.max_ms > run.p50_ms > 45.0


def test_simulation_arguments_are_checked():
    with pytest.raises(ValueError, match="streams >= 1"):
        simulate_streams(0, linear_service(1.0, 0.0), duration_s=1.0)


# ------------------------------------------------------------------ capacity search

def test_the_search_finds_the_largest_sustained_count_of_a_fake_gpu():
    serve = linear_service(5.0, 2.0)  # 5 ms per batch + 2 ms per frame
    sustained = [n for n in range(1, 40) if simulate_streams(n, serve, duration_s=1.0).sustained]
    largest = max(sustained)
    assert sustained == list(range(1, largest + 1))  # more streams never help: a prefix
    assert 5 < largest < 39
    found = stream_capacity(lambda n: simulate_streams(n, serve, duration_s=1.0), limit=64, resolution=0.0)
    assert found.streams == largest and not found.at_limit and not found.cut_short
    assert found.best is not None and found.best.streams == largest and found.best.sustained
    assert len(found.probes) < 15  # doubling then bisecting, not a scan


def test_the_search_doubles_then_bisects_to_its_resolution():
    probed: list[int] = []

    def probe(n: int) -> StreamRun:
        probed.append(n)
        return run_at(n, capacity=300)

    found = stream_capacity(probe, limit=1000, resolution=0.05)
    assert probed[:10] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert 300 * 0.95 <= found.streams <= 300 and run_at(found.streams, 300).sustained
    exact = stream_capacity(lambda n: run_at(n, capacity=300), limit=1000, resolution=0.0)
    assert exact.streams == 300


def test_the_search_starts_from_a_guess_above_or_below_the_answer():
    for guess, first in ((100, [100, 200, 400]), (1000, [1000, 500, 250])):
        found = stream_capacity(lambda n: run_at(n, capacity=300), limit=2000, start=guess, resolution=0.0)
        assert found.streams == 300 and not found.cut_short
        assert [p.streams for p in found.probes][:3] == first
    low = stream_capacity(lambda n: run_at(n, capacity=3), limit=100, start=64, resolution=0.0)
    assert low.streams == 3 and [p.streams for p in low.probes][:6] == [64, 32, 16, 8, 4, 2]
    assert stream_capacity(lambda n: run_at(n, capacity=0), limit=100, start=8).streams == 0


def test_the_guess_is_what_the_best_short_batch_could_feed():
    # 32 frames in 16 ms feed 32 / 16 ms = 2 frames per ms = 80 streams at 25 fps; the
    # 64-frame batch takes longer than half the latency budget and does not count.
    assert capacity_guess({1: 4.0, 8: 8.0, 32: 16.0, 64: 30.0}) == 80
    assert capacity_guess({1: 200.0}) == 1  # nothing fast enough: start at 1


def test_the_search_stops_at_its_limit_and_says_so():
    found = stream_capacity(lambda n: run_at(n, capacity=10_000), limit=100)
    assert found.streams == 100 and found.at_limit
    assert [p.streams for p in found.probes] == [1, 2, 4, 8, 16, 32, 64, 100]


def test_nothing_sustained_gives_zero():
    found = stream_capacity(lambda n: run_at(n, capacity=0), limit=100)
    assert found.streams == 0 and found.best is None and [p.streams for p in found.probes] == [1]


def test_a_search_out_of_time_reports_what_it_found():
    ticks = iter(range(100))
    found = stream_capacity(lambda n: run_at(n, capacity=300), limit=1000, deadline=3.5, clock=lambda: next(ticks))
    assert found.cut_short and found.streams == 8 and [p.streams for p in found.probes] == [1, 2, 4, 8]


# ------------------------------------------------------------------ plans, budget, targets

def test_the_full_plan_measures_what_the_issue_asks_with_compilation_last():
    plan = PLANS[False]
    cases = plan.cases()
    eager = {(c.dtype, c.batch) for c in cases if c.mode == EAGER}
    assert eager == {(d, b) for d in (torch.bfloat16, torch.float16) for b in (1, 8, 32, 64)}
    compiled = [c for c in cases if c.compiled]
    assert {(c.dtype, c.batch) for c in compiled if c.mode == COMPILED} == eager - {
        (d, b) for d in (torch.bfloat16, torch.float16) for b in (8, 32)}
    assert cases[-len(compiled):] == compiled and len(compiled) <= 6  # few compilations, after everything else
    assert plan.stream_searches() == [(1, "grouped"), (10, "grouped"), (10, "stacked"), (100, "grouped"),
                                      (100, "stacked")]
    assert plan.width == 1.0 and plan.budget_s <= 180
    assert not [c for c in PLANS[True].cases() if c.compiled or c.graphs]


def test_cases_know_whether_they_compile_or_replay():
    assert Case(torch.float16, COMPILED_GRAPHS, 1).compiled and Case(torch.float16, COMPILED_GRAPHS, 1).graphs
    assert Case(torch.float16, GRAPHS, 1).graphs and not Case(torch.float16, GRAPHS, 1).compiled
    assert Case(torch.bfloat16, EAGER, 8).label == "bf16, eager, batch 8"


def test_the_budget_admits_a_compilation_only_when_its_estimate_fits():
    now = [0.0]
    budget = Budget(100.0, clock=lambda: now[0])
    timing = PLANS[False].timing
    assert budget.allows(budget.case_estimate_s(compiles=True, timing=timing))  # 60 s estimate in 100 s
    now[0] = 50.0
    assert not budget.allows(budget.case_estimate_s(compiles=True, timing=timing))
    assert budget.allows(budget.case_estimate_s(compiles=False, timing=timing))
    budget.record_compile(20.0)  # measured: compilations are cheaper than assumed
    assert budget.allows(budget.case_estimate_s(compiles=True, timing=timing))


def throughput_row(case: str, batch: int, ms: float) -> dict:
    return {"case": case, "batch": batch, "ms_batch": ms, "fps": 1000.0 * batch / ms}


def test_targets_take_the_best_rows_and_say_when_nothing_was_measured():
    rows = [throughput_row("bf16, eager", 1, 6.0), throughput_row("bf16, eager + CUDA graph", 1, 4.0),
            throughput_row("fp16, eager", 64, 40.0), throughput_row("bf16, compiled", 32, 10.0),
            {"streams": 80, "streams_text": "80", "avatars": 100, "case": "100 avatars, stacked",
             "distinct_avatars": 80},
            {"streams": 200, "streams_text": "200", "avatars": 10, "case": "10 avatars, grouped",
             "distinct_avatars": 10}]
    single, batched, streams = report.gpu_targets(rows, {"device": "NVIDIA H200"})
    assert single.met and single.measured.startswith("4.00 ms (bf16, eager + CUDA graph")
    assert batched.met and batched.measured.startswith("3,200 frames/s (bf16, compiled, batch 32")
    # 10 avatars cannot show 60 distinct ones: the 100-avatar search counts.
    assert streams.met and streams.measured.startswith("80 streams (100 avatars, stacked; 80 distinct")
    assert "RTX 6000 Ada" in single.goal and "15-18 ms per frame" in batched.goal
    rows[4]["streams"] = 40
    assert report.gpu_targets(rows, {"device": "x"})[2].met is False
    for target in report.gpu_targets([], None):
        assert target.met is None and target.measured == "not measured: no CUDA device"


def test_without_cuda_the_gpu_part_is_skipped_at_once(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.gpu_steps(quick=False) == 1
    progress = quiet_progress()
    result = report.gpu_section(BenchOptions(out_dir=tmp_path), progress)
    assert result.skipped == report.NO_CUDA and result.rows == [] and progress.done == 1
    assert report.gpu_notes(None) == [report.NO_CUDA]


# ------------------------------------------------------------------ the measurement itself

def check_rows(rows: list[dict], plan, device_type: str) -> None:
    timed = [r for r in rows if "ms_batch" in r]
    assert [(r["dtype"], r["mode"], r["batch"]) for r in timed] == [
        (dtype_name(c.dtype), c.mode, c.batch) for c in plan.cases()]
    for row in timed:
        assert row["device"] == device_type and row["calls"] >= 1
        assert math.isfinite(row["ms_batch"]) and row["ms_batch"] > 0 and row["first_call_s"] > 0
        assert row["ms_frame"] == pytest.approx(row["ms_batch"] / row["batch"])
        assert row["fps"] == pytest.approx(1000.0 * row["batch"] / row["ms_batch"])
    streams = [r for r in rows if "streams" in r]
    assert [(r["avatars"], r["strategy"]) for r in streams] == plan.stream_searches()
    for row in streams:
        assert 0 <= row["streams"] <= plan.max_streams and row["probes"]
        assert row["probes"][0]["streams"] == 1


def test_the_measurement_runs_end_to_end_on_the_cpu_with_a_tiny_plan():
    # The CPU takes ~100 ms per half-width frame: no stream is sustained, but every part runs.
    plan = dataclasses.replace(tiny_plan(torch.device("cpu")), batches=(1,), avatar_counts=(2,),
                               duration_s=0.12)
    progress = quiet_progress(len(plan.cases()) + len(plan.stream_searches()) + 1)
    rows, details = bench.measure(plan, torch.device("cpu"), progress)
    check_rows(rows, plan, "cpu")
    assert progress.done == progress.total
    assert details["params"] == 3_095_471 and details["left_out"] == [] and details["failed"] == []
    (compare,) = details["compare"]
    assert compare["models"] == 2 and compare["grouped_ms"] > 0 and compare["stacked_ms"] > 0
    assert details["avatar_mib"] == pytest.approx(11.93, abs=0.01)
    notes = report.gpu_notes(details)
    assert "random weights (timing only" in notes[0] and "3.10 M parameters" in notes[0]


@needs_cuda
def test_a_tiny_plan_runs_on_the_gpu():
    device = torch.device("cuda:0")
    plan = tiny_plan(device)
    progress = quiet_progress(len(plan.cases()) + len(plan.stream_searches()) + 1)
    rows, details = bench.gpu_part(quick=True, progress=progress, plan=plan)
    check_rows(rows, plan, "cuda")
    assert details["failed"] == [] and all(r["peak_mib"] > 0 for r in rows if "ms_batch" in r)
    # A GPU serves a half-width frame far within 40 ms: one stream at least.
    assert all(r["streams"] >= 1 for r in rows if "streams" in r)
    assert len(report.gpu_targets(rows, details)) == 3
