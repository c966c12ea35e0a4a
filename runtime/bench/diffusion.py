"""Section 'diffusion': what a diffusion portrait costs per frame, and how fast frames move to
the fallback when the diffusion stage turns slow.

CPU (always; one torch thread, what a pipeline rank gets by default):

* ``RealtimeImg2Img.render`` of the tiny random model (``diffusion_models``, loaded through
  the stage's ``load_model``) at 64 px, steps 2 strength 0.5 (one UNet call), batches 1 and
  4, with its VAE and with a tiny AutoencoderTiny: the loop's cost, not a real model's.
* ``DiffusionStage.process`` on the same model, fed the 640x480 astronaut fixture with its
  face, every frame rendered (similarity filter and render budget off). The stage's render
  call is timed inside each ``process`` call, so the overhead around it (framing, cropping,
  gating, prompt lookup, blending, resizing to the output size, smoothing, conversion to
  uint8) is ``process`` less its render, paired call by call: no noise from comparing runs.
* The runtime's switching time to a fallback (``fallback_switch.measure_switch``: the real
  router between in-process links) with ``fallback_after_ms`` 0 (the default) and 100:
  median of 3 runs (1 with ``--quick``), with the output rate before and after.

GPU (CUDA only; skipped with a note otherwise): SD-Turbo's architecture with random weights
at 512 px in bfloat16, eager and compiled, with the VAE and TAESD, batches 1 to 8, against
the issue's throughput targets: see ``diffusion_gpu``.

diffusers and transformers are imported only inside ``run`` (through the builders and the
stage's loader): without them the section is skipped with the install hint.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import psutil
import torch

from runtime.bench import diffusion_models as models
from runtime.bench.diffusion_gpu import (
    AUTOENCODERS,
    EAGER,
    STEPS,
    STRENGTH,
    gpu_cases,
    gpu_notes,
    gpu_part,
    gpu_targets,
    random_crops,
    time_render,
)
from runtime.bench.fallback_switch import measure_switch
from runtime.bench.options import BenchOptions
from runtime.bench.progress import Progress
from runtime.bench.results import Column, PlotSpec, SectionResult, Target
from runtime.bench.stage_harness import Timing, fixture_frame, frame_batch, stage_context, time_calls
from runtime.bench.stats import median
from stages.diffusion.config import DiffusionConfig
from stages.diffusion.loading import INSTALL_HINT, load_model
from stages.diffusion.prompts import PromptEmbeddings
from stages.diffusion.realtime import RealtimeImg2Img
from stages.diffusion.stage import DiffusionStage
from stages.prompt import style_prompt

TITLE = "Diffusion: img2img portrait cost per frame, and the switch to the fallback"
REQUIRED = ("diffusers", "transformers")
CPU = torch.device("cpu")
CPU_SIZE = 64
CPU_BATCHES = (1, 4)
CPU_TIMING = {False: Timing(warmup=2, min_calls=5, budget_s=1.5, max_calls=100),
              True: Timing(warmup=1, min_calls=2, budget_s=0.0, max_calls=2)}
"""Calls per CPU case, by ``options.quick``."""
ASTRONAUT_FACE = {"face_id": 1, "bbox": [221, 83, 119, 119], "emotion": "happy",
                  "emotion_probs": {"happy": 0.9, "neutral": 0.1}, "quality": 0.95}
"""The astronaut fixture's face as the vision stage reports it (the stage frames and styles by it)."""

SWITCH_WAITS_MS = (0.0, 100.0)
"""``fallback_after_ms`` values measured: the default (divert at once) and a 100 ms grace."""
SWITCH_RUNS = {False: 3, True: 1}
SWITCH_SECONDS = {False: (1.0, 2.0), True: (0.5, 1.5)}
"""(before, after) the primary turns slow, by ``options.quick``; the rate after skips its first 0.5 s."""
FLOW_SHARE = 0.9
"""After the switch, frames should keep flowing at >= this share of the rate before."""

