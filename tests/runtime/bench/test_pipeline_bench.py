"""Section 'pipeline': layouts, rows, ratios and the targets from client results, then one real quick run."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import yaml

from runtime.bench import pipeline
from runtime.bench.client import ClientResult
from runtime.bench.options import BenchOptions
from runtime.bench.progress import Progress
from runtime.bench.sysmon import Usage
from runtime.config import config_from_dict


def client_result(input: str, fps: float, latencies: list[float], sent: int = 100, received: int = 100,
                  stats: dict | None = None) -> ClientResult:
    return ClientResult(input=input, measured_s=5.0, window_start=1.0, window_end=6.0, sent=sent,
                        received=received, dropped=sent - received, fps_in=sent / 5.0, fps=fps,
                        latencies_ms=latencies, ttff_ms=80.0, stats=stats, drops={"ingest": 0})


USAGE = Usage(samples=10, mean={"job_cpu_pct": 120.0, "system_cpu_pct": 70.0})


def rows(dist_fixed_fps: float = 19.8, dist_p50: float = 30.0) -> list[dict]:
    single, dist, lowfi = pipeline.layouts(BenchOptions(out_dir=Path("unused")))
    out = [pipeline.run_row(single, client_result("20 fps", 20.0, [20.0] * 10), USAGE),
           pipeline.run_row(single, client_result("max", 40.0, [90.0] * 10), USAGE),
           pipeline.run_row(dist, client_result("20 fps", dist_fixed_fps, [dist_p50] * 10), USAGE),
           pipeline.run_row(dist, client_result("max", 50.0, [70.0] * 10), USAGE),
           pipeline.run_row(lowfi, client_result("20 fps", 20.0, [25.0] * 10), USAGE),
           pipeline.run_row(lowfi, client_result("max", 80.0, [45.0] * 10), USAGE)]
    pipeline.add_ratios(out)
    return out


def test_layouts_are_local_yaml_alone_then_the_default_and_the_lowfi_config_on_n_ranks(tmp_path):
    options = BenchOptions(out_dir=tmp_path, world_size=4)
    single, dist, lowfi = pipeline.layouts(options)
    assert (single.world_size, single.config) == (1, yaml.safe_load(pipeline.LOCAL_CONFIG.read_text()))
    assert (dist.world_size, dist.config, dist.name) == (4, {}, "distributed, style net (4 ranks)")
    assert (lowfi.world_size, lowfi.name) == (4, "distributed, low-fi (4 ranks)")
    assert lowfi.config == yaml.safe_load((pipeline.REPO / "configs" / "mirror-lowfi.yaml").read_text())
    assert single.name == "single, style net" and len({single.key, dist.key, lowfi.key}) == 3
    assert pipeline.inputs(options) == [20.0, None] and pipeline.steps(options) == 6


def test_each_layout_config_really_selects_its_generator(tmp_path):
    for layout in pipeline.layouts(BenchOptions(out_dir=tmp_path)):
        job = config_from_dict(layout.config)
        assert job.stage_configs["generator"].model == layout.generator, layout.name
        assert pipeline.GENERATORS[layout.generator] in layout.name
    assert [layout.generator for layout in pipeline.layouts(BenchOptions(out_dir=tmp_path))] == [
        "stylenet", "stylenet", "lowfi"]


def test_rows_carry_the_figures_and_distributed_rows_their_ratio_to_single_with_the_same_generator():
    single_fixed, _, dist_fixed, dist_max, lowfi_fixed, lowfi_max = rows()
    assert single_fixed["p50_ms"] == 20.0 and single_fixed["cpu_job_pct"] == 120.0
    assert (single_fixed["generator"], single_fixed["ranks"], lowfi_max["generator"]) == ("stylenet", 1, "lowfi")
    assert "fps_vs_single" not in single_fixed
    assert math.isclose(dist_fixed["fps_vs_single"], 19.8 / 20.0) and dist_fixed["p50_vs_single"] == 1.5
    assert dist_max["fps_vs_single"] == 1.25 and math.isclose(dist_max["p50_vs_single"], 70.0 / 90.0)
    assert "fps_vs_single" not in lowfi_fixed and "fps_vs_single" not in lowfi_max  # no single low-fi run
    assert {c.key for c in pipeline.COLUMNS} <= set(dist_fixed) | {"fps_vs_single", "p50_vs_single"}


@pytest.mark.parametrize("fps, p50, met", [(19.8, 30.0, (True, True)), (19.0, 30.0, (False, True)),
                                           (19.8, 110.0, (False, True)), (15.0, 119.0, (False, True)),
                                           (14.9, 30.0, (False, False)), (19.8, 121.0, (False, False))])
def test_targets_judge_the_default_distributed_run_at_the_fixed_rate(tmp_path, fps, p50, met):
    sustained, learned = pipeline.targets(rows(fps, p50), BenchOptions(out_dir=tmp_path))
    assert (sustained.met, learned.met) == met
    assert sustained.name == "default mirror pipeline 640x480, distributed (3 ranks)"
    assert learned.name == "default pipeline (3 ranks, 640x480 at 20 fps) with the learned generator"
    assert learned.goal == ">= 15 FPS and p50 glass-to-glass <= 120 ms"
    for target in (sustained, learned):  # the style-net layout's figures, never the low-fi one's
        assert f"{fps:.1f} FPS out at 20.0 fps in" in target.measured and "headroom: 50.0 FPS" in target.measured
        assert f"p50 {p50:.1f} ms" in target.measured


@pytest.mark.parametrize("fps", [10.0, 30.0])
def test_targets_are_judged_only_at_20_fps_input(tmp_path, fps):
    for target in pipeline.targets(rows(), BenchOptions(out_dir=tmp_path, fps=fps)):
        assert target.met is None
        assert target.measured == (f"not measured: the fixed input rate is {fps:g} fps; "
                                   "the target is defined at 20 fps")


def test_targets_without_the_default_distributed_run_are_unjudged(tmp_path):
    only_lowfi = [row for row in rows() if row["generator"] == "lowfi"]
    for target in pipeline.targets(only_lowfi, BenchOptions(out_dir=tmp_path)):
        assert target.met is None and target.measured == "not measured: no distributed run at the fixed rate"


def job(generator: str, ran: list[str]) -> dict:
    return {"startup_s": 1.2, "stop_s": 0.5, "clean_stop": True, "returncode": 0, "log": "x.log",
            "generator": generator, "generators_ran": ran}


def test_notes_give_the_ratios_the_generators_and_a_breakdown_per_run(tmp_path):
    details = {"jobs": {"single, style net": job("stylenet", ["stylenet on cpu"])},
               "runs": {"single, 20 fps": pipeline.run_details(client_result("20 fps", 20.0, [10.0]), USAGE)}}
    text = pipeline.notes(BenchOptions(out_dir=tmp_path), 20.0, rows(), details)
    assert text[0] == ("Distributed / single process, same input and generator: distributed, style net (3 ranks), "
                       "20 fps: FPS 0.99x, p50 1.50x; distributed, style net (3 ranks), max: FPS 1.25x, p50 0.78x.")
    assert text[1] == ("Distributed, by generator: 20 fps: style net 19.8 FPS / p50 30.0 ms, low-fi 20.0 FPS / "
                       "p50 25.0 ms; max: style net 50.0 FPS / p50 70.0 ms, low-fi 80.0 FPS / p50 45.0 ms.")
    assert "single, style net 1.2 s / 0.5 s" in text[3] and text[-1].startswith("single, 20 fps: compute p50 ms")
    assert not any("error message" in line or "sampling stopped" in line or "expected generator" in line
                   for line in text)


def test_a_job_that_did_not_run_its_layouts_generator_is_named():
    jobs = {"a": job("lowfi", ["lowfi on cpu"]), "b": job("lowfi", ["stylenet on cpu"]), "c": job("stylenet", []),
            "d": job("stylenet", ["stylenet on cuda:0", "stylenet on cuda:1"])}
    assert pipeline.generator_warnings(jobs) == [
        "b: expected generator 'lowfi', the job's log shows stylenet on cpu; see x.log",
        "c: expected generator 'stylenet', the job's log shows no generator ready line; see x.log"]


def test_job_details_read_the_generators_from_the_log(tmp_path):
    class FakeJob:
        startup_s, stop_s, log_path = 1.0, 0.5, tmp_path / "j.log"
        exit = type("Exit", (), {"clean": True, "returncode": 0})()

        def log_text(self) -> str:
            return ("[rank2] stages.generator: generator ready: lowfi on cpu\n"
                    "[rank3] stages.generator: generator ready: lowfi on cuda:1\n")

    assert pipeline.job_details(FakeJob())["generators_ran"] == ["lowfi on cpu", "lowfi on cuda:1"]


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
    names = [layout.name for layout in pipeline.layouts(options)]
    assert [(r["layout"], r["input"]) for r in result.rows] == [
        (name, mode) for name in names for mode in ("20 fps", "max")]
    for row in result.rows:
        for key in ("fps", "p50_ms", "p95_ms", "p99_ms", "ttff_ms", "cpu_job_pct"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["sent"] > 0 and row["received"] > 0, row
    assert len(result.targets) == 2 and all(t.met is not None for t in result.targets)
    for run in result.details["runs"].values():
        assert set(run["compute_ms"]) == {"ingest#0", "vision#0", "generator#0", "display#0"}
    for layout in pipeline.layouts(options):  # each job's log shows the renderer its layout selects
        assert result.details["jobs"][layout.name]["generators_ran"] == [f"{layout.generator} on cpu"]
    assert not any("expected generator" in note for note in result.notes)
    assert (tmp_path / "logs" / "pipeline-single.log").exists()
    assert (tmp_path / "logs" / "pipeline-distributed-lowfi.log").exists()
