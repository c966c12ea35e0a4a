"""Section 'synthetic': how close the runtime gets to the ideal on stages of known cost.

Each chain is ingest -> synthetic stages -> display (``stages/synthetic.py``: every frame
passes through each stage after a fixed cost), fed a 64x64 JPEG so that ingest and display
cost next to nothing. It runs twice, driven as fast as possible by the benchmark client:

- single: one process, every stage a thread, in-process links (replicas forced to 1);
- distributed: torchrun with rank 0 (server, ingest, display) plus one rank per replica.

Ideal throughput, distributed: every replica works all the time, so the chain runs at
``1 / max(cost_i / replicas_i)``. In one process: sleeping stages overlap (a sleep frees
the GIL), so ``1 / max(cost_i)``; busy stages share one GIL, so ``1 / sum(cost_i)``.
For busy stages the ideal also assumes a core per busy rank; ``notes`` says how many
cores there were.

``sleep`` stands for GPU work (the CPU is free meanwhile): the gap to the ideal is what
hops, queues and scheduling cost. ``busy`` is CPU work holding the GIL: one process
cannot run two such stages at once, separate ranks can, when there are cores for them.
The busy loop's speed is calibrated once before any job starts and passed to every rank,
so each stage does the same fixed work per frame (see ``stages/synthetic.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import psutil

from runtime.bench.client import ClientResult, ClientSettings, run as run_client
from runtime.bench.jobs import PipelineJob
from runtime.bench.options import BenchOptions
from runtime.bench.pipeline import breakdown, job_details, run_details, run_warnings
from runtime.bench.progress import Progress
from runtime.bench.results import Column, PlotSpec, SectionResult, Target
from runtime.bench.stats import ratio, summarize
from runtime.bench.sysmon import SysMonitor, Usage
from stages.synthetic import calibrate

FRAME_SIDE = 64
WARMUP_S = {False: 1.0, True: 0.75}
"""Input before measuring, by ``options.quick``; at least one stats interval (0.5 s)."""
DURATION_S = {False: 6.0, True: 1.5}
"""Measured seconds per run: at ~50 FPS, 6 s is 300 frames, enough for a stable FPS."""
SLEEP_TARGET = ("sleep x3", 0.9)
"""(chain, achieved/ideal the distributed run must reach)."""
BUSY_TARGET = ("busy x2", 1.7)
"""(chain, distributed/single FPS the distributed run must reach)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Chain:
    name: str
    mode: str
    """'sleep' or 'busy' for every stage of the chain."""
    costs_ms: tuple[float, ...]
    """Per-frame cost of each synthetic stage, in chain order."""
    replicas: tuple[int, ...]
    """Replicas of each synthetic stage in the distributed run, one rank each."""

    def __post_init__(self) -> None:
        if len(self.costs_ms) != len(self.replicas) or not self.costs_ms:
            raise ValueError(f"chain {self.name!r}: one replica count per cost, at least one stage")
        if min(self.costs_ms) <= 0 or min(self.replicas) < 1:
            raise ValueError(f"chain {self.name!r}: costs must be > 0 and replicas >= 1")

    @property
    def key(self) -> str:
        """The name as it appears in log file names."""
        return self.name.replace(" ", "-")

    @property
    def world_size(self) -> int:
        """Rank 0 (server, ingest, display) plus one rank per replica."""
        return 1 + sum(self.replicas)

    @property
    def window(self) -> int:
        """Frames in flight: one per replica keeps each busy, plus two to cover ingest,
        display and the hops; more would only queue at ingest."""
        return sum(self.replicas) + 2


CHAINS = (
    Chain(name="sleep x2", mode="sleep", costs_ms=(20.0, 20.0), replicas=(1, 1)),
    Chain(name="sleep x3", mode="sleep", costs_ms=(20.0, 20.0, 20.0), replicas=(1, 1, 1)),
    Chain(name="sleep x4", mode="sleep", costs_ms=(20.0, 20.0, 20.0, 20.0), replicas=(1, 1, 1, 1)),
    Chain(name="sleep unequal", mode="sleep", costs_ms=(10.0, 40.0, 10.0), replicas=(1, 2, 1)),
    Chain(name="busy x2", mode="busy", costs_ms=(20.0, 20.0), replicas=(1, 1)),
)
QUICK_CHAINS = ("busy x2",)
"""Quick mode runs one chain (each job start costs seconds): the busy one, which also
exercises the calibration."""


def ideal_fps(costs_ms: tuple[float, ...], replicas: tuple[int, ...]) -> float:
    """Distributed bound: the slowest stage per replica sets the pace."""
    return 1000.0 / max(cost / n for cost, n in zip(costs_ms, replicas))


