"""The GPU part of section 'lipsync': the 328 U-Net's cost on one GPU, and how many talking
streams of distinct avatars one GPU keeps at 25 fps.

Everything runs SyncTalk_2D's ``unet_328`` architecture (``stages.lipsync.unet``, 12.19 M
parameters at full width) with random weights: timing only, a dense network costs the
same whatever its weights, and no output of it is shown or judged.

Throughput and latency (``UNetBench``): one model, batches 1, 8, 32 and 64, bf16 and fp16
(model and inputs in that dtype), in the modes and order of ``lipsync_gpu_plan``. Each
case's first call (a compilation or capture) is timed on its own, then the median and p95
of the timed calls, the device synchronised around each (host work counts). Per frame =
per call / batch; frames/s = batch / median; batch 1's median is the single-frame latency.

Concurrent streams (``StreamBench``): with A avatars resident (1, 10, 100; each its own
full set of weights on the GPU, in bf16), stream s talks through avatar s mod A, and the
server loop of ``lipsync_streams.simulate_streams`` runs each batch of queued frames as
one mixed batch through ``batching.infer``, its GPU time measured for real
(synchronised); ``lipsync_streams.stream_capacity`` searches the largest N sustained, up
to the plan's ``max_streams``. Both batching strategies (grouped by model, stacked
weights + vmap) are searched with 10 and 100 avatars; with 1 avatar they are the same
call. ``batching.compare_strategies`` is also run on the GPU (32 rows over 1, 8 and 32
models) for the direct comparison.

Everything but the CUDA specifics (graphs, compilation, half precision) runs on any
device: ``measure`` takes a ``Plan``, and the tests drive the stream logic with a fake
timing function and a tiny plan on the CPU; on a CUDA host they run a tiny plan there.
The table's columns, the targets and the notes are in ``lipsync_gpu_report``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch

from runtime.bench.lipsync_gpu_plan import (
    CASE_MARGIN_S,
    CHANNELS_LAST,
    EAGER,
    PLANS,
    Budget,
    Case,
    Plan,
    avatar_count,
    dtype_name,
)
from runtime.bench.lipsync_streams import (
    FPS,
    LATENCY_MS,
    Capacity,
    StreamRun,
    capacity_guess,
    simulate_streams,
    stream_capacity,
)
from runtime.bench.progress import Progress
from runtime.bench.stage_harness import recompile_limit, release, sync, time_calls
from runtime.bench.stats import median, percentile
from stages.lipsync import batching
from stages.lipsync.model_files import model_bytes
from stages.lipsync.unet import (
    AUDIO_CHANNELS,
    AUDIO_SIZE,
    IMAGE_CHANNELS,
    SIZE,
    LipSyncUNet,
    parameter_count,
)

log = logging.getLogger(__name__)

RANDOM_WEIGHTS = ("random weights (timing only: a dense network costs the same whatever its weights; no output "
                  "of it is shown or judged)")


def random_inputs(batch: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A batch of U-Net inputs (image [B, 6, 320, 320], audio features [B, 32, 16, 16]),
    drawn on the CPU from ``seed`` so every device and the CPU part time the same values."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, IMAGE_CHANNELS, SIZE, SIZE, generator=generator)
    audio = torch.randn(batch, AUDIO_CHANNELS, AUDIO_SIZE, AUDIO_SIZE, generator=generator)
    return x.to(device, dtype), audio.to(device, dtype)


def random_unet(width: float, device: torch.device, dtype: torch.dtype, seed: int) -> LipSyncUNet:
    """A random-weight U-Net built on ``device`` (fast on a GPU: no CPU init, no copy)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = LipSyncUNet(width=width)
    return model.to(dtype).eval().requires_grad_(False)


