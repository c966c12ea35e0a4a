"""Section 'gpu': the skip without CUDA, and its measuring code run on the CPU (stages)
and over gloo (the two-rank link harness); the real thing runs where CUDA is."""

import io
import math
import time

import pytest
import torch

from runtime.bench import gpu
from runtime.bench.options import BenchOptions
from runtime.bench.progress import Progress
from runtime.bench.stage_harness import style_weights

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def quiet_progress(total: int) -> Progress:
    return Progress(total, stream=io.StringIO())


def test_without_cuda_the_section_is_skipped_at_once_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    options = BenchOptions(out_dir=tmp_path, quick=True)
    progress = quiet_progress(1)
    started = time.monotonic()
    result = gpu.run(options, progress)
    assert time.monotonic() - started < 1.0
    assert gpu.steps(options) == 1 and progress.done == 1
    assert result.name == "gpu" and result.title and not result.rows
    assert result.skipped == ("no CUDA device on this machine (torch.cuda.is_available() is False); "
                              "GPU figures need a GPU host")


def test_stage_timings_give_a_row_per_stage_and_batch_size(tmp_path):
    # The section's code on the CPU, with batches of 1 and 2 (8 would cost seconds per case here).
    batches = (1, 2)
    progress = quiet_progress(len(gpu.STAGES) * len(batches))
    rows = gpu.stage_rows(torch.device("cpu"), warmup=1, timed=3, progress=progress,
                          weights=style_weights(tmp_path), batch_sizes=batches)
    assert [(r["what"], r["batch"]) for r in rows] == [(s, b) for s in gpu.STAGES for b in batches]
    for row in rows:
        assert 0 < row["p50_ms"] <= row["p95_ms"] and row["fps"] > 0 and row["size"] == f"batch {row['batch']}"
        assert math.isnan(row["peak_mib"])  # CUDA memory only
    assert progress.done == len(rows)
    # No comparison of the timings themselves: on a shared machine any order can happen
    # (speed goals are the benchmark's to print, not a test's to assert).


def test_the_section_says_mtcnn_and_batches_of_1_and_8():
    assert gpu.BATCH_SIZES == (1, 8)
    assert "Haar" not in gpu.__doc__ and "MTCNN" in gpu.__doc__
    assert {"vision stage", "MTCNN detection", "emotion model", "generator, style net"} <= set(gpu.STAGES)


def test_link_harness_reports_receiver_seconds_per_round_and_figures():
    seconds = gpu.link_seconds("gloo", ("cpu", "cpu"), gpu.PAYLOADS, messages=3, rounds=2)
    assert set(seconds) == set(gpu.PAYLOADS)
    assert all(len(s["channel"]) == len(s["raw"]) == 2 and min(s["channel"] + s["raw"]) > 0 for s in seconds.values())
    rows, targets = gpu.nccl_figures(seconds, messages=3)
    assert [(r["what"], r["size"]) for r in rows] == [(w, p) for p in gpu.PAYLOADS
                                                      for w in ("NCCL channel", "raw NCCL send/recv")]
    assert rows[0]["bytes"] == 3 * 320 * 320 * 4 and rows[2]["bytes"] == 720 * 1280 * 3
    assert all(r["mb_s"] > 0 for r in rows) and [t.met is not None for t in targets] == [True, True]


def test_a_failing_link_rank_fails_fast_with_its_error():
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"link rank 1 failed: \w+Error: .+ \(traceback in the log\)"):
        gpu.link_seconds("gloo", ("cpu", "cuda:99"), gpu.PAYLOADS, messages=1, rounds=1)  # no such device
    assert time.monotonic() - started < 60


def test_figures_are_the_median_round_and_the_target_is_the_channel_share_of_raw():
    size = 3 * 320 * 320 * 4  # the 1.2 MB payload
    seconds = {"1.2 MB": {"channel": [1.0, 2.0, 4.0], "raw": [1.0, 1.0, 1.0]},
               "2.76 MB": {"channel": [1.0], "raw": [1.05]}}
    rows, targets = gpu.nccl_figures(seconds, messages=10)
    assert rows[0]["mb_s"] == pytest.approx(size * 10 / 2.0 / 1e6)
    assert rows[1]["mb_s"] == pytest.approx(size * 10 / 1e6)
    assert targets[0].met is False and targets[0].measured.startswith("0.50x (")
    assert targets[1].met is True and targets[1].goal == ">= 0.9x"


def test_a_share_that_could_not_be_computed_leaves_the_target_unjudged():
    seconds = {"1.2 MB": {"channel": [1.0], "raw": []}, "2.76 MB": {"channel": [1.0], "raw": [1.0]}}
    _, targets = gpu.nccl_figures(seconds, messages=10)
    assert targets[0].met is None and targets[1].met is True


@needs_cuda
def test_on_cuda_every_stage_is_timed_with_its_memory(tmp_path):
    options = BenchOptions(out_dir=tmp_path, quick=True, rounds=1)
    progress = quiet_progress(gpu.steps(options))
    result = gpu.run(options, progress)
    assert result.skipped is None and progress.done == gpu.steps(options)
    stage_rows = [r for r in result.rows if "p50_ms" in r]
    assert len(stage_rows) == len(gpu.STAGES) * len(gpu.BATCH_SIZES)
    assert all(r["p50_ms"] > 0 and r["peak_mib"] > 0 for r in stage_rows)
    link_rows = [r for r in result.rows if "mb_s" in r]
    if torch.cuda.device_count() >= 2:
        assert len(link_rows) == 2 * len(gpu.PAYLOADS) and all(r["mb_s"] > 0 for r in link_rows)
        assert all(t.met is not None for t in result.targets)
    else:
        assert not link_rows and all(t.met is None for t in result.targets)
        assert any("NCCL figures skipped" in note for note in result.notes)
