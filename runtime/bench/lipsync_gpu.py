"""The GPU part of section 'lipsync': the 328 U-Net's cost on one GPU, and how many talking
streams of distinct avatars one GPU keeps at 25 fps.

Everything runs SyncTalk_2D's ``unet_328`` architecture (``stages.lipsync.unet``, 12.19 M
parameters at full width) with random weights: timing only, a dense network costs the
same whatever its weights, and no output of it is shown or judged.

Throughput and latency (``Case``): one model, batches 1, 8, 32 and 64, bf16 and fp16
(model and inputs in that dtype), in these modes:

    eager                  plain forward
    eager, channels_last   the model and inputs in NHWC (bf16 only): cuDNN's preferred layout
    eager + CUDA graph     the eager forward captured once per batch size and replayed
                           (``stages.diffusion.cuda_graph.CudaGraphed``): no launch overhead
    compiled               ``torch.compile(model, dynamic=False)``: one compilation per batch size
    compiled + CUDA graph  the compiled forward captured the same way

Each case's first call (a compilation or capture) is timed on its own, then the median and
p95 of the timed calls, the device synchronised around each (host work counts). Per frame =
per call / batch; frames/s = batch / median; batch 1's median is the single-frame latency.
Compilations are the expensive part (tens of seconds each, uninterruptible), so compiled
cases come last, in priority order, and start only while the time budget has room for
one (``Budget``); the notes name what was left out.

Concurrent streams (``simulate_streams``, ``stream_capacity``): with A avatars resident
(1, 10, 100; each its own full set of weights on the GPU, in bf16), N streams talk at
25 fps, stream s through avatar s mod A, their frames arriving evenly staggered (stream s
at (s/N + k) x 40 ms). One server loop, as a lip-sync rank runs it: whenever the GPU is
free it takes every queued frame (at most ``MAX_BATCH``, oldest first) and runs them as
one mixed batch through ``batching.infer``; the GPU time of each batch is measured for
real (synchronised), the clock between batches is simulated (it jumps to the next
arrival when nothing is queued), so a probe costs the GPU time it describes and no
sleeping. A frame's latency = its batch's end - its arrival. N streams are *sustained*
when the p95 latency of the frames arriving after the first quarter of the run (the
steady state) is <= 40 ms, one frame interval: the frames keep the 25 fps pace with a
bounded delay (a backlog that grows shows up as latency that grows, and the run serves
every frame it admitted). A probe stops early once a frame waits over ``ABORT_MS``.
The capacity is the largest sustained N, found by doubling from 1 and then bisecting (to
``RESOLUTION`` of N), up to ``MAX_STREAMS``. Both batching strategies (grouped by model,
stacked weights + vmap) are searched with 10 and 100 avatars; with 1 avatar they are the
same call. ``batching.compare_strategies`` is also run on the GPU (32 rows over 1, 8 and
32 models) for the direct comparison.

The targets printed beside the figures are the issue's: <= 5 ms single-frame latency,
>= 2,000 frames/s batched, >= 60 concurrent 25 fps streams with distinct avatars on one
GPU; the issue's anchors for scale: 15-18 ms per frame and 58 FPS per process, 1,100-1,200
FPS with 20 processes on an RTX 6000 Ada.

Everything but the CUDA specifics (graphs, compilation, half precision) runs on any
device: ``measure`` takes a ``Plan``, and the tests drive the stream logic with a fake
timing function and a tiny plan on the CPU; on a CUDA host they run a tiny plan there.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from runtime.bench.options import BenchOptions
from runtime.bench.progress import Progress
from runtime.bench.results import Column, PlotSpec, SectionResult, Target
from runtime.bench.stage_harness import Timing, release, sync, time_calls
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

TITLE = "Lip-sync U-Net on the GPU: latency, throughput, concurrent streams"
NO_CUDA = ("GPU rows: not measured, no CUDA device on this machine (torch.cuda.is_available() is False); "
           "the lip-sync U-Net's GPU figures need a GPU host.")
RANDOM_WEIGHTS = ("random weights (timing only: a dense network costs the same whatever its weights; no output "
                  "of it is shown or judged)")

EAGER, CHANNELS_LAST, GRAPHS = "eager", "eager, channels_last", "eager + CUDA graph"
COMPILED, COMPILED_GRAPHS = "compiled", "compiled + CUDA graph"
MODES = (EAGER, CHANNELS_LAST, GRAPHS, COMPILED, COMPILED_GRAPHS)

FPS = 25.0
FRAME_MS = 1000.0 / FPS
LATENCY_MS = FRAME_MS
"""A stream is sustained while the p95 latency of its frames stays within one frame interval."""
ABORT_MS = 10 * LATENCY_MS
"""A probe stops as soon as one frame waits this long: it cannot be sustained."""
MAX_BATCH = 128
"""Most frames the server loop puts in one batch (the largest it would hand the GPU)."""
RESOLUTION = 0.05
"""The capacity search stops when it knows the answer to 5 % of N (or to 1 stream)."""

SINGLE_FRAME_GOAL_MS = 5.0
BATCHED_GOAL_FPS = 2000.0
STREAMS_GOAL = 60
ANCHOR = ("the issue's anchors: 15-18 ms per frame and 58 FPS per process, 1,100-1,200 FPS with 20 processes, "
          "on an RTX 6000 Ada")

COMPILE_ESTIMATE_S = 60.0
"""What a compilation is assumed to cost until one has been measured."""
CASE_MARGIN_S = 3.0
"""Allowance for a case's warm-up, first call and timed calls beyond the timing budget."""
STREAM_SEARCH_S = {False: 12.0, True: 4.0}
"""Wall seconds one capacity search may take (it reports what it found when cut short)."""