class UNetBench:
    """Times ``Case``s with one model per dtype (and layout) on one device, made on first use."""

    def __init__(self, plan: Plan, device: torch.device, budget: Budget, progress: Progress) -> None:
        self.plan, self.device, self.budget, self.progress = plan, device, budget, progress
        self.left_out: list[str] = []
        self.failed: list[str] = []
        self._models: dict[tuple[torch.dtype, bool], LipSyncUNet] = {}
        self._compiled: dict[torch.dtype, Any] = {}
        self._compiled_batches: set[tuple[torch.dtype, int]] = set()
        self._graphed: dict[tuple[torch.dtype, str], Any] = {}

    def rows(self, cases: Sequence[Case]) -> list[dict[str, Any]]:
        rows = []
        for case in cases:
            compiles = self.compiles(case)
            if not self.budget.allows(self.budget.case_estimate_s(compiles, self.plan.timing)):
                self.left_out.append(case.label)
                self.progress.step(f"lipsync: GPU {case.label}: left out (time budget)")
                continue
            self.progress.start(f"lipsync: GPU {case.label}")
            try:
                rows.append(self._row(case, compiles))
            except Exception as e:  # a compiler missing on the host, say: the other cases still measure
                log.exception("lipsync GPU case %s failed", case.label)
                self.failed.append(f"{case.label}: {type(e).__name__}: {e}")
            self.progress.step()
        return rows

    def close(self) -> None:
        """Drop the models, compiled modules and graphs (their memory goes back on ``release``)."""
        self._models.clear()
        self._compiled.clear()
        self._graphed.clear()

    def compiles(self, case: Case) -> bool:
        return case.compiled and (case.dtype, case.batch) not in self._compiled_batches

    def _row(self, case: Case, compiles: bool) -> dict[str, Any]:
        call = self.callable(case)
        x, audio = random_inputs(case.batch, self.device, case.dtype)
        if case.mode == CHANNELS_LAST:
            x, audio = (t.contiguous(memory_format=torch.channels_last) for t in (x, audio))
        with torch.inference_mode():
            sync(self.device)
            started = time.perf_counter()
            call(x, audio)  # compiles / captures this batch size
            sync(self.device)
            first_call_s = time.perf_counter() - started
            if compiles:
                self.budget.record_compile(first_call_s)
            if case.compiled:
                self._compiled_batches.add((case.dtype, case.batch))
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            samples = time_calls(lambda args: call(*args), lambda: (x, audio), self.device, self.plan.timing)
        ms = median(samples)
        row = {"what": f"U-Net 328, width {self.plan.width:g}, {RANDOM_WEIGHTS.split(' (')[0]}",
               "case": f"{dtype_name(case.dtype)}, {case.mode}", "gpu_case": f"{dtype_name(case.dtype)}, {case.mode}",
               "dtype": dtype_name(case.dtype), "mode": case.mode,
               "batch": case.batch, "ms_batch": ms, "ms_batch_p95": percentile(samples, 95),
               "ms_frame": ms / case.batch,
               "fps": 1000.0 * case.batch / ms, "first_call_s": first_call_s, "calls": len(samples),
               "device": self.device.type}
        if self.device.type == "cuda":
            row["peak_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return row

    def model(self, dtype: torch.dtype, channels_last: bool = False) -> LipSyncUNet:
        key = (dtype, channels_last)
        if key not in self._models:
            model = random_unet(self.plan.width, self.device, dtype, seed=0)
            self._models[key] = model.to(memory_format=torch.channels_last) if channels_last else model
        return self._models[key]

    def callable(self, case: Case) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """What a case calls: the model, compiled or not, replayed from CUDA graphs or not."""
        if case.mode in (EAGER, CHANNELS_LAST):
            return self.model(case.dtype, channels_last=case.mode == CHANNELS_LAST)
        fn: Callable[..., torch.Tensor] = self.model(case.dtype)
        if case.compiled:
            if case.dtype not in self._compiled:
                # Lazy: nothing compiles until the first call; one compiled module per dtype,
                # recompiled per batch size (static shapes) and shared with the graph mode.
                self._compiled[case.dtype] = torch.compile(self.model(case.dtype), dynamic=False)
            fn = self._compiled[case.dtype]
        if case.graphs:
            from stages.diffusion.cuda_graph import CudaGraphed  # CUDA only

            key = (case.dtype, case.mode)
            if key not in self._graphed:
                self._graphed[key] = CudaGraphed(fn)
            fn = self._graphed[key]
        return fn


class StreamBench:
    """Capacity searches with ``avatars`` distinct random-weight models on one device."""

    def __init__(self, plan: Plan, device: torch.device, progress: Progress) -> None:
        self.plan, self.device, self.progress = plan, device, progress
        self.models: list[LipSyncUNet] = []
        self.x, self.audio = random_inputs(plan.max_batch, device, plan.stream_dtype)

    def ensure_avatars(self, avatars: int) -> None:
        while len(self.models) < avatars:  # each avatar its own weights, resident on the device
            self.models.append(random_unet(self.plan.width, self.device, self.plan.stream_dtype,
                                           seed=1000 + len(self.models)))

    def serve(self, avatars: int, strategy: str) -> Callable[[list[int]], float]:
        models = self.models[:avatars]

        def serve(streams: list[int]) -> float:
            b = len(streams)
            x, audio = self.x[:b], self.audio[:b]
            sync(self.device)
            started = time.perf_counter()
            with torch.inference_mode():
                batching.infer([models[s % avatars] for s in streams], x, audio, strategy=strategy)
            sync(self.device)
            return (time.perf_counter() - started) * 1000.0
        return serve

    def capacity(self, avatars: int, strategy: str) -> Capacity:
        self.ensure_avatars(avatars)
        serve = self.serve(avatars, strategy)
        max_batch = self.plan.max_batch
        # Warm-up, so that no probe pays a one-off cost (the allocator, kernels loaded on
        # first use, cuDNN's choices per shape, the stacked skeleton) and fails for it;
        # the second round's times give the search its starting guess.
        sizes = sorted({min(2**i, max_batch) for i in range(max_batch.bit_length() + 1)})
        batch_ms: dict[int, float] = {}
        for _ in range(2):
            batch_ms = {b: serve(list(range(b))) for b in sizes}

        def probe(n: int) -> StreamRun:
            return simulate_streams(n, serve, duration_s=self.plan.duration_s, max_batch=max_batch)
        return stream_capacity(probe, limit=self.plan.max_streams, start=capacity_guess(batch_ms),
                               deadline=time.monotonic() + self.plan.search_s)

    def rows(self, budget: Budget) -> tuple[list[dict[str, Any]], list[str]]:
        rows, left_out = [], []
        for avatars, strategy in self.plan.stream_searches():
            label = f"{avatar_count(avatars)}, {strategy}"
            if not budget.allows(self.plan.search_s + CASE_MARGIN_S):
                left_out.append(f"streams, {label}")
                self.progress.step(f"lipsync: GPU streams, {label}: left out (time budget)")
                continue
            self.progress.start(f"lipsync: GPU streams, {label}")
            capacity = self.capacity(avatars, strategy)
            rows.append(stream_row(avatars, strategy, capacity, self.plan))
            self.progress.step()
        return rows, left_out


def stream_row(avatars: int, strategy: str, capacity: Capacity, plan: Plan) -> dict[str, Any]:
    best = capacity.best
    return {"what": f"concurrent {FPS:g} fps streams, p95 <= {LATENCY_MS:g} ms",
            "case": f"{avatar_count(avatars)}, {strategy}", "avatars": avatars, "strategy": strategy,
            "dtype": dtype_name(plan.stream_dtype), "streams": capacity.streams,
            "streams_text": f"{'>= ' if capacity.at_limit else ''}{capacity.streams}"
                            f"{' (search cut short)' if capacity.cut_short else ''}",
            "at_limit": capacity.at_limit, "cut_short": capacity.cut_short,
            "distinct_avatars": min(avatars, capacity.streams),
            "p50_latency_ms": best.p50_ms if best else math.nan, "p95_latency_ms": best.p95_ms if best else math.nan,
            "mean_batch": best.mean_batch if best else math.nan, "busy": best.busy if best else math.nan,
            "stream_case": f"{avatar_count(avatars)}, {strategy}", "frames_s": capacity.streams * FPS,
            "probes": [asdict(p) for p in capacity.probes]}


def measure(plan: Plan, device: torch.device, progress: Progress) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of ``plan`` on ``device`` and the details the notes need."""
    budget = Budget(plan.budget_s)
    details: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                               "width": plan.width, "budget_s": plan.budget_s, "timing": asdict(plan.timing),
                               "duration_s": plan.duration_s, "max_streams": plan.max_streams,
                               "max_batch": plan.max_batch, "compare_repeats": plan.compare_repeats}
    with torch.device("meta"):
        details["params"] = parameter_count(LipSyncUNet(width=plan.width))
    bench = UNetBench(plan, device, budget, progress)
    cases = plan.cases()
    eager = [c for c in cases if not c.compiled]
    rows = bench.rows(eager)
    eager_left_out, eager_failed = bench.left_out, bench.failed
    bench.close()  # the stream part builds its own models
    release(device)
    streams = StreamBench(plan, device, progress)
    stream_rows, left_out = streams.rows(budget)
    details["avatar_mib"] = model_bytes(streams.models[0]) / 2**20 if streams.models else math.nan
    details["compare"] = []
    if budget.allows(CASE_MARGIN_S * 2):
        progress.start("lipsync: GPU batching strategies")
        details["compare"] = batching.compare_strategies(
            width=plan.width, rows=plan.compare_rows, model_counts=plan.compare_models, device=device,
            dtype=plan.stream_dtype, repeats=plan.compare_repeats, warmup=plan.compare_warmup)
    else:
        left_out.append("batching strategy comparison")
    progress.step()
    del streams
    release(device)
    bench = UNetBench(plan, device, budget, progress)
    with recompile_limit(64):
        rows += bench.rows([c for c in cases if c.compiled])
    details.update(used_s=budget.used_s(), compile_s=budget.compile_s, stream_dtype=dtype_name(plan.stream_dtype),
                   left_out=eager_left_out + left_out + bench.left_out, failed=eager_failed + bench.failed)
    bench.close()
    release(device)
    return rows + stream_rows, details


def gpu_steps(quick: bool) -> int:
    """Progress steps of ``gpu_part`` (one without CUDA: the skip)."""
    if not torch.cuda.is_available():
        return 1
    plan = PLANS[quick]
    return len(plan.cases()) + len(plan.stream_searches()) + 1


def gpu_part(quick: bool, progress: Progress, plan: Plan | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The GPU rows on cuda:0 (``PLANS[quick]`` unless ``plan``) and their details."""
    return measure(plan or PLANS[quick], torch.device("cuda:0"), progress)
