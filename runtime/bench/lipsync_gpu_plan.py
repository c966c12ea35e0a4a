"""What the lip-sync GPU part runs, in what order, and within what time.

A ``Plan`` lists the throughput ``Case``s (one model, a dtype, a mode, a batch size) and
the stream capacity searches, in priority order: eager cases first (cheap), then the cheap
modes beyond eager, then the cases that compile, since compilations are the expensive part
(tens of seconds each, uninterruptible). ``PLANS`` holds the full part (about 3 minutes on
an H200) and the smoke run; ``tiny_plan`` one small enough for a test on any device.

The modes:

    eager                  plain forward
    eager, channels_last   the model and inputs in NHWC (bf16 only): cuDNN's preferred layout
    eager + CUDA graph     the eager forward captured once per batch size and replayed
                           (``stages.diffusion.cuda_graph.CudaGraphed``): no launch overhead
    compiled               ``torch.compile(model, dynamic=False)``: one compilation per batch size
    compiled + CUDA graph  the compiled forward captured the same way

``Budget`` decides whether the next piece of work still fits: a compiled case starts only
while the time left has room for one compilation (the slowest seen so far, or an estimate
before the first); the notes name what was left out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from runtime.bench.lipsync_streams import MAX_BATCH
from runtime.bench.stage_harness import Timing
from stages.lipsync import batching

EAGER, CHANNELS_LAST, GRAPHS = "eager", "eager, channels_last", "eager + CUDA graph"
COMPILED, COMPILED_GRAPHS = "compiled", "compiled + CUDA graph"
MODES = (EAGER, CHANNELS_LAST, GRAPHS, COMPILED, COMPILED_GRAPHS)

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
