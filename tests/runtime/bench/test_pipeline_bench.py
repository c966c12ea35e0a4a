"""Section 'pipeline': rows, ratios and the target from client results, then one real quick run."""

from __future__ import annotations

import io
import math

import pytest
import yaml

from runtime.bench import pipeline
from runtime.bench.client import ClientResult
from runtime.bench.options import BenchOptions
from runtime.bench.progress import Progress
from runtime.bench.sysmon import Usage


def client_result(input: str, fps: float, latencies: list[float], sent: int = 100, received: int = 100,
                  stats: dict | None = None) -> ClientResult:
    return ClientResult(input=input, measured_s=5.0, window_start=1.0, window_end=6.0, sent=sent,
                        received=received, dropped=sent - received, fps_in=sent / 5.0, fps=fps,
                        latencies_ms=latencies, ttff_ms=80.0, stats=stats, drops={"ingest": 0})


USAGE = Usage(samples=10, mean={"job_cpu_pct": 120.0, "system_cpu_pct": 70.0})


def rows(dist_fixed_fps: float = 19.8, dist_p50: float = 30.0) -> list[dict]:
    dist = "distributed (3 ranks)"
    out = [pipeline.run_row("single", client_result("20 fps", 20.0, [20.0] * 10), USAGE),
           pipeline.run_row("single", client_result("max", 40.0, [90.0] * 10), USAGE),
           pipeline.run_row(dist, client_result("20 fps", dist_fixed_fps, [dist_p50] * 10), USAGE),
           pipeline.run_row(dist, client_result("max", 50.0, [70.0] * 10), USAGE)]
    pipeline.add_ratios(out)
    return out


def test_layouts_are_local_yaml_alone_and_the_embedded_default_on_n_ranks(tmp_path):
    options = BenchOptions(out_dir=tmp_path, world_size=4)
    single, dist = pipeline.layouts(options)
    assert (single.world_size, single.config) == (1, yaml.safe_load(pipeline.LOCAL_CONFIG.read_text()))
    assert (dist.world_size, dist.config, dist.name) == (4, {}, "distributed (4 ranks)")
    assert pipeline.inputs(options) == [20.0, None] and pipeline.steps(options) == 4


def test_rows_carry_the_figures_and_distributed_rows_their_ratio_to_single():
    single_fixed, _, dist_fixed, dist_max = rows()
    assert single_fixed["p50_ms"] == 20.0 and single_fixed["cpu_job_pct"] == 120.0
    assert "fps_vs_single" not in single_fixed
    assert math.isclose(dist_fixed["fps_vs_single"], 19.8 / 20.0) and dist_fixed["p50_vs_single"] == 1.5
    assert dist_max["fps_vs_single"] == 1.25 and math.isclose(dist_max["p50_vs_single"], 70.0 / 90.0)
    assert {c.key for c in pipeline.COLUMNS} <= set(dist_fixed) | {"fps_vs_single", "p50_vs_single"}


@pytest.mark.parametrize("fps, p50, met", [(19.8, 30.0, True), (19.0, 30.0, False), (19.8, 120.0, False)])
def test_target_is_the_fixed_rate_distributed_run(tmp_path, fps, p50, met):
    target = pipeline.target(rows(fps, p50), BenchOptions(out_dir=tmp_path))
    assert target.met is met
    assert f"{fps:.1f} FPS out at 20.0 fps in" in target.measured and "headroom: 50.0 FPS" in target.measured


@pytest.mark.parametrize("fps", [10.0, 30.0])
def test_target_is_judged_only_at_20_fps_input(tmp_path, fps):
    target = pipeline.target(rows(), BenchOptions(out_dir=tmp_path, fps=fps))
    assert target.met is None
    assert target.measured == (f"not measured: the fixed input rate is {fps:g} fps; "
                               "the target is defined at 20 fps")


def test_notes_give_the_ratios_and_a_breakdown_per_run(tmp_path):
    details = {"jobs": {"single": {"startup_s": 1.2, "stop_s": 0.5, "clean_stop": True, "returncode": 0,
                                   "log": "x.log"}},
               "runs": {"single, 20 fps": pipeline.run_details(client_result("20 fps", 20.0, [10.0]), USAGE)}}
    text = pipeline.notes(BenchOptions(out_dir=tmp_path), 20.0, rows(), details)
    assert text[0] == ("Distributed / single process, same input: 20 fps: FPS 0.99x, p50 1.50x; "
                       "max: FPS 1.25x, p50 0.78x.")
    assert "single 1.2 s / 0.5 s" in text[2] and text[-1].startswith("single, 20 fps: compute p50 ms")
    assert not any("error message" in line or "sampling stopped" in line for line in text)


def test_run_warnings_name_server_errors_and_stopped_cpu_sampling():
    result = client_result("max", 20.0, [10.0])
    result.errors, result.error_count = ["busy: queue full", "late: frame 3", "busy: queue full"], 7
    usage = Usage(samples=2, sampling_error="RuntimeError: process table unreadable")
    assert pipeline.run_warnings("single, max", pipeline.run_details(result, usage)) == [
        "single, max: CPU sampling stopped: RuntimeError: process table unreadable",
        "single, max: 7 error message(s) from the server, e.g. busy: queue full; late: frame 3"]


def test_details_and_breakdown_keep_stage_and_hop_figures():
    stats = {"stages": {"vision#0": {"compute_ms": {"p50": 4.1, "p95": 40.0}, "mean_batch": 1.2}},
             "hops": {"ingest#0->vision#0": {"hop_ms": {"p50": 0.85}, "bytes_sent": 1_843_200,
                                             "messages_sent": 2}}}
    details = pipeline.run_details(client_result("20 fps", 20.0, [10.0], stats=stats), USAGE)
    assert details["compute_ms"]["vision#0"]["p50"] == 4.1
    assert details["hops"]["ingest#0->vision#0"] == {"hop_ms": {"p50": 0.85}, "bytes_per_message": 921_600.0}
    line = pipeline.breakdown(details)
    assert "vision#0 4.10" in line and "ingest#0->vision#0 0.85 ms x 921.6 kB" in line and "drops: none" in line


def test_quick_run_produces_every_figure(tmp_path):
    options = BenchOptions(out_dir=tmp_path, quick=True)
    result = pipeline.run(options, Progress(pipeline.steps(options), stream=io.StringIO()))
    dist = "distributed (3 ranks)"
    assert [(r["layout"], r["input"]) for r in result.rows] == [
        ("single", "20 fps"), ("single", "max"), (dist, "20 fps"), (dist, "max")]
    for row in result.rows:
        for key in ("fps", "p50_ms", "p95_ms", "p99_ms", "ttff_ms", "cpu_job_pct"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["sent"] > 0 and row["received"] > 0
    assert result.targets[0].met is not None
    for run in result.details["runs"].values():
        assert set(run["compute_ms"]) == {"ingest#0", "vision#0", "generator#0", "display#0"}
    assert (tmp_path / "logs" / "pipeline-single.log").exists()
