"""The GPU part of section 'diffusion': SD-Turbo's architecture timed through the stage's loop.

SD-Turbo's UNet and VAE with random weights and a TAESD-shaped AutoencoderTiny
(``diffusion_models.sd_turbo_modules``), in bfloat16 at 512 px, steps 2 strength 0.5 (one
UNet call at t=499, the stage's defaults), rendered by the stage's own ``RealtimeImg2Img``
in four modes: eager, eager with CUDA-graph replay, with the UNet compiled and compiled
with CUDA graphs; with the full VAE and with TAESD; batches 1, 2, 4 and 8.

Compiled means what the stage's ``compile`` does, ``torch.compile(unet, dynamic=False)``
(default mode, static shapes: one compilation per batch size), done once here and shared
by every compiled loop: a second ``torch.compile`` of the same UNet would compile it all
over again (dynamo keys its cache on the compiler instance), and neither the autoencoder
nor CUDA-graph replay changes what the UNet sees.

The cases run in priority order (``gpu_cases``) within a time budget (``GpuBudget``): a
compilation cannot be interrupted, so a case that compiles a new batch size starts only
when its estimated compile time (the slowest seen so far, ``COMPILE_ESTIMATE_S`` before
the first) fits in what is left; the notes name the cases left out, and the cases that
failed (a compiler missing on the host, say) without stopping the others. Each case's
first render (compilation or graph capture) is timed on its own; then the median of the
timed renders, the device synchronised around each. The targets are the issue's: on one
H100/H200, >= 100 images/s at batch 1 and >= 200 batched, with TAESD and compilation.

Everything but the CUDA specifics runs on any device: the tests drive ``GpuBench`` on the
CPU with the tiny model. ``time_render`` is the render timing the CPU part uses too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from runtime.bench import diffusion_models as models
from runtime.bench.progress import Progress
from runtime.bench.results import Target
from runtime.bench.stage_harness import Timing, recompile_limit, release, sync, time_calls
from runtime.bench.stats import median
from stages.diffusion.prompts import PromptEmbedding
from stages.diffusion.realtime import RealtimeImg2Img

log = logging.getLogger(__name__)

STEPS, STRENGTH = 2, 0.5
"""The stage's default schedule: one UNet call at t=499 (trailing spacing)."""
AUTOENCODERS = ("VAE", "TAESD")
"""The model's own AutoencoderKL, or the tiny autoencoder in its place."""

GPU_SIZE = 512
GPU_DTYPE = torch.bfloat16
GPU_BATCHES = {False: (1, 2, 4, 8), True: (1, 8)}
GPU_BUDGET_S = {False: 240.0, True: 45.0}
"""Seconds the GPU part may take (building the model included), by ``options.quick``."""
GPU_TIMING = {False: Timing(warmup=2, min_calls=10, budget_s=2.0, max_calls=500),
              True: Timing(warmup=1, min_calls=3, budget_s=0.0, max_calls=3)}
COMPILE_ESTIMATE_S = 120.0
"""What a UNet compilation is assumed to cost until one has been measured."""
FIRST_CALL_S = 10.0
"""What a case's first render is assumed to cost when nothing compiles (a graph capture at most)."""
TIMED_MARGIN_S = 3.0
"""Allowance for a case's warm-up and its timed calls beyond the timing budget."""
RECOMPILE_LIMIT = 64
"""Dynamo's per-function limit of compiled variants, raised for the run: every batch size
adds one (graph breaks more), and past the limit torch silently runs eager."""
EAGER, GRAPHS, COMPILED, COMPILED_GRAPHS = "eager", "eager + CUDA graphs", "compiled", "compiled + CUDA graphs"
SINGLE_GOAL, BATCHED_GOAL = 100.0, 200.0
"""Images per second the issue asks of one H100/H200 with TAESD and compilation."""
NO_CUDA = ("GPU rows: not measured, no CUDA device on this machine (torch.cuda.is_available() is False); "
           "the SD-Turbo-shaped figures need a GPU host with diffusers installed.")


@dataclass(frozen=True, slots=True)
class GpuCase:
    mode: str
    autoencoder: str
    batch: int

    @property
    def compiled(self) -> bool:
        return self.mode.startswith("compiled")

    @property
    def cuda_graphs(self) -> bool:
        return self.mode.endswith("CUDA graphs")

    @property
    def label(self) -> str:
        return f"{self.mode}, {self.autoencoder}, batch {self.batch}"


def gpu_cases(quick: bool) -> list[GpuCase]:
    """The GPU cases in priority order: every eager case (cheap); what the targets need
    (TAESD compiled at batch 1 and 8: the two compilations); what reuses them (CUDA graphs,
    the VAE); CUDA graphs without compiling (after the compiled cases: a failed capture
    can spoil the CUDA context); the batch sizes that cost a compilation each. A smoke run
    compiles and captures nothing."""
    batches = GPU_BATCHES[quick]
    cases = [GpuCase(EAGER, ae, b) for ae in ("TAESD", "VAE") for b in batches]
    if quick:
        return cases
    ends, middle = (batches[0], batches[-1]), batches[1:-1]
    for mode, autoencoder in ((COMPILED, "TAESD"), (COMPILED_GRAPHS, "TAESD"), (COMPILED, "VAE"), (GRAPHS, "TAESD")):
        cases += [GpuCase(mode, autoencoder, b) for b in ends]
    return cases + [GpuCase(COMPILED, "TAESD", b) for b in middle]