@dataclass(frozen=True, slots=True)
class Case:
    dtype: torch.dtype
    mode: str
    batch: int

    @property
    def compiled(self) -> bool:
        return self.mode.startswith("compiled")

    @property
    def graphs(self) -> bool:
        return self.mode.endswith("CUDA graph")

    @property
    def label(self) -> str:
        return f"{dtype_name(self.dtype)}, {self.mode}, batch {self.batch}"


@dataclass(frozen=True, slots=True)
class Plan:
    """What ``measure`` runs, in priority order within ``budget_s``."""

    width: float = 1.0
    dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
    batches: tuple[int, ...] = (1, 8, 32, 64)
    extra_modes: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...] = (
        (CHANNELS_LAST, torch.bfloat16, (1, 8, 32, 64)), (GRAPHS, torch.bfloat16, (1, 64)))
    """Cheap modes beyond eager: (mode, dtype, batches)."""
    compiled: tuple[Case, ...] = (
        Case(torch.bfloat16, COMPILED, 1), Case(torch.bfloat16, COMPILED_GRAPHS, 1),
        Case(torch.bfloat16, COMPILED, 64), Case(torch.bfloat16, COMPILED_GRAPHS, 64),
        Case(torch.float16, COMPILED, 1), Case(torch.float16, COMPILED, 64))
    """Cases that compile, in priority order (the budget may leave the last ones out)."""
    avatar_counts: tuple[int, ...] = (1, 10, 100)
    stream_dtype: torch.dtype = torch.bfloat16
    stream_strategies: tuple[str, ...] = batching.STRATEGIES
    """Strategies searched with more than one avatar (one avatar: the default only)."""
    duration_s: float = 1.2
    """Simulated seconds of arrivals per stream probe (30 frames per stream at 25 fps)."""
    max_streams: int = 512
    max_batch: int = MAX_BATCH
    """Most frames per batch in the stream loop (also the size of the input pool)."""
    search_s: float = STREAM_SEARCH_S[False]
    compare_rows: int = 32
    compare_models: tuple[int, ...] = (1, 8, 32)
    compare_repeats: int = 3
    compare_warmup: int = 1
    budget_s: float = 160.0
    """Seconds the GPU part may take before it starts no more work (a compilation under way
    runs to its end: the ~3 minutes of the whole part leave room for one)."""
    timing: Timing = field(default_factory=lambda: Timing(warmup=3, min_calls=10, budget_s=0.5, max_calls=300))

    def cases(self) -> list[Case]:
        """Every throughput case, in the order they run: eager, the cheap modes, compiled."""
        cases = [Case(dtype, EAGER, b) for dtype in self.dtypes for b in self.batches]
        cases += [Case(dtype, mode, b) for mode, dtype, batches in self.extra_modes for b in batches]
        return cases + list(self.compiled)

    def stream_searches(self) -> list[tuple[int, str]]:
        """(avatars, strategy) of each capacity search, in the order they run."""
        searches = []
        for avatars in self.avatar_counts:
            strategies = self.stream_strategies if avatars > 1 else (batching.DEFAULT_STRATEGY,)
            searches += [(avatars, s) for s in strategies]
        return searches


