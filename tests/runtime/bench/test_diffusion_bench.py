"""Section 'diffusion': one real quick run on the CPU (every CPU row with finite figures, the
fallback targets, no GPU rows without CUDA and the note saying why), SD-Turbo's shapes
checked on the meta device, and the GPU part's planning, rows and targets driven on the CPU
with the tiny model (its CUDA-only parts run where CUDA is)."""

from __future__ import annotations

import io
import math
import time

import pytest
import torch

from runtime.bench import diffusion, diffusion_gpu, diffusion_models, runner
from runtime.bench.diffusion_gpu import COMPILED, COMPILED_GRAPHS, EAGER, GRAPHS, GpuBench, GpuBudget, GpuCase
from runtime.bench.options import SECTIONS, BenchOptions
from runtime.bench.progress import Progress
from runtime.bench.stage_harness import Timing

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

FIGURES = ("ms_call", "ms_image", "images_s")


def quiet_progress(total: int) -> Progress:
    return Progress(total, stream=io.StringIO())


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """(result, progress, options, wall seconds) of one quick run with CUDA reported absent."""
    options = BenchOptions(out_dir=tmp_path_factory.mktemp("diffusion"), quick=True, sections=("diffusion",))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        progress = quiet_progress(diffusion.steps(options))
        threads = torch.get_num_threads()
        started = time.monotonic()
        result = diffusion.run(options, progress)
        wall = time.monotonic() - started
        assert torch.get_num_threads() == threads  # restored for the sections after
    return result, progress, options, wall


def test_the_section_is_registered_after_models_and_before_gpu():
    assert SECTIONS.index("models") + 1 == SECTIONS.index("diffusion") == SECTIONS.index("gpu") - 1
    assert runner.SECTION_MODULES["diffusion"] == "runtime.bench.diffusion"


def test_quick_run_gives_every_cpu_row_with_finite_figures(quick):
    result, progress, options, wall = quick
    assert result.name == "diffusion" and result.skipped is None
    expected = ([(f"render, {ae}", ae, b) for ae in ("VAE", "TAESD") for b in diffusion.CPU_BATCHES]
                + [("stage.process, VAE", "VAE", b) for b in diffusion.CPU_BATCHES])
    assert [(r["cpu_case"], r["autoencoder"], r["batch"]) for r in result.rows] == expected
    for row in result.rows:
        assert row["device"] == "cpu" and row["mode"] == EAGER
        for key in FIGURES:
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["ms_image"] == pytest.approx(row["ms_call"] / row["batch"])
        assert row["images_s"] == pytest.approx(1000.0 / row["ms_image"])
        assert row["calls"] >= diffusion.CPU_TIMING[True].min_calls
    assert progress.done == diffusion.steps(options) == 6
    assert wall < 60.0, f"the quick run took {wall:.0f} s; it should take well under 20 s"


def test_stage_rows_split_each_frame_into_render_and_overhead(quick):
    result, _, _, _ = quick
    stage = [r for r in result.rows if r["cpu_case"].startswith("stage.process")]
    assert len(stage) == len(diffusion.CPU_BATCHES)
    for row in stage:
        # Each call's render is part of that call, so neither median can exceed the call's.
        assert 0.0 < row["render_ms_image"] <= row["ms_image"]
        assert 0.0 <= row["overhead_ms"] <= row["ms_image"] and math.isfinite(row["overhead_ms"])
        # The tiny model's render (tens of ms) outweighs cropping, blending and conversion (a few).
        assert row["overhead_ms"] < 0.5 * row["ms_image"]
    assert all("overhead_ms" not in r for r in result.rows if r not in stage)