COLUMNS = [
    Column(key="what", header="what"),
    Column(key="autoencoder", header="autoencoder"),
    Column(key="mode", header="mode"),
    Column(key="batch", header="batch"),
    Column(key="ms_call", header="ms per call", fmt="{:.2f}"),
    Column(key="ms_image", header="ms per image", fmt="{:.2f}"),
    Column(key="images_s", header="images/s", fmt="{:.1f}"),
    Column(key="overhead_ms", header="overhead ms/frame", fmt="{:.2f}"),
    Column(key="first_call_s", header="first call s", fmt="{:.1f}"),
    Column(key="peak_mib", header="GPU peak MiB", fmt="{:.0f}"),
    Column(key="calls", header="timed calls"),
]
PLOTS = [
    PlotSpec(file="diffusion_cpu.png", title="CPU, tiny model at 64 px: ms per image (median)", x="cpu_case",
             y="ms_image", series="batch", ylabel="ms per image"),
    PlotSpec(file="diffusion_gpu.png", title="GPU, SD-Turbo shapes at 512 px, bf16: images per second",
             x="gpu_case", y="images_s", series="batch", ylabel="images/s"),
]
"""CPU rows carry the key 'cpu_case', GPU rows 'gpu_case': each row is in one chart."""


def missing_packages() -> list[str]:
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def steps(options: BenchOptions) -> int:
    if missing_packages():
        return 1
    gpu = len(gpu_cases(options.quick)) if torch.cuda.is_available() else 1
    return len(AUTOENCODERS) + 1 + len(SWITCH_WAITS_MS) + gpu