def time_render(loop: RealtimeImg2Img, crops: torch.Tensor, prompts: Sequence[PromptEmbedding],
                timing: Timing) -> dict[str, Any]:
    """One row's figures for ``loop.render(crops, prompts)``: median ms per call and per image."""
    samples = time_calls(lambda args: loop.render(*args), lambda: (crops, prompts), loop.device, timing)
    ms, batch = median(samples), crops.shape[0]
    return {"batch": batch, "ms_call": ms, "ms_image": ms / batch, "images_s": 1000.0 * batch / ms,
            "calls": len(samples)}


def random_crops(batch: int, size: int, device: torch.device) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).to(device)


class GpuBudget:
    """Whether the next GPU case may start: its first call (a compilation when it compiles a
    new batch size, estimated as the slowest seen so far) and its timed calls must fit in
    what is left of ``total_s`` since the budget was made."""

    def __init__(self, total_s: float, timing: Timing, clock: Callable[[], float] = time.monotonic) -> None:
        self.total_s = total_s
        self.timing = timing
        self.clock = clock
        self.started = clock()
        self.compile_s: float | None = None
        """The slowest first call of a compiled case so far (None before one ran)."""

    def estimate_s(self, compiles: bool) -> float:
        first = (self.compile_s or COMPILE_ESTIMATE_S) if compiles else FIRST_CALL_S
        return first + self.timing.budget_s + TIMED_MARGIN_S

    def allows(self, compiles: bool) -> bool:
        """Whether a case fits, ``compiles`` saying whether its first call compiles."""
        return self.used_s() + self.estimate_s(compiles) <= self.total_s

    def record(self, compiled: bool, first_call_s: float) -> None:
        """A case's first call took ``first_call_s``; ``compiled``: it compiled."""
        if compiled:
            self.compile_s = max(self.compile_s or 0.0, first_call_s)

    def used_s(self) -> float:
        return self.clock() - self.started


