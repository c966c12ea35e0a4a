"""Section 'models': one real quick run on the CPU (every row, finite figures, no CUDA rows
without CUDA, the vision stage's steady state), plus the timing and weights helpers it uses."""

from __future__ import annotations

import io
import math

import cv2
import pytest
import torch

from runtime.bench import models, runner, stage_harness
from runtime.bench.options import SECTIONS, BenchOptions
from runtime.bench.progress import Progress
from runtime.bench.stage_harness import Timing, style_weights, time_calls
from stages.generator.stylenet import load_style_net


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """(result, progress, options) of one quick run with CUDA reported absent."""
    options = BenchOptions(out_dir=tmp_path_factory.mktemp("models"), quick=True, sections=("models",))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        progress = Progress(models.steps(options), stream=io.StringIO())
        threads = torch.get_num_threads(), cv2.getNumThreads()
        result = models.run(options, progress)
        assert (torch.get_num_threads(), cv2.getNumThreads()) == threads  # restored for the sections after
    return result, progress, options


def test_the_section_is_registered_before_gpu():
    assert SECTIONS.index("models") < SECTIONS.index("gpu")
    assert runner.SECTION_MODULES["models"] == "runtime.bench.models"


def test_quick_run_gives_every_cpu_row_with_finite_figures_and_no_cuda_row(quick):
    result, progress, options = quick
    assert result.name == "models" and result.skipped is None
    expected = [(label, "cpu", batch) for label, _, _ in models.models() for batch in models.BATCHES[True]]
    assert [(r["model"], r["device"], r["batch"]) for r in result.rows] == expected
    for row in result.rows:
        for key in ("ms_call", "ms_frame"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["ms_frame"] == pytest.approx(row["ms_call"] / row["batch"])
        assert row["calls"] >= models.TIMING[True].min_calls
    assert progress.done == models.steps(options) == len(models.models())
    assert {c.key for c in models.COLUMNS} <= set(result.rows[0])


def test_every_row_is_in_exactly_one_plot(quick):
    result, _, _ = quick
    plotted = [sum(spec.x in row for spec in result.plots) for row in result.rows]
    assert plotted == [1] * len(result.rows)


def test_the_full_run_times_batches_of_1_and_8_and_three_style_net_sides():
    assert models.BATCHES[False] == (1, 8) and models.STYLE_SIDES == (192, 256, 320)
    labels = [label for label, _, _ in models.models()]
    assert {"MTCNN verify, 1 box/frame", "MTCNN verify, 6 boxes/frame", "emotion net, 64x64 crop",
            "generator stage, style net 320 px", "generator stage, low-fi 320 px"} <= set(labels)


def test_vision_stage_steady_state_detects_one_frame_in_detect_every(quick):
    result, _, _ = quick
    frames = result.details["devices"]["cpu"]["vision_stage_frames"]
    assert frames["detect"] > 0 and frames["verify"] > 0
    assert frames["detect"] / (frames["detect"] + frames["verify"]) == pytest.approx(1 / models.VISION.detect_every)
    assert any("full detection on" in note and "1 in 5" in note for note in result.notes)


def test_notes_state_the_thread_count_and_the_missing_cuda(quick):
    result, _, _ = quick
    assert any(note.startswith("Threads: torch.set_num_threads(1)") for note in result.notes)
    assert "No CUDA device on this machine: CPU rows only." in result.notes
    assert any(note.startswith("Quick run:") for note in result.notes)


def test_vision_target_is_informational_with_the_cpu_figures(quick):
    result, _, _ = quick
    target = result.targets[0]
    vision = [r for r in result.rows if r["model"].startswith("vision stage")]
    assert target.name == "vision stage on CPU: ms per 640x480 frame" and target.met is None
    assert target.measured.startswith(f"{vision[0]['ms_frame']:.1f} ms at batch 1 (one rank: <= ")


def test_detection_quality_targets_are_judged_on_the_real_fixtures(quick):
    """The quick run streams 10 frames per fixture: the stage finds the astronaut alone,
    the six faces of the group, drops the old boxes on the cut; the nose landmark is the
    one point MTCNN places beyond 5 % of the eye distance (facenet-pytorch's does too)."""
    result, _, _ = quick
    met = {t.name.split(",")[0]: t.met for t in result.targets[1:]}
    assert met == {"astronaut fixture": True, "six-person group photo": True,
                   "scene cut: astronaut -> group photo": True, "astronaut landmarks vs hand-placed reference": False}
    landmarks = result.details["quality"]["landmark_error_pct"]
    assert landmarks["nose"] > 5 and all(v < 5 for k, v in landmarks.items() if k != "nose")


def test_vision_target_ignores_cuda_rows_and_says_when_nothing_was_measured():
    rows = [{"model": "vision stage, detect every 5", "device": "cuda", "batch": 1, "ms_frame": 2.0},
            {"model": "vision stage, detect every 5", "device": "cpu", "batch": 1, "ms_frame": 20.0},
            {"model": "vision stage, detect every 5", "device": "cpu", "batch": 8, "ms_frame": 12.5}]
    target = models.vision_target(rows)
    assert target.measured == "20.0 ms at batch 1 (one rank: <= 50 FPS); 12.5 ms at batch 8"
    assert models.vision_target(rows[:1]).measured == "not measured"


def test_without_the_group_photo_there_is_no_group_row(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "GROUP", tmp_path / "absent.jpg")
    labels = [label for label, _, _ in models.models()]
    assert not any("group" in label for label in labels)
    assert models.steps(BenchOptions(out_dir=tmp_path)) == len(labels) * len(models.devices())


def test_time_calls_warms_up_then_keeps_between_min_and_max_calls():
    calls = []
    samples = time_calls(calls.append, lambda: len(calls), torch.device("cpu"),
                         Timing(warmup=2, min_calls=3, budget_s=0.0, max_calls=10))
    assert len(samples) == 3 and calls == [0, 1, 2, 3, 4] and all(ms >= 0 for ms in samples)
    samples = time_calls(lambda _: None, lambda: None, torch.device("cpu"),
                         Timing(warmup=0, min_calls=1, budget_s=60.0, max_calls=4))
    assert len(samples) == 4  # the budget would allow more; max_calls stops it


@pytest.mark.parametrize("bad", [dict(warmup=-1), dict(min_calls=0), dict(min_calls=5, max_calls=4),
                                 dict(budget_s=float("nan"))])
def test_timing_refuses_impossible_settings(bad):
    with pytest.raises(ValueError, match="timing"):
        Timing(**{"warmup": 1, "min_calls": 1, "budget_s": 0.0, "max_calls": 2, **bad})


def test_shipped_style_weights_are_used_when_present_and_a_stand_in_otherwise(monkeypatch, tmp_path):
    if stage_harness.STYLE_WEIGHTS.is_file():
        shipped = style_weights(tmp_path)
        assert shipped.path == stage_harness.STYLE_WEIGHTS and not shipped.standin and shipped.note is None
    monkeypatch.setattr(stage_harness, "STYLE_WEIGHTS", tmp_path / "missing.pt")
    standin = style_weights(tmp_path / "scratch")
    assert standin.standin and standin.path.parent == tmp_path / "scratch" and "missing.pt" in standin.note
    net = load_style_net(standin.path)  # a valid state_dict of the network
    out = net(torch.rand(1, 3, 64, 64), torch.full((1, 26), 1 / 26))
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_every_case_also_gets_a_cuda_row(tmp_path):
    options = BenchOptions(out_dir=tmp_path, quick=True, sections=("models",))
    result = models.run(options, Progress(models.steps(options), stream=io.StringIO()))
    cpu = [(r["model"], r["batch"]) for r in result.rows if r["device"] == "cpu"]
    cuda = [(r["model"], r["batch"]) for r in result.rows if r["device"] == "cuda"]
    assert cuda == cpu and all(math.isfinite(r["ms_frame"]) and r["ms_frame"] > 0 for r in result.rows)
    assert any(note.startswith("CUDA rows: ") for note in result.notes)