PLANS = {
    False: Plan(),
    True: Plan(batches=(1, 8), extra_modes=(), compiled=(), avatar_counts=(1, 10), duration_s=0.8,
               max_streams=256, search_s=STREAM_SEARCH_S[True], compare_rows=8, compare_models=(1, 8), budget_s=40.0,
               timing=Timing(warmup=1, min_calls=3, budget_s=0.0, max_calls=3)),
}
"""By ``options.quick``: the full GPU part (about 3 minutes on an H200), or a smoke run."""


def tiny_plan(device: torch.device) -> Plan:
    """A half-width plan small enough for a test on ``device`` (no compilation; CUDA graphs
    and half precision on CUDA only)."""
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    return Plan(width=0.5, dtypes=(dtype,), batches=(1, 2), extra_modes=((GRAPHS, dtype, (2,)),) if cuda else (),
                compiled=(), avatar_counts=(1, 2), stream_dtype=dtype, duration_s=0.2, max_streams=8, max_batch=2,
                search_s=5.0, compare_rows=2, compare_models=(2,), compare_repeats=1, compare_warmup=0, budget_s=60.0,
                timing=Timing(warmup=0, min_calls=1, budget_s=0.0, max_calls=1))


def avatar_count(avatars: int) -> str:
    return f"{avatars} avatar{'' if avatars == 1 else 's'}"


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


# ------------------------------------------------------------------ streams (pure)

@dataclass(frozen=True, slots=True)
class StreamRun:
    """One probe: ``streams`` streams at ``FPS`` for the simulated duration."""

    streams: int
    frames: int
    """Frames whose latency counts (arrived after the first quarter)."""
    p50_ms: float
    p95_ms: float
    max_ms: float
    batches: int
    mean_batch: float
    busy: float
    """Share of the simulated time the GPU worked."""
    aborted: bool
    """Stopped early: a frame waited over ``ABORT_MS``."""
    latency_ms: float = LATENCY_MS

    @property
    def sustained(self) -> bool:
        return not self.aborted and self.frames > 0 and self.p95_ms <= self.latency_ms


def simulate_streams(streams: int, serve: Callable[[list[int]], float], *, duration_s: float, fps: float = FPS,
                     max_batch: int = MAX_BATCH, latency_ms: float = LATENCY_MS, abort_ms: float = ABORT_MS,
                     settle: float = 0.25) -> StreamRun:
    """Run ``streams`` streams through a greedy batching loop; ``serve(stream ids)`` does
    one batch (one entry per frame, the frame's stream) and returns its milliseconds.

    Frames of stream s arrive at (s / streams + k) / fps seconds, k = 0, 1, ... for
    ``duration_s``. Whenever the server is free it takes every arrived frame (oldest
    first, at most ``max_batch``); when none has arrived the clock jumps to the next
    arrival. Latencies of frames arriving after ``settle`` of the run are summarised.
    """
    if streams < 1 or duration_s <= 0 or fps <= 0 or max_batch < 1:
        raise ValueError("simulate_streams: need streams >= 1, duration_s > 0, fps > 0, max_batch >= 1")
    period_ms = 1000.0 / fps
    per_stream = max(1, math.ceil(duration_s * fps))
    arrivals = sorted(((s / streams + k) * period_ms, s) for k in range(per_stream) for s in range(streams))
    settle_ms = settle * per_stream * period_ms
    latencies: list[float] = []
    now, busy, served, batches, aborted, next_up = 0.0, 0.0, 0, 0, False, 0
    while next_up < len(arrivals):
        now = max(now, arrivals[next_up][0])  # idle until the oldest waiting frame has arrived
        end = next_up
        while end < len(arrivals) and end - next_up < max_batch and arrivals[end][0] <= now:
            end += 1
        batch = arrivals[next_up:end]
        ms = float(serve([s for _, s in batch]))
        now += ms
        busy += ms
        batches += 1
        served += len(batch)
        next_up = end
        waited = [now - t for t, _ in batch]
        latencies += [w for (t, _), w in zip(batch, waited) if t >= settle_ms]
        if max(waited) > abort_ms:
            aborted = True
            break
    return StreamRun(streams=streams, frames=len(latencies), p50_ms=percentile(latencies, 50),
                     p95_ms=percentile(latencies, 95), max_ms=max(latencies, default=math.nan), batches=batches,
                     mean_batch=served / max(batches, 1), busy=busy / max(now, 1e-9), aborted=aborted,
                     latency_ms=latency_ms)