def single_ideal_fps(mode: str, costs_ms: tuple[float, ...]) -> float:
    """One-process bound: sleeps overlap across stage threads, busy work takes turns on the GIL."""
    return 1000.0 / (max(costs_ms) if mode == "sleep" else sum(costs_ms))


def chain_config(chain: Chain, iterations_per_ms: float) -> dict[str, Any]:
    """The job's config: ingest, the synthetic stages (cost per stage in ``options``), display."""
    stages: list[dict[str, Any]] = [{"name": "ingest", "placement": "server"}]
    for i, (cost, replicas) in enumerate(zip(chain.costs_ms, chain.replicas), start=1):
        stages.append({"name": f"s{i}", "kind": "synthetic", "replicas": replicas, "options": {"cost_ms": cost}})
    stages.append({"name": "display", "placement": "server"})
    return {"pipeline": {"name": "synthetic", "stages": stages},
            "synthetic": {"mode": chain.mode, "iterations_per_ms": iterations_per_ms},
            "compute": {"torch_threads": 1}}


def small_frame() -> bytes:
    """A small deterministic JPEG (a gradient), cheap to decode and encode."""
    y, x = np.mgrid[0:FRAME_SIDE, 0:FRAME_SIDE]
    bgr = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 80])
    if not ok:
        raise RuntimeError("could not encode the synthetic test frame")
    return buf.tobytes()


def chains(options: BenchOptions) -> list[Chain]:
    return [c for c in CHAINS if c.name in QUICK_CHAINS] if options.quick else list(CHAINS)


def steps(options: BenchOptions) -> int:
    return 2 * len(chains(options))


def run(options: BenchOptions, progress: Progress) -> SectionResult:
    progress.start("synthetic: calibrating the busy loop")
    iterations_per_ms = calibrate()  # before any job starts: the quietest moment of the section
    jpeg = small_frame()
    rows, details = [], {"iterations_per_ms": iterations_per_ms, "runs": {}, "jobs": {}}
    for chain in chains(options):
        config = chain_config(chain, iterations_per_ms)
        results = {}
        for layout, world_size in (("single", 1), ("distributed", chain.world_size)):
            progress.start(f"synthetic: {chain.name}, {layout}")
            with PipelineJob(config, name=f"synthetic-{chain.key}-{layout}", out_dir=options.out_dir / "logs",
                             world_size=world_size) as job:
                with SysMonitor(job.pids) as monitor:
                    result = run_client(ClientSettings(
                        port=job.port, jpeg=jpeg, duration_s=DURATION_S[options.quick],
                        warmup_s=WARMUP_S[options.quick], fps=None, window=chain.window))
            usage = monitor.summary(result.window_start, result.window_end)
            results[layout] = (result, usage)
            details["runs"][f"{chain.name}, {layout}"] = run_details(result, usage)
            details["jobs"][f"{chain.name}, {layout}"] = job_details(job)
            progress.step()
        rows.append(chain_row(chain, *results["single"], *results["distributed"]))
    return SectionResult(
        name="synthetic", title="Runtime efficiency on synthetic stages",
        columns=COLUMNS, rows=rows, targets=targets(rows), plots=PLOTS,
        notes=notes(options, iterations_per_ms, details), details=details)


# -- rows, targets, notes ------------------------------------------------------------

COLUMNS = [
    Column(key="chain", header="chain"),
    Column(key="mode", header="mode"),
    Column(key="costs", header="cost ms per stage"),
    Column(key="replicas", header="replicas"),
    Column(key="ranks", header="ranks"),
    Column(key="ideal_fps", header="ideal FPS", fmt="{:.1f}"),
    Column(key="dist_fps", header="distributed FPS", fmt="{:.1f}"),
    Column(key="achieved", header="achieved/ideal", fmt="{:.2f}x"),
    Column(key="single_ideal_fps", header="1-process ideal", fmt="{:.1f}"),
    Column(key="single_fps", header="1-process FPS", fmt="{:.1f}"),
    Column(key="speedup", header="dist/1-process", fmt="{:.2f}x"),
    Column(key="dist_p50_ms", header="dist p50 ms", fmt="{:.1f}"),
    Column(key="single_cpu_pct", header="1-process CPU %", fmt="{:.0f}"),
    Column(key="dist_cpu_pct", header="dist CPU %", fmt="{:.0f}"),
    Column(key="dist_cpu_ms_per_frame", header="dist CPU ms/frame", fmt="{:.1f}"),
    Column(key="other_cpu_pct", header="others' CPU %", fmt="{:.0f}"),
]

PLOTS = [
    PlotSpec(file="synthetic_achieved.png", title="Synthetic chains: distributed FPS / ideal", x="chain",
             y="achieved", ylabel="achieved / ideal"),
    PlotSpec(file="synthetic_speedup.png", title="Synthetic chains: distributed / one-process FPS", x="chain",
             y="speedup", ylabel="speedup"),
]