def test_without_cuda_there_are_no_gpu_rows_and_the_notes_say_why(quick):
    result, _, _, _ = quick
    assert not any("gpu_case" in r for r in result.rows) and "gpu" not in result.details
    assert diffusion_gpu.NO_CUDA in result.notes and "no CUDA device" in diffusion_gpu.NO_CUDA
    assert [p.file for p in result.plots] == ["diffusion_cpu.png"]
    assert all(result.plots[0].x in row for row in result.rows)
    gpu_targets = [t for t in result.targets if t.name.startswith("SD-Turbo")]
    assert len(gpu_targets) == 2
    assert all(t.met is None and t.measured == "not measured: no CUDA device" for t in gpu_targets)
    assert any(note.startswith("Quick run:") for note in result.notes)


def test_fallback_targets_report_the_switch_and_check_the_rate_after_it(quick):
    result, _, _, _ = quick
    switch = {t.name: t for t in result.targets if "fallback" in t.name}
    for wait in diffusion.SWITCH_WAITS_MS:
        timed = switch[f"fallback switching time: from the stage turning slow to frames served by the fallback "
                       f"(fallback_after_ms {wait:g})"]
        assert timed.goal == "report" and timed.met is None and timed.measured.endswith("diverted)")
        flowing = switch[f"frames keep flowing at the fallback's rate (fallback_after_ms {wait:g})"]
        figures = result.details["switch"][f"{wait:g}"]
        assert math.isfinite(figures["switch_ms"]) and figures["switch_ms"] > 0 and figures["fps_before"] > 0
        assert flowing.met is (figures["fps_after"] >= 0.9 * figures["fps_before"])
        assert len(figures["runs"]) == diffusion.SWITCH_RUNS[True]
    assert len(switch) == 2 * len(diffusion.SWITCH_WAITS_MS)


def test_without_diffusers_the_section_is_skipped_with_the_install_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(diffusion, "missing_packages", lambda: ["diffusers"])
    options = BenchOptions(out_dir=tmp_path, quick=True, sections=("diffusion",))
    progress = quiet_progress(1)
    result = diffusion.run(options, progress)
    assert diffusion.steps(options) == 1 and progress.done == 1 and not result.rows
    assert result.skipped == "needs the 'diffusers' package: pip install -e '.[diffusion]'"


# ------------------------------------------------------------------------ models

def test_sd_turbo_modules_have_sd_turbo_shapes_and_866m_unet_parameters():
    unet, autoencoders = diffusion_models.sd_turbo_modules(torch.device("meta"), torch.bfloat16)
    params = diffusion_models.parameter_count(unet)
    assert params == diffusion_models.SD_TURBO_UNET_PARAMS and abs(params / 866e6 - 1) < 0.005
    assert unet.device.type == "meta" and unet.dtype == torch.bfloat16 and not unet.training
    config = unet.config
    assert (list(config.block_out_channels), list(config.attention_head_dim)) == ([320, 640, 1280, 1280],
                                                                                  [5, 10, 20, 20])
    assert config.cross_attention_dim == 1024 and config.use_linear_projection and config.in_channels == 4
    vae, taesd = autoencoders["VAE"], autoencoders["TAESD"]
    assert list(vae.config.block_out_channels) == [128, 256, 512, 512] and vae.config.latent_channels == 4
    assert vae.config.scaling_factor == 0.18215
    assert diffusion_models.parameter_count(vae) == diffusion_models.SD_TURBO_VAE_PARAMS
    assert diffusion_models.parameter_count(taesd) == diffusion_models.TAESD_PARAMS and taesd.config.latent_channels == 4
    model = diffusion_models.sd_turbo_model(unet, taesd, torch.device("meta"), torch.bfloat16)
    model.scheduler.set_timesteps(diffusion_gpu.STEPS)
    # Trailing spacing: steps 2 strength 0.5 runs the last step alone, at t=499.
    assert model.scheduler.timesteps.tolist() == [999, 499] and model.text_encoders == ()


def test_byte_level_tokenizer_stands_in_without_open_clip(monkeypatch, tmp_path):
    from transformers import CLIPTokenizer

    monkeypatch.setattr(diffusion_models, "clip_bpe_file", lambda: None)
    assert diffusion_models.write_clip_tokenizer(tmp_path) == 2 * 256 + 2
    ids = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)("a happy portrait").input_ids
    assert ids[0] == 512 and ids[-1] == 513 and len(ids) == len("ahappyportrait") + 2


