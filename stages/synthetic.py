"""The synthetic stage: a known cost per frame, for measuring the runtime rather than a model.

It passes every frame through unchanged and spends a fixed cost on it, in one of two ways:

- ``sleep``: ``time.sleep(cost_ms)``. The thread releases the GIL and the CPU, as a stage
  does while a GPU (or a remote service) computes for it. Such stages overlap even
  inside one process, so they show what the runtime's hops and queues add.
- ``busy``: a fixed number of pure-Python loop iterations, holding the GIL. This is CPU
  work: stages in one process take turns on the GIL, stages in separate ranks run in
  parallel only when there are cores for them.

The busy cost is a fixed amount of *work*, not "spin until ``cost_ms`` has passed": a
deadline would make a starved stage look as fast as an idle one, hiding exactly the
contention (cores shared with other ranks, the GIL shared with other threads) a
benchmark must show. ``cost_ms`` is turned into iterations with ``iterations_per_ms``,
which ``calibrate()`` measures once on a quiet machine (the benchmark does this before
starting any job and passes the figure in the config), so every rank does the same work
for the same ``cost_ms``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from comms.message import Message
from core.config import check, check_choice, check_range
from stages.base import ANY, SAME, Stage
from stages.registry import register_stage

MODES = ("sleep", "busy")
MAX_COST_MS = 10_000.0


@dataclass(kw_only=True, slots=True)
class SyntheticConfig:
    mode: str = "sleep"
    """'sleep' (frees the GIL and the CPU: stands for GPU work) or 'busy' (pure-Python
    work holding the GIL: CPU work)."""
    cost_ms: float = 10.0
    """Cost per frame in milliseconds, 0..10000. For 'busy' it is turned into a fixed
    number of loop iterations (``cost_ms * iterations_per_ms``), so it is the time on
    an uncontended core; with contention a frame takes longer."""
    iterations_per_ms: float = 0.0
    """'busy' only: loop iterations one uncontended core runs per millisecond, measured by
    ``calibrate()``; 0 means not calibrated, which 'busy' refuses."""

    def __post_init__(self) -> None:
        check_choice(self.mode, "mode", MODES)
        check_range(self.cost_ms, "cost_ms", 0.0, MAX_COST_MS)
        check(self.iterations_per_ms >= 0, "iterations_per_ms", f"must be >= 0, got {self.iterations_per_ms}")
        if self.mode == "busy":
            check(self.iterations_per_ms > 0, "iterations_per_ms",
                  "mode 'busy' needs the busy loop's speed on this machine (iterations per ms, "
                  "from stages.synthetic.calibrate()); got 0")

    @property
    def iterations(self) -> int:
        """Busy-loop iterations per frame ('busy' mode)."""
        return round(self.cost_ms * self.iterations_per_ms)


def spin(iterations: int) -> int:
    """``iterations`` rounds of integer arithmetic in the interpreter, holding the GIL
    throughout (no call into C that could release it). Returns the result so the loop
    has an observable effect."""
    acc = 0
    for i in range(iterations):
        acc = (acc + i * i) % 1_000_003
    return acc


def calibrate(sample_ms: float = 10.0, rounds: int = 15) -> float:
    """Iterations of ``spin`` this process runs per millisecond on an uncontended core.

    Takes the fastest of ``rounds`` samples of about ``sample_ms`` each: anything that
    interrupts a sample (another process, a page fault) only makes it slower, so the
    fastest is the closest to the machine's real speed. Short samples, many of them:
    on a busy machine a short one is more likely to run uninterrupted.
    """
    if sample_ms <= 0 or rounds < 1:
        raise ValueError(f"calibrate needs sample_ms > 0 and rounds >= 1, got {sample_ms}, {rounds}")
    n = 10_000
    while True:  # grow the sample until it is long enough to time reliably
        seconds = _timed(n)
        if seconds * 1000.0 >= sample_ms / 4:
            break
        n *= 4
    n = max(1, round(n * sample_ms / (seconds * 1000.0)))
    best = min(_timed(n) for _ in range(rounds))
    return n / (best * 1000.0)


def _timed(iterations: int) -> float:
    start = time.perf_counter()
    spin(iterations)
    return time.perf_counter() - start


@register_stage
class SyntheticStage(Stage):
    """Takes any payload; emits it unchanged (``Message.derive`` with the same tensors and
    meta) after spending ``cost_ms`` per message of the batch, by sleeping or by a fixed
    amount of busy-loop work (see the module docstring)."""

    kind = "synthetic"
    Config = SyntheticConfig
    accepts = ANY
    emits = SAME

    def process(self, batch: list[Message]) -> list[Message]:
        if self.config.mode == "sleep":
            time.sleep(self.config.cost_ms * len(batch) / 1000.0)
        else:
            spin(self.config.iterations * len(batch))
        return [msg.derive(tensors=list(msg.tensors)) for msg in batch]