def run(options: BenchOptions, progress: Progress) -> SectionResult:
    missing = missing_packages()
    if missing:
        progress.step("diffusion: skipped, diffusers missing")
        packages = " and ".join(f"'{name}'" for name in missing)
        return SectionResult(name="diffusion", title=TITLE, skipped=f"needs the {packages} package"
                             f"{'s' if len(missing) > 1 else ''}: {INSTALL_HINT}")
    quick, timing = options.quick, CPU_TIMING[options.quick]
    details: dict[str, Any] = {"cpu_timing": asdict(timing), "load_avg_1min": {"before": psutil.getloadavg()[0]}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one pipeline rank's share (compute.torch_threads)
    try:
        with quiet_hub_libraries():
            scratch = options.out_dir / "scratch" / "diffusion"
            model_dir = models.build_tiny_model(scratch / "tiny-sd-turbo")
            taesd_dir = models.build_tiny_autoencoder(scratch / "tiny-taesd")
            rows = render_rows(model_dir, taesd_dir, timing, progress) + stage_rows(model_dir, timing, progress)
            details["switch"] = switch_figures(quick, progress)
            gpu_rows: list[dict[str, Any]] = []
            if torch.cuda.is_available():
                gpu_rows, details["gpu"] = gpu_part(quick, progress)
            else:
                progress.step("diffusion: GPU part skipped, no CUDA device")
    finally:
        torch.set_num_threads(threads)
    details["load_avg_1min"]["after"] = psutil.getloadavg()[0]
    return SectionResult(name="diffusion", title=TITLE, columns=COLUMNS, rows=rows + gpu_rows,
                         targets=switch_targets(details["switch"]) + gpu_targets(gpu_rows, details.get("gpu")),
                         notes=notes(options, details), plots=PLOTS if gpu_rows else PLOTS[:1], details=details)


@contextlib.contextmanager
def quiet_hub_libraries() -> Iterator[None]:
    """diffusers' and transformers' progress bars and config warnings off (they would
    interleave with the benchmark's progress bar), restored after."""
    utils = [importlib.import_module(f"{name}.utils.logging") for name in REQUIRED]
    saved = [(u.is_progress_bar_enabled(), u.get_verbosity()) for u in utils]
    for u in utils:
        u.disable_progress_bar()
        u.set_verbosity_error()
    try:
        yield
    finally:
        for u, (bars, verbosity) in zip(utils, saved):
            if bars:
                u.enable_progress_bar()
            u.set_verbosity(verbosity)


# ------------------------------------------------------------------------ CPU

def render_rows(model_dir, taesd_dir, timing: Timing, progress: Progress) -> list[dict[str, Any]]:
    """The tiny model's render at each CPU batch size, with its VAE and with TAESD."""
    rows = []
    text = style_prompt(ASTRONAUT_FACE["emotion"], 0.9).text
    for autoencoder in AUTOENCODERS:
        progress.start(f"diffusion: render, tiny model, {autoencoder}")
        model = load_model(str(model_dir), CPU, torch.float32,
                           tiny_autoencoder_path=str(taesd_dir) if autoencoder == "TAESD" else None)
        loop = RealtimeImg2Img(model, size=CPU_SIZE, steps=STEPS, strength=STRENGTH, guidance_scale=0.0, seed=0)
        prompts = PromptEmbeddings(model.tokenizers, model.text_encoders, CPU, model.dtype, capacity=4)
        for batch in CPU_BATCHES:
            figures = time_render(loop, random_crops(batch, CPU_SIZE, CPU), prompts.get([text] * batch), timing)
            rows.append({"what": f"render, tiny model {CPU_SIZE} px", "cpu_case": f"render, {autoencoder}",
                         "device": "cpu", "autoencoder": autoencoder, "mode": EAGER, **figures})
        progress.step()
    return rows


def stage_rows(model_dir, timing: Timing, progress: Progress) -> list[dict[str, Any]]:
    """``DiffusionStage.process`` per frame at each CPU batch size, and its overhead: each
    call's time less the time of the render it made (exactly one per call: nothing is skipped)."""
    progress.start("diffusion: DiffusionStage.process, tiny model")
    config = DiffusionConfig(model_path=str(model_dir), size=CPU_SIZE, steps=STEPS, strength=STRENGTH,
                             dtype="float32", similarity_threshold=0.0, regen_rate=0.0)
    stage = DiffusionStage(config, stage_context(CPU, "diffusion"))
    stage.setup()
    render_ms: list[float] = []
    stage.loop.render = timed(stage.loop.render, render_ms)
    frame, index, rows = fixture_frame(CPU), itertools.count(1), []
    try:
        for batch in CPU_BATCHES:
            render_ms.clear()
            samples = time_calls(stage.process, lambda b=batch: frame_batch(frame, b, next(index), [ASTRONAUT_FACE]),
                                 CPU, timing)
            if len(render_ms) != timing.warmup + len(samples):
                raise RuntimeError(f"the stage rendered {len(render_ms)} times in {timing.warmup + len(samples)} "
                                   "calls; every call must render once for the overhead to be measured")
            renders = render_ms[timing.warmup:]
            ms = median(samples)
            rows.append({"what": "DiffusionStage.process, tiny model", "cpu_case": "stage.process, VAE",
                         "device": "cpu", "autoencoder": "VAE", "mode": EAGER, "batch": batch, "ms_call": ms,
                         "ms_image": ms / batch, "images_s": 1000.0 * batch / ms,
                         "render_ms_image": median(renders) / batch,
                         "overhead_ms": median(t - r for t, r in zip(samples, renders)) / batch,
                         "calls": len(samples)})
    finally:
        stage.teardown()
    progress.step()
    return rows


def timed(call: Callable[..., Any], into: list[float]) -> Callable[..., Any]:
    """``call``, appending each call's milliseconds to ``into``."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            into.append((time.perf_counter() - started) * 1000.0)
    return wrapper


# ------------------------------------------------------------------------ fallback

def switch_figures(quick: bool, progress: Progress) -> dict[str, dict[str, Any]]:
    """Per ``fallback_after_ms``: the medians over the runs of ``measure_switch``, and the runs."""
    before_s, after_s = SWITCH_SECONDS[quick]
    figures = {}
    for wait_ms in SWITCH_WAITS_MS:
        progress.start(f"diffusion: fallback switch, fallback_after_ms {wait_ms:g}")
        runs = [measure_switch(wait_ms=wait_ms, before_s=before_s, after_s=after_s) for _ in range(SWITCH_RUNS[quick])]
        figures[f"{wait_ms:g}"] = {"wait_ms": wait_ms, **{key: median(getattr(r, key) for r in runs)
                                                         for key in ("switch_ms", "fps_before", "fps_after",
                                                                     "diverted")},
                                   "runs": [asdict(r) for r in runs]}
        progress.step()
    return figures


def switch_targets(figures: dict[str, dict[str, Any]]) -> list[Target]:
    """Two per ``fallback_after_ms``: the switching time (reported) and the rate kept after it."""
    targets = []
    for wait, f in figures.items():
        runs = f"median of {len(f['runs'])} run{'s' if len(f['runs']) > 1 else ''}"
        switched = f["switch_ms"] == f["switch_ms"]  # NaN: the fallback never served
        targets.append(Target(
            name=f"fallback switching time: from the stage turning slow to frames served by the fallback "
                 f"(fallback_after_ms {wait})", goal="report",
            measured=(f"{f['switch_ms']:.0f} ms ({runs}; {f['diverted']:.0f} frames diverted)" if switched
                      else f"the fallback served no frame ({runs})"), met=None))
        before, after = f["fps_before"], f["fps_after"]
        targets.append(Target(
            name=f"frames keep flowing at the fallback's rate (fallback_after_ms {wait})",
            goal=f">= {FLOW_SHARE}x the rate before the switch",
            measured=f"{after:.1f} vs {before:.1f} frames/s before ({after / before:.2f}x; {runs})" if before > 0
            else f"no frames before the switch ({runs})",
            met=after >= FLOW_SHARE * before if before > 0 else None))
    return targets


# ------------------------------------------------------------------------ notes

def notes(options: BenchOptions, details: dict[str, Any]) -> list[str]:
    timing, load = CPU_TIMING[options.quick], details["load_avg_1min"]
    tokenizer = "the real CLIP tokenizer" if models.clip_bpe_file() else "a byte-level CLIP tokenizer (no open-clip)"
    switch = {name: p.default for name, p in inspect.signature(measure_switch).parameters.items()}
    before_s, after_s = SWITCH_SECONDS[options.quick]
    out = [(f"Threads: torch.set_num_threads(1), one pipeline rank's default share. The machine has "
            f"{psutil.cpu_count()} logical core(s); 1-minute load average {load['before']:.2f} before, "
            f"{load['after']:.2f} after (more than ~1 means other programs competed for the cores)."),
           (f"CPU rows: diffusers' tiny test model with random weights (UNet 32/64 channels, VAE 32/64, CLIP text "
            f"encoder 32 wide, {tokenizer}), float32, {CPU_SIZE} px, steps {STEPS} strength {STRENGTH} (one UNet "
            "call); TAESD = a tiny AutoencoderTiny (32 channels) in place of the VAE. Median of the timed calls "
            f"after {timing.warmup} warm-up call(s), at least {timing.min_calls}. They time the loop's and the "
            "stage's code, not a real model (SD-Turbo takes seconds per frame on a CPU)."),
           ("DiffusionStage.process: 640x480 astronaut frames from 1 or 4 sessions with the face in meta, "
            "similarity filter off and no render budget (every frame renders), default live settings (320 px "
            "output, smoothing, strength blend). 'overhead ms/frame' = each call's time less the render it made, "
            "per frame (median): framing, cropping, gating, prompt lookup, blending, resizing, smoothing, uint8."),
           (f"Fallback switch (fallback_switch.measure_switch): a {switch['fps']:g} fps producer through the "
            f"runtime's Router (links of capacity {switch['capacity']}) to a primary taking {switch['fast_ms']:g} ms "
            f"per frame that turns to {switch['slow_ms']:g} ms, and a fallback taking {switch['fast_ms']:g} ms; "
            f"{before_s:g} s before the turn, {after_s:g} s after, the rate after counted from 0.5 s after the "
            "turn. Switching time = from the turn to the fallback's first frame.")]
    out += gpu_notes(details.get("gpu"))
    if options.quick:
        out.append(f"Quick run: {timing.min_calls} timed call(s) per case, {SWITCH_RUNS[True]} switch run per "
                   "setting, no compilation or CUDA graphs on a GPU; these figures are not for quoting.")
    return out