def chain_row(chain: Chain, single: ClientResult, single_usage: Usage, dist: ClientResult,
              dist_usage: Usage) -> dict[str, Any]:
    ideal = ideal_fps(chain.costs_ms, chain.replicas)
    return {"chain": chain.name, "mode": chain.mode, "costs": "/".join(f"{c:g}" for c in chain.costs_ms),
            "replicas": "/".join(str(n) for n in chain.replicas), "ranks": chain.world_size,
            "ideal_fps": ideal, "dist_fps": dist.fps, "achieved": ratio(dist.fps, ideal),
            "single_ideal_fps": single_ideal_fps(chain.mode, chain.costs_ms), "single_fps": single.fps,
            "speedup": ratio(dist.fps, single.fps), "dist_p50_ms": summarize(dist.latencies_ms)["p50"],
            "single_cpu_pct": single_usage.mean.get("job_cpu_pct", math.nan),
            "dist_cpu_pct": dist_usage.mean.get("job_cpu_pct", math.nan),
            "dist_cpu_ms_per_frame": ratio(10.0 * dist_usage.mean.get("job_cpu_pct", math.nan), dist.fps),
            "other_cpu_pct": max_known(single_usage.mean.get("other_cpu_pct", math.nan),
                                       dist_usage.mean.get("other_cpu_pct", math.nan)),
            "single_achieved": ratio(single.fps, single_ideal_fps(chain.mode, chain.costs_ms))}


def max_known(*values: float) -> float:
    """The largest of ``values`` that is not NaN (a run without CPU samples has none); NaN
    when none is. Plain ``max`` would answer NaN or not depending on the argument order."""
    return max((v for v in values if not math.isnan(v)), default=math.nan)


def targets(rows: list[dict[str, Any]]) -> list[Target]:
    """The two goals of the section. Ratios print with three decimals, so one just under its
    bar (1.698) never reads as the bar itself (1.70x) next to 'missed'."""
    by_chain = {row["chain"]: row for row in rows}
    out = []
    chain, bar = SLEEP_TARGET
    row = by_chain.get(chain)
    costs = "/".join(f"{c:g}" for c in next(c for c in CHAINS if c.name == chain).costs_ms)
    out.append(Target(
        name=f"sleep stages, 3-stage chain ({costs} ms): distributed FPS / ideal", goal=f">= {bar:g}x",
        met=None if row is None else row["achieved"] >= bar,
        measured=(f"not run (quick mode runs {', '.join(QUICK_CHAINS)})" if row is None else
                  f"{row['achieved']:.3f}x ({row['dist_fps']:.1f} of {row['ideal_fps']:.1f} FPS)")))
    chain, bar = BUSY_TARGET
    row = by_chain.get(chain)
    cores = psutil.cpu_count() or 1
    name = f"two equal CPU-bound (busy) stages on {cores} core(s): distributed / single-process FPS"
    if row is None or cores < 2:
        measured = "not run" if row is None else f"needs >= 2 cores, this machine has {cores}"
        out.append(Target(name=name, goal=f">= {bar:g}x", met=None, measured=measured))
    else:
        out.append(Target(name=name, goal=f">= {bar:g}x", met=row["speedup"] >= bar,
                          measured=(f"{row['speedup']:.3f}x ({row['dist_fps']:.1f} vs "
                                    f"{row['single_fps']:.1f} FPS)")))
    return out


def notes(options: BenchOptions, iterations_per_ms: float, details: dict[str, Any]) -> list[str]:
    out = [f"Input: a {FRAME_SIDE}x{FRAME_SIDE} JPEG, as fast as possible with one frame in flight per "
           f"replica plus 2 (latency is mostly that window's queueing); {WARMUP_S[options.quick]:g} s warm-up "
           f"then {DURATION_S[options.quick]:g} s measured per run.",
           f"Busy loop calibrated at {iterations_per_ms:,.0f} iterations/ms before the first job; the "
           f"machine has {psutil.cpu_count()} logical core(s), shared by every rank and the benchmark client.",
           "CPU: the job's processes as % of one core; per frame, the distributed job's CPU time per output "
           "frame (for sleep chains that is all runtime: ranks, hops, server; for busy ones, the busy work "
           "plus that); others' CPU: what programs other than the job and the benchmark client used, as % "
           "of all cores, the higher of the two runs (above a few %, the runs competed for the cores and "
           "their figures are low)."]
    out += [f"{label}: the job did not stop cleanly (exit {job['returncode']}); see {job['log']}"
            for label, job in details["jobs"].items() if not job["clean_stop"]]
    for label, run in details["runs"].items():
        out += run_warnings(label, run)
        out.append(f"{label}: {breakdown(run)}")
    return out