# ------------------------------------------------------------------------ GPU part

def test_gpu_cases_put_eager_first_then_the_targets_and_new_compilations_last():
    full = diffusion_gpu.gpu_cases(quick=False)
    assert len(set(full)) == len(full)
    eager = [c for c in full if c.mode == EAGER]
    assert full[:len(eager)] == eager
    assert {(c.autoencoder, c.batch) for c in eager} == {(ae, b) for ae in ("VAE", "TAESD") for b in (1, 2, 4, 8)}
    assert {c.mode for c in full} == {EAGER, GRAPHS, COMPILED, COMPILED_GRAPHS}
    rest = full[len(eager):]
    assert rest[:2] == [GpuCase(COMPILED, "TAESD", 1), GpuCase(COMPILED, "TAESD", 8)]  # the targets' compilations
    # Every later compiled case reuses those two compilations, except the other batch sizes, which come last.
    assert all(c.batch in (1, 8) for c in rest[2:-2]) and rest[-2:] == [GpuCase(COMPILED, "TAESD", 2),
                                                                        GpuCase(COMPILED, "TAESD", 4)]
    assert max(full.index(c) for c in rest if c.compiled and c.batch in (1, 8)) < full.index(GpuCase(GRAPHS, "TAESD", 1))
    quick = diffusion_gpu.gpu_cases(quick=True)
    assert quick and all(c.mode == EAGER for c in quick)
    assert GpuCase(COMPILED_GRAPHS, "TAESD", 1).cuda_graphs and not GpuCase(COMPILED, "TAESD", 1).cuda_graphs


def test_budget_estimates_compiles_by_the_slowest_seen_and_refuses_what_does_not_fit():
    now = [0.0]
    budget = GpuBudget(200.0, Timing(warmup=1, min_calls=1, budget_s=2.0, max_calls=5), clock=lambda: now[0])
    assert budget.estimate_s(True) == diffusion_gpu.COMPILE_ESTIMATE_S + 2.0 + diffusion_gpu.TIMED_MARGIN_S
    now[0] = 80.0
    assert budget.allows(False) and not budget.allows(True)  # 80 + 125 > 200
    budget.record(False, 500.0)  # a first call that compiled nothing
    budget.record(True, 40.0)
    budget.record(True, 30.0)
    assert budget.compile_s == 40.0 and budget.allows(True) and budget.used_s() == 80.0
    now[0] = 160.0
    assert not budget.allows(True) and budget.allows(False)


def tiny_modules() -> tuple[object, dict[str, object]]:
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

    unet = UNet2DConditionModel(**diffusion_models.TINY_UNET).eval().requires_grad_(False)
    return unet, {"VAE": AutoencoderKL(**diffusion_models.TINY_VAE).eval().requires_grad_(False),
                  "TAESD": AutoencoderTiny(**diffusion_models.TINY_TAESD).eval().requires_grad_(False)}


def test_gpu_bench_on_the_cpu_times_what_fits_and_records_what_does_not():
    unet, autoencoders = tiny_modules()
    cases = [GpuCase(EAGER, "TAESD", 1), GpuCase(EAGER, "VAE", 2), GpuCase(COMPILED, "TAESD", 1),
             GpuCase(EAGER, "missing", 1)]
    timing = Timing(warmup=1, min_calls=2, budget_s=0.0, max_calls=2)
    progress = quiet_progress(len(cases))
    bench = GpuBench(unet, autoencoders, torch.device("cpu"), torch.float32, 32, GpuBudget(60.0, timing), progress)
    rows = bench.rows(cases)
    assert [(r["mode"], r["autoencoder"], r["batch"]) for r in rows] == [(EAGER, "TAESD", 1), (EAGER, "VAE", 2)]
    for row in rows:
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in (*FIGURES, "first_call_s"))
        assert row["gpu_case"] == f"{row['mode']}, {row['autoencoder']}" and "peak_mib" not in row  # CUDA only
        assert row["ms_image"] == pytest.approx(row["ms_call"] / row["batch"]) and row["calls"] == 2
    assert bench.left_out == [GpuCase(COMPILED, "TAESD", 1)]  # a 120 s compile estimate does not fit in 60 s
    assert len(bench.failed) == 1 and bench.failed[0].startswith("eager, missing, batch 1: KeyError")
    assert progress.done == len(cases)
    notes = diffusion_gpu.gpu_notes({"device": "cpu", "unet_params": 1, "build_s": 0.0, "budget_s": 60.0,
                                     "used_s": 1.0, "compile_s": None, "timing": {"min_calls": 2},
                                     "left_out": [c.label for c in bench.left_out], "failed": bench.failed})
    assert "left out: compiled, TAESD, batch 1." in notes[2] and "KeyError" in notes[3]