@dataclass(frozen=True, slots=True)
class Capacity:
    streams: int
    """The largest N found sustained (0: not even one stream)."""
    at_limit: bool
    """N reached the search's ``limit``: the GPU may sustain more."""
    cut_short: bool
    """The search ran out of time before it had bisected to its resolution."""
    probes: list[StreamRun]

    @property
    def best(self) -> StreamRun | None:
        """The probe at ``streams`` (None when nothing was sustained)."""
        return next((p for p in self.probes if p.streams == self.streams and p.sustained), None)


def stream_capacity(probe: Callable[[int], StreamRun], *, limit: int, start: int = 1, resolution: float = RESOLUTION,
                    deadline: float = math.inf, clock: Callable[[], float] = time.monotonic) -> Capacity:
    """The largest N <= ``limit`` with ``probe(N).sustained``: from ``start`` (a guess),
    doubling while probes pass or halving while they fail until one of each brackets the
    answer, then bisecting until the gap is within ``resolution`` of N (at least 1).
    Assumes more streams never help; stops at ``deadline`` (``clock`` time) with the best
    found so far."""
    probes: list[StreamRun] = []
    good, bad = 0, None  # largest N sustained, smallest N not sustained, so far

    def sustained(n: int) -> bool:
        run = probe(n)
        probes.append(run)
        return run.sustained

    def out_of_time() -> bool:
        return clock() > deadline

    n = min(max(start, 1), limit)
    if out_of_time():
        return Capacity(streams=0, at_limit=False, cut_short=True, probes=probes)
    if sustained(n):
        good = n
        while good < limit and bad is None and not out_of_time():
            n = min(2 * good, limit)
            if sustained(n):
                good = n
            else:
                bad = n
    else:
        bad = n
        while bad > 1 and good == 0 and not out_of_time():
            n = bad // 2
            if sustained(n):
                good = n
            else:
                bad = n
    while bad is not None and bad - good > max(1, math.floor(good * resolution)) and not out_of_time():
        middle = (good + bad) // 2
        if sustained(middle):
            good = middle
        else:
            bad = middle
    settled = good == limit or (bad is not None and bad - good <= max(1, math.floor(good * resolution)))
    return Capacity(streams=good, at_limit=good == limit, cut_short=not settled, probes=probes)


def capacity_guess(batch_ms: dict[int, float], *, fps: float = FPS, latency_ms: float = LATENCY_MS) -> int:
    """Where to start the search, from one batch's milliseconds at several sizes: the
    streams the best batch size could feed (batch / its time, in frames per stream
    interval) among those short enough for a frame to wait one batch and ride the next
    within ``latency_ms``; at least 1."""
    feeds = [b * 1000.0 / (ms * fps) for b, ms in batch_ms.items() if 0 < ms <= latency_ms / 2]
    return max(1, math.floor(max(feeds, default=1.0)))


# ------------------------------------------------------------------ budget