class GpuBench:
    """Renders ``GpuCase``s with one UNet and its autoencoders on one device (one
    ``RealtimeImg2Img`` per mode and autoencoder, kept across batch sizes; the compiled ones
    share one compiled UNet), as the budget allows."""

    def __init__(self, unet: Any, autoencoders: dict[str, Any], device: torch.device, dtype: torch.dtype, size: int,
                 budget: GpuBudget, progress: Progress) -> None:
        self.unet, self.autoencoders = unet, autoencoders
        self.device, self.dtype, self.size = device, dtype, size
        self.budget, self.progress = budget, progress
        self.left_out: list[GpuCase] = []
        """Cases the budget had no time for."""
        self.failed: list[str] = []
        """'case: error' of the cases that raised (the traceback goes to the log)."""
        self._loops: dict[tuple[str, str], RealtimeImg2Img] = {}
        self._compiled_unet: Any = None
        self.compiled_batches: set[int] = set()
        """Batch sizes the compiled UNet has been compiled for."""

    def rows(self, cases: list[GpuCase]) -> list[dict[str, Any]]:
        rows = []
        for case in cases:
            if not self.budget.allows(self.compiles(case)):
                self.left_out.append(case)
                self.progress.step(f"diffusion: GPU {case.label}: left out (time budget)")
                continue
            self.progress.start(f"diffusion: GPU {case.label}")
            try:
                rows.append(self._row(case))
            except Exception as e:  # e.g. a compiler failure: the other cases still measure
                log.exception("diffusion GPU case %s failed", case.label)
                self.failed.append(f"{case.label}: {type(e).__name__}: {e}")
            self.progress.step()
        return rows

    def _row(self, case: GpuCase) -> dict[str, Any]:
        loop, compiles = self.loop(case), self.compiles(case)
        crops = random_crops(case.batch, self.size, self.device)
        prompts = models.random_prompts(case.batch, self.device, self.dtype, self.unet.config.cross_attention_dim)
        sync(self.device)
        started = time.perf_counter()
        loop.render(crops, prompts)  # compiles / captures for this batch size
        sync(self.device)
        first_call_s = time.perf_counter() - started
        self.budget.record(compiles, first_call_s)
        if case.compiled:
            self.compiled_batches.add(case.batch)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        row = {"what": f"SD-Turbo shapes {self.size} px, {str(self.dtype).removeprefix('torch.')}",
               "gpu_case": f"{case.mode}, {case.autoencoder}", "device": self.device.type,
               "autoencoder": case.autoencoder, "mode": case.mode,
               **time_render(loop, crops, prompts, self.budget.timing), "first_call_s": first_call_s}
        if self.device.type == "cuda":
            row["peak_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return row

    def compiles(self, case: GpuCase) -> bool:
        """Whether ``case``'s first render compiles the UNet (a compiled case at a new batch size)."""
        return case.compiled and case.batch not in self.compiled_batches

    def loop(self, case: GpuCase) -> RealtimeImg2Img:
        """The loop of ``case``'s mode and autoencoder, made on first use."""
        key = (case.mode, case.autoencoder)
        if key not in self._loops:
            unet = self.unet
            if case.compiled:
                if self._compiled_unet is None:
                    # What RealtimeImg2Img(compile=True) does; lazy: nothing compiles until the first call.
                    self._compiled_unet = torch.compile(self.unet, dynamic=False)
                unet = self._compiled_unet
            model = models.sd_turbo_model(unet, self.autoencoders[case.autoencoder], self.device, self.dtype)
            self._loops[key] = RealtimeImg2Img(model, size=self.size, steps=STEPS, strength=STRENGTH,
                                               guidance_scale=0.0, seed=0, cuda_graphs=case.cuda_graphs)
        return self._loops[key]


def gpu_part(quick: bool, progress: Progress) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The GPU rows on cuda:0 and what the notes need about them."""
    device = torch.device("cuda:0")
    budget = GpuBudget(GPU_BUDGET_S[quick], GPU_TIMING[quick])
    unet, autoencoders = models.sd_turbo_modules(device, GPU_DTYPE)
    details = {"device": torch.cuda.get_device_name(device), "build_s": budget.used_s(),
               "unet_params": models.parameter_count(unet), "budget_s": budget.total_s,
               "timing": asdict(budget.timing)}
    bench = GpuBench(unet, autoencoders, device, GPU_DTYPE, GPU_SIZE, budget, progress)
    try:
        with recompile_limit(RECOMPILE_LIMIT):
            rows = bench.rows(gpu_cases(quick))
    finally:
        details.update(used_s=budget.used_s(), compile_s=budget.compile_s,
                       left_out=[case.label for case in bench.left_out], failed=bench.failed)
        del bench, unet, autoencoders
        release(device)
    return rows, details


def gpu_targets(rows: list[dict[str, Any]], gpu: dict[str, Any] | None) -> list[Target]:
    """The issue's two throughput goals, from the best compiled TAESD row at batch 1 and above 1."""
    compiled = [r for r in rows if "gpu_case" in r and r["autoencoder"] == "TAESD" and r["mode"].startswith("compiled")]
    why = ("not measured: no CUDA device" if gpu is None
           else "not measured: no compiled TAESD case completed within the GPU time budget (see the notes)")
    targets = []
    for name, goal, wanted in (("at batch 1", SINGLE_GOAL, lambda r: r["batch"] == 1),
                               ("batched", BATCHED_GOAL, lambda r: r["batch"] > 1)):
        best = max((r for r in compiled if wanted(r)), key=lambda r: r["images_s"], default=None)
        measured = why if best is None else (f"{best['images_s']:.0f} images/s ({best['mode']}, batch {best['batch']}: "
                                             f"{best['ms_image']:.2f} ms per image; {gpu['device']})")
        targets.append(Target(name=f"SD-Turbo {GPU_SIZE} px, 1 UNet step, bf16, TAESD, compiled: images/s {name}",
                              goal=f">= {goal:.0f} images/s on one H100/H200", measured=measured,
                              met=None if best is None else best["images_s"] >= goal))
    return targets


def gpu_notes(gpu: dict[str, Any] | None) -> list[str]:
    """What a reader needs about the GPU rows, or why there are none."""
    if gpu is None:
        return [NO_CUDA]
    compile_s = "no compiled case ran" if gpu["compile_s"] is None else f"the slowest took {gpu['compile_s']:.0f} s"
    left_out = f"left out: {'; '.join(gpu['left_out'])}." if gpu["left_out"] else "every case ran."
    failed = [f"GPU cases that failed (traceback in bench.log): {'; '.join(gpu['failed'])}."] if gpu["failed"] else []
    return [(f"GPU rows: {gpu['device']}; SD-Turbo's UNet ({gpu['unet_params'] / 1e6:.1f} M parameters) and VAE "
             f"with random weights and a TAESD-shaped AutoencoderTiny, built on the GPU in {gpu['build_s']:.1f} s; "
             f"bf16, {GPU_SIZE} px, steps {STEPS} strength {STRENGTH} (one UNet call), random [77, 1024] prompt "
             "embeddings (the stage caches real ones: no frame runs the text encoder). Median of at least "
             f"{gpu['timing']['min_calls']} timed renders, the device synchronised around each."),
            ("'compiled' = the stage's torch.compile of the UNet (default mode, static shapes: one compilation per "
             "batch size, shared by every compiled case; the autoencoder stays eager); 'first call s' = a case's "
             f"first render: the compilation of a new batch size ({compile_s}) or a CUDA-graph capture."),
            f"GPU time budget {gpu['budget_s']:.0f} s, used {gpu['used_s']:.0f} s; {left_out}", *failed]