def test_compiled_loops_share_one_compiled_unet_compiling_each_batch_size_once():
    unet, autoencoders = tiny_modules()
    timing = Timing(warmup=0, min_calls=1, budget_s=0.0, max_calls=1)
    bench = GpuBench(unet, autoencoders, torch.device("cpu"), torch.float32, 32, GpuBudget(60.0, timing),
                     quiet_progress(1))
    compiled = bench.loop(GpuCase(COMPILED, "TAESD", 1))
    graphed_vae = bench.loop(GpuCase(COMPILED_GRAPHS, "VAE", 8))
    assert compiled.model.unet is graphed_vae.model.unet is not unet  # one torch.compile (lazy: not run here)
    assert compiled.model.unet._orig_mod is unet and bench.loop(GpuCase(EAGER, "TAESD", 1)).model.unet is unet
    assert bench.loop(GpuCase(COMPILED, "TAESD", 4)) is compiled  # one loop per mode and autoencoder
    assert bench.compiles(GpuCase(COMPILED, "VAE", 8)) and not bench.compiles(GpuCase(GRAPHS, "TAESD", 8))
    bench.compiled_batches.add(8)
    assert not bench.compiles(GpuCase(COMPILED_GRAPHS, "TAESD", 8)) and bench.compiles(GpuCase(COMPILED, "VAE", 1))


def test_gpu_targets_take_the_best_compiled_taesd_row_at_batch_1_and_batched():
    def row(mode: str, autoencoder: str, batch: int, images_s: float) -> dict:
        return {"gpu_case": f"{mode}, {autoencoder}", "mode": mode, "autoencoder": autoencoder, "batch": batch,
                "images_s": images_s, "ms_image": 1000.0 / images_s}

    gpu = {"device": "NVIDIA H200"}
    rows = [row(EAGER, "TAESD", 1, 500.0), row(COMPILED, "VAE", 8, 900.0), row(COMPILED, "TAESD", 1, 90.0),
            row(COMPILED_GRAPHS, "TAESD", 1, 130.0), row(COMPILED, "TAESD", 8, 180.0),
            {"cpu_case": "render, TAESD", "mode": COMPILED, "autoencoder": "TAESD", "batch": 4, "images_s": 999.0}]
    single, batched = diffusion_gpu.gpu_targets(rows, gpu)
    assert single.met is True and single.measured.startswith("130 images/s (compiled + CUDA graphs, batch 1")
    assert batched.met is False and batched.measured.startswith("180 images/s (compiled, batch 8")
    assert "H200" in single.measured and single.goal == ">= 100 images/s on one H100/H200"
    assert batched.goal == ">= 200 images/s on one H100/H200"
    missing = diffusion_gpu.gpu_targets(rows[:2], gpu)
    assert all(t.met is None and "time budget" in t.measured for t in missing)


def test_recompile_limit_is_raised_for_the_block_and_restored():
    import torch._dynamo

    saved = torch._dynamo.config.recompile_limit
    with diffusion_gpu.recompile_limit(saved + 50):
        assert torch._dynamo.config.recompile_limit == saved + 50
    assert torch._dynamo.config.recompile_limit == saved