class Budget:
    """Whether the next piece of work fits in what is left of ``total_s``; compilations
    are estimated by the slowest seen so far (``COMPILE_ESTIMATE_S`` before the first)."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.total_s, self.clock, self.started = total_s, clock, clock()
        self.compile_s: float | None = None

    def used_s(self) -> float:
        return self.clock() - self.started

    def left_s(self) -> float:
        return self.total_s - self.used_s()

    def allows(self, estimate_s: float) -> bool:
        return estimate_s <= self.left_s()

    def case_estimate_s(self, compiles: bool, timing: Timing) -> float:
        first = (self.compile_s or COMPILE_ESTIMATE_S) if compiles else 0.0
        return first + timing.budget_s + CASE_MARGIN_S

    def record_compile(self, seconds: float) -> None:
        self.compile_s = max(self.compile_s or 0.0, seconds)


# ------------------------------------------------------------------ measuring

def random_inputs(batch: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
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


@contextlib.contextmanager
def recompile_limit(limit: int) -> Iterator[None]:
    """Dynamo's recompile limit raised to at least ``limit`` while the block runs (each
    batch size and dtype is one compiled variant; past the limit torch silently runs eager)."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    saved = getattr(config, name)
    setattr(config, name, max(saved, limit))
    try:
        yield
    finally:
        setattr(config, name, saved)


# ------------------------------------------------------------------ report

COLUMNS = [
    Column(key="what", header="what"),
    Column(key="case", header="case"),
    Column(key="batch", header="batch"),
    Column(key="ms_batch", header="ms per batch", fmt="{:.2f}"),
    Column(key="ms_batch_p95", header="p95 ms per batch", fmt="{:.2f}"),
    Column(key="ms_frame", header="ms per frame", fmt="{:.3f}"),
    Column(key="fps", header="frames/s", fmt="{:.0f}"),
    Column(key="first_call_s", header="first call s", fmt="{:.1f}"),
    Column(key="peak_mib", header="GPU peak MiB", fmt="{:.0f}"),
    Column(key="streams_text", header="streams sustained"),
    Column(key="p95_latency_ms", header="p95 latency ms", fmt="{:.1f}"),
    Column(key="mean_batch", header="mean batch", fmt="{:.1f}"),
]
PLOTS = [
    PlotSpec(file="lipsync_gpu_fps.png", title="Lip-sync U-Net 328 on the GPU: frames per second", x="gpu_case",
             y="fps", series="batch", ylabel="frames/s"),
    PlotSpec(file="lipsync_gpu_streams.png", title=f"Concurrent {FPS:g} fps streams one GPU sustains",
             x="stream_case", y="streams", ylabel="streams"),
]
"""Throughput rows carry 'gpu_case' and 'fps', stream rows 'stream_case' and 'streams': each row is in one chart."""


def gpu_targets(rows: list[dict[str, Any]], gpu: dict[str, Any] | None) -> list[Target]:
    """The issue's three goals, from the best full-width rows (any dtype or mode)."""
    why = "not measured: no CUDA device" if gpu is None else "not measured (see the notes)"
    timed = [r for r in rows if "ms_batch" in r]
    single = min((r for r in timed if r["batch"] == 1), key=lambda r: r["ms_batch"], default=None)
    batched = max((r for r in timed if r["batch"] > 1), key=lambda r: r["fps"], default=None)
    many = [r for r in rows if "streams" in r and r["avatars"] >= STREAMS_GOAL]
    streams = max(many, key=lambda r: r["streams"], default=None)
    device = f"; {gpu['device']}" if gpu else ""
    return [
        Target(name="lip-sync U-Net 328: single-frame latency (batch 1)",
               goal=f"<= {SINGLE_FRAME_GOAL_MS:g} ms (anchor: {ANCHOR})",
               measured=why if single is None else f"{single['ms_batch']:.2f} ms ({single['case']}{device})",
               met=None if single is None else single["ms_batch"] <= SINGLE_FRAME_GOAL_MS),
        Target(name="lip-sync U-Net 328: frames/s batched",
               goal=f">= {BATCHED_GOAL_FPS:,.0f} frames/s (anchor: {ANCHOR})",
               measured=why if batched is None else (f"{batched['fps']:,.0f} frames/s ({batched['case']}, batch "
                                                     f"{batched['batch']}{device})"),
               met=None if batched is None else batched["fps"] >= BATCHED_GOAL_FPS),
        Target(name=f"concurrent {FPS:g} fps streams with distinct avatars on one GPU (p95 latency <= "
                    f"{LATENCY_MS:g} ms)",
               goal=f">= {STREAMS_GOAL} streams",
               measured=why if streams is None else (f"{streams['streams_text']} streams ({streams['case']}; "
                                                     f"{streams['distinct_avatars']} distinct avatars{device})"),
               met=None if streams is None else streams["streams"] >= STREAMS_GOAL),
    ]


def gpu_notes(gpu: dict[str, Any] | None) -> list[str]:
    """What a reader needs about the GPU rows, or why there are none."""
    if gpu is None:
        return [NO_CUDA]
    compile_s = "no compiled case ran" if gpu["compile_s"] is None else f"the slowest took {gpu['compile_s']:.0f} s"
    left_out = f"left out: {'; '.join(gpu['left_out'])}." if gpu["left_out"] else "every case ran."
    notes = [
        (f"GPU rows: {gpu['device']}; SyncTalk_2D's unet_328 ('ave'), width {gpu['width']:g} "
         f"({gpu['params'] / 1e6:.2f} M parameters), {RANDOM_WEIGHTS}. Inputs [B, 6, 320, 320] and [B, 32, 16, 16] "
         "in the model's dtype. Median of the timed calls (at least "
         f"{gpu['timing']['min_calls']}), the device synchronised around each; ms per frame = ms per batch / batch; "
         "batch 1's ms per batch is the single-frame latency."),
        ("Modes: 'compiled' = torch.compile(model, dynamic=False), one compilation per batch size ('first call s', "
         f"{compile_s}); 'CUDA graph' = the forward captured once per batch size and replayed; 'channels_last' = "
         "model and inputs in NHWC."),
        (f"Streams: N streams at {FPS:g} fps, stream s through avatar s mod A (A avatars resident, each its own "
         f"random weights in {gpu.get('stream_dtype', 'bf16')}, {gpu.get('avatar_mib', math.nan):.0f} MiB each), "
         "frames evenly staggered; a server loop takes every queued frame (at most "
         f"{gpu.get('max_batch', MAX_BATCH)}) whenever the GPU is free and runs them as one mixed batch through "
         "batching.infer with the named strategy, its GPU time measured for real. Sustained = p95 latency (arrival "
         f"to batch end) of the steady-state frames <= {LATENCY_MS:g} ms over {gpu['duration_s']:g} s of arrivals; "
         "capacity = the largest sustained N (from a guess made of the warm-up batches' times, doubling or halving, "
         f"then bisecting to {RESOLUTION:.0%}), searched up to {gpu['max_streams']}. With N > A streams share "
         "avatars; 'distinct avatars' in the target says how many were in use."),
        f"GPU time budget {gpu['budget_s']:.0f} s, used {gpu['used_s']:.0f} s; {left_out}",
    ]
    if gpu.get("compare"):
        figures = "; ".join(f"{c['rows']} rows over {c['models']} model(s): grouped {c['grouped_ms']:.1f} ms, "
                            f"stacked {c['stacked_ms']:.1f} ms" for c in gpu["compare"])
        notes.append(f"Batching strategies (batching.compare_strategies, best of {gpu['compare_repeats']}, "
                     f"{gpu['stream_dtype']}): {figures}. Default strategy: "
                     f"{batching.DEFAULT_STRATEGY}.")
    if gpu["failed"]:
        notes.append(f"GPU cases that failed (traceback in bench.log): {'; '.join(gpu['failed'])}.")
    return notes


def gpu_section(options: BenchOptions, progress: Progress) -> SectionResult:
    """The GPU part as a section result on its own (skipped at once without CUDA), for a
    section that wants it whole; ``gpu_part``/``gpu_targets``/``gpu_notes`` for one that
    merges it with CPU rows."""
    if not torch.cuda.is_available():
        progress.step("lipsync: GPU part skipped, no CUDA device")
        return SectionResult(name="lipsync", title=TITLE, skipped=NO_CUDA)
    rows, gpu = gpu_part(options.quick, progress)
    notes = gpu_notes(gpu)
    if options.quick:
        notes.append("Quick run: smaller batches and searches, no compilation; these figures are not for quoting.")
    return SectionResult(name="lipsync", title=TITLE, columns=COLUMNS, rows=rows, targets=gpu_targets(rows, gpu),
                         notes=notes, plots=PLOTS, details={"gpu": gpu})

