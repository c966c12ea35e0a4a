"""Section 'pipeline': the real mirror pipeline, one process vs torchrun ranks, same input.

Three layouts of the mirror pipeline (ingest -> vision -> generator -> display):

- single, style net: ``python launch/mirror.py --config configs/local.yaml`` (every stage a
  thread of one process, in-process links; the default generator, the learned style net);
- distributed, style net: ``torchrun --standalone --nproc-per-node N launch/mirror.py`` with
  the embedded default config (rank 0 server+ingest+display, rank 1 vision, the rest generator);
- distributed, low-fi: the same ranks with ``configs/mirror-lowfi.yaml`` (``generator:
  {model: lowfi}``, the cheap fallback renderer), to show what the learned generator costs.

Which renderer each job really ran is read back from its log (the generator's "ready"
line) and a mismatch is reported in the notes.

Each is fed the 640x480 astronaut fixture over the real WebSocket server, by
``runtime.bench.client``, in two input modes on the same job (fixed rate first, then as
fast as possible, so the first mode's warm-up also warms the job for the second):

- fixed rate ``options.fps``: what a camera does; the latency a user sees;
- as fast as possible, ``MAX_WINDOW`` frames in flight: the throughput headroom. Its
  latency is mostly the window's queueing (Little's law: about window / FPS).

Per-stage compute and per-hop figures come from the server's ``stats`` message at the
end of each run. Its windows hold the newest 512 samples per stage and link, so in quick
mode (short runs) the second mode's figures still include some of the first's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
import yaml

from runtime.bench.client import ClientResult, ClientSettings, run as run_client
from runtime.bench.jobs import REPO, PipelineJob
from runtime.bench.options import BenchOptions
from runtime.bench.progress import Progress
from runtime.bench.results import Column, PlotSpec, SectionResult, Target
from runtime.bench.stats import ratio, summarize
from runtime.bench.sysmon import SysMonitor, Usage

FIXTURE = REPO / "tests" / "fixtures" / "astronaut_640x480.jpg"
LOCAL_CONFIG = REPO / "configs" / "local.yaml"
LOWFI_CONFIG = REPO / "configs" / "mirror-lowfi.yaml"
GENERATORS = {"stylenet": "style net", "lowfi": "low-fi"}
"""Generator renderer (``GeneratorConfig.model``) -> how row labels name it."""
READY = re.compile(r"generator ready: (\w+) on (\S+)")
"""What ``GeneratorStage.setup`` logs: the renderer it built and its device."""
MAX_WINDOW = 4
"""Frames in flight in the as-fast-as-possible mode: one per stage of the 4-stage chain
keeps every stage fed; more would only wait at ingest (and be dropped there)."""
TARGET_FPS = 20.0
SUSTAINED = 0.975
"""'Sustained 20 FPS': at a steady 20 fps input, at least 97.5% of it comes back over the
whole measured window (>= 19.5 FPS out), i.e. no backlog builds and few frames drop."""
TARGET_P50_MS = 100.0
LEARNED_FPS = 15.0
LEARNED_P50_MS = 120.0
"""The learned generator's bar: at the steady 20 fps input, >= 15 FPS out, p50 <= 120 ms."""
WARMUP_S = {False: 2.0, True: 1.0}
"""Input before measuring, by ``options.quick``: the first frames pay for lazy
initialisation on every rank (hundreds of ms), which no steady-state figure should hold."""
QUICK_DURATION_S = 1.5


@dataclass(frozen=True, kw_only=True, slots=True)
class Layout:
    key: str
    """Short id, used in log file names."""
    name: str
    """Row label."""
    world_size: int
    config: dict[str, Any]
    """The config the job runs ({} = the embedded default)."""
    generator: str
    """The renderer the config selects ('stylenet' or 'lowfi'; see ``GENERATORS``)."""


def layouts(options: BenchOptions) -> list[Layout]:
    """Single and distributed with the default (learned) generator, then distributed with low-fi."""
    ranks = f"({options.world_size} ranks)"
    return [Layout(key="single", name=f"single, {GENERATORS['stylenet']}", world_size=1,
                   config=yaml.safe_load(LOCAL_CONFIG.read_text()), generator="stylenet"),
            Layout(key="distributed", name=f"distributed, {GENERATORS['stylenet']} {ranks}",
                   world_size=options.world_size, config={}, generator="stylenet"),
            Layout(key="distributed-lowfi", name=f"distributed, {GENERATORS['lowfi']} {ranks}",
                   world_size=options.world_size, config=yaml.safe_load(LOWFI_CONFIG.read_text()),
                   generator="lowfi")]


def inputs(options: BenchOptions) -> list[float | None]:
    """Input rates per layout: the fixed rate, then None (as fast as possible)."""
    return [options.fps, None]


def steps(options: BenchOptions) -> int:
    return len(layouts(options)) * len(inputs(options))


def run(options: BenchOptions, progress: Progress) -> SectionResult:
    jpeg = FIXTURE.read_bytes()
    duration = QUICK_DURATION_S if options.quick else options.duration_s
    rows, details = [], {"runs": {}, "jobs": {}}
    for layout in layouts(options):
        progress.start(f"pipeline: starting {layout.name}")
        with PipelineJob(layout.config, name=f"pipeline-{layout.key}", out_dir=options.out_dir / "logs",
                         world_size=layout.world_size) as job:
            for fps in inputs(options):
                settings = ClientSettings(port=job.port, jpeg=jpeg, duration_s=duration,
                                          warmup_s=WARMUP_S[options.quick], fps=fps, window=MAX_WINDOW)
                progress.start(f"pipeline: {layout.name}, input {settings.input_label}")
                with SysMonitor(job.pids) as monitor:
                    result = run_client(settings)
                usage = monitor.summary(result.window_start, result.window_end)
                rows.append(run_row(layout, result, usage))
                details["runs"][f"{layout.name}, {result.input}"] = run_details(result, usage)
                progress.step()
        details["jobs"][layout.name] = {**job_details(job), "generator": layout.generator}
    add_ratios(rows)
    return SectionResult(
        name="pipeline", title="Single process vs distributed: the mirror pipeline, same input",
        columns=COLUMNS, rows=rows, targets=targets(rows, options), plots=PLOTS,
        notes=notes(options, duration, rows, details), details=details)


# -- rows ----------------------------------------------------------------------------

COLUMNS = [
    Column(key="layout", header="layout"),
    Column(key="input", header="input"),
    Column(key="fps", header="output FPS", fmt="{:.1f}"),
    Column(key="p50_ms", header="g2g p50 ms", fmt="{:.1f}"),
    Column(key="p95_ms", header="p95 ms", fmt="{:.1f}"),
    Column(key="p99_ms", header="p99 ms", fmt="{:.1f}"),
    Column(key="ttff_ms", header="first frame ms", fmt="{:.0f}"),
    Column(key="sent", header="sent"),
    Column(key="received", header="received"),
    Column(key="dropped", header="dropped"),
    Column(key="cpu_job_pct", header="job CPU % of 1 core", fmt="{:.0f}"),
    Column(key="cpu_system_pct", header="machine CPU %", fmt="{:.0f}"),
    Column(key="cpu_other_pct", header="others' CPU %", fmt="{:.0f}"),
    Column(key="fps_vs_single", header="FPS dist/single", fmt="{:.2f}x"),
    Column(key="p50_vs_single", header="p50 dist/single", fmt="{:.2f}x"),
]

PLOTS = [
    PlotSpec(file="pipeline_fps.png", title="Mirror pipeline: output FPS", x="input", y="fps",
             series="layout", ylabel="frames per second"),
    PlotSpec(file="pipeline_p50.png", title="Mirror pipeline: glass-to-glass p50", x="input", y="p50_ms",
             series="layout", ylabel="ms"),
    PlotSpec(file="pipeline_p95.png", title="Mirror pipeline: glass-to-glass p95", x="input", y="p95_ms",
             series="layout", ylabel="ms"),
]


def run_row(layout: Layout, result: ClientResult, usage: Usage) -> dict[str, Any]:
    latency = summarize(result.latencies_ms)
    return {"layout": layout.name, "layout_key": layout.key, "generator": layout.generator,
            "ranks": layout.world_size, "input": result.input, "fps_in": result.fps_in, "fps": result.fps,
            "p50_ms": latency["p50"], "p95_ms": latency["p95"], "p99_ms": latency["p99"],
            "ttff_ms": result.ttff_ms, "sent": result.sent, "received": result.received,
            "dropped": result.dropped, "cpu_job_pct": usage.mean.get("job_cpu_pct", math.nan),
            "cpu_system_pct": usage.mean.get("system_cpu_pct", math.nan),
            "cpu_other_pct": usage.mean.get("other_cpu_pct", math.nan)}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Give each distributed row its FPS and p50 as a multiple of the single-process run
    with the same input and the same generator (there is no single-process low-fi run:
    a ratio across generators would mix two effects)."""
    single = {(row["input"], row["generator"]): row for row in rows if row["ranks"] == 1}
    for row in rows:
        base = single.get((row["input"], row["generator"]))
        if row["ranks"] > 1 and base is not None:
            row["fps_vs_single"] = ratio(row["fps"], base["fps"])
            row["p50_vs_single"] = ratio(row["p50_ms"], base["p50_ms"])


def run_details(result: ClientResult, usage: Usage) -> dict[str, Any]:
    """What the JSON keeps of one run: per-stage compute, per-hop time and bytes, drops
    by reason, CPU/GPU use, errors and the latency samples."""
    stats = result.stats or {}
    return {
        "fps_in": result.fps_in,
        "compute_ms": {name: stage.get("compute_ms", {}) for name, stage in stats.get("stages", {}).items()},
        "mean_batch": {name: stage.get("mean_batch") for name, stage in stats.get("stages", {}).items()},
        "hops": {name: {"hop_ms": link.get("hop_ms", {}), "bytes_per_message": bytes_per_message(link)}
                 for name, link in stats.get("hops", {}).items()},
        "drops": result.drops,
        "usage": {"mean": usage.mean, "max": usage.max, "samples": usage.samples, "gpu_skip": usage.gpu_skip,
                  "sampling_error": usage.sampling_error},
        "errors": result.errors, "error_count": result.error_count,
        "latencies_ms": [round(ms, 2) for ms in result.latencies_ms],
    }


def job_details(job: PipelineJob) -> dict[str, Any]:
    """How long the job took to start and to stop, whether it stopped cleanly, its log,
    and the generators it built ("renderer on device", from their ready lines)."""
    return {"startup_s": job.startup_s, "stop_s": job.stop_s, "clean_stop": job.exit.clean,
            "returncode": job.exit.returncode, "log": str(job.log_path),
            "generators_ran": [f"{name} on {device}" for name, device in READY.findall(job.log_text())]}


def bytes_per_message(link: dict[str, Any]) -> float:
    sent = link.get("messages_sent", 0)
    return link.get("bytes_sent", 0) / sent if sent else math.nan


# -- target and notes ----------------------------------------------------------------

def targets(rows: list[dict[str, Any]], options: BenchOptions) -> list[Target]:
    """The section's two goals, both judged on the default distributed layout (learned
    generator) at the fixed input rate; its as-fast-as-possible FPS is quoted as the
    headroom. Both are defined at a steady 20 fps input, so another fixed rate leaves them
    unjudged: below, 20 FPS out cannot happen; above, the run measures an overloaded
    pipeline, not a sustained 20."""
    return [
        _judge(rows, options, f"default mirror pipeline 640x480, distributed ({options.world_size} ranks)",
               (f">= {TARGET_FPS:g} FPS sustained (at a steady {TARGET_FPS:g} fps input, >= "
                f"{SUSTAINED * TARGET_FPS:g} FPS out over the whole window) and glass-to-glass p50 "
                f"<= {TARGET_P50_MS:g} ms"),
               lambda row: row["fps"] >= SUSTAINED * TARGET_FPS and row["p50_ms"] <= TARGET_P50_MS),
        _judge(rows, options, (f"default pipeline ({options.world_size} ranks, 640x480 at {TARGET_FPS:g} fps) "
                               f"with the learned generator"),
               f">= {LEARNED_FPS:g} FPS and p50 glass-to-glass <= {LEARNED_P50_MS:g} ms",
               lambda row: row["fps"] >= LEARNED_FPS and row["p50_ms"] <= LEARNED_P50_MS),
    ]


def _judge(rows: list[dict[str, Any]], options: BenchOptions, name: str, goal: str,
           met: Callable[[dict[str, Any]], bool]) -> Target:
    """``met`` of the default distributed layout's fixed-rate row, with its figures."""
    if options.fps != TARGET_FPS:
        return Target(name=name, goal=goal, met=None,
                      measured=(f"not measured: the fixed input rate is {options.fps:g} fps; "
                                f"the target is defined at {TARGET_FPS:g} fps"))
    default = [row for row in rows if row["layout_key"] == "distributed"]
    fixed = next((row for row in default if row["input"] != "max"), None)
    fastest = next((row for row in default if row["input"] == "max"), None)
    if fixed is None:
        return Target(name=name, goal=goal, met=None, measured="not measured: no distributed run at the fixed rate")
    headroom = "" if fastest is None else f"; headroom: {fastest['fps']:.1f} FPS as fast as possible"
    return Target(name=name, goal=goal, met=met(fixed),
                  measured=(f"{fixed['fps']:.1f} FPS out at {fixed['fps_in']:.1f} fps in "
                            f"({fixed['received']}/{fixed['sent']} frames back), p50 {fixed['p50_ms']:.1f} ms"
                            f"{headroom}"))


def notes(options: BenchOptions, duration: float, rows: list[dict[str, Any]],
          details: dict[str, Any]) -> list[str]:
    ratios = [f"{row['layout']}, {row['input']}: FPS {row['fps_vs_single']:.2f}x, p50 {row['p50_vs_single']:.2f}x"
              for row in rows if "fps_vs_single" in row]
    out = [f"Distributed / single process, same input and generator: {'; '.join(ratios) or 'not measured'}.",
           generator_comparison(rows),
           f"Input: {FIXTURE.name} (640x480 JPEG) over the WebSocket server on loopback; each run "
           f"{WARMUP_S[options.quick]:g} s warm-up then {duration:g} s measured; as fast as possible = "
           f"{MAX_WINDOW} frames in flight (its latency is mostly that window's queueing).",
           "Job start (launch to serving) / stop (signal to every process gone): " + ", ".join(
               f"{name} {job['startup_s']:.1f} s / {job['stop_s']:.1f} s"
               for name, job in details["jobs"].items()),
           f"CPU: the job's processes as % of one core; the machine, and what programs other than the job "
           f"and the benchmark client used, as % of all {psutil.cpu_count()} cores (others' CPU above a few % "
           f"means the run competed for the cores and its figures are low)."]
    out += generator_warnings(details["jobs"])
    out += [f"{name}: the job did not stop cleanly (exit {job['returncode']}); see {job['log']}"
            for name, job in details["jobs"].items() if not job["clean_stop"]]
    for label, run in details["runs"].items():
        out += run_warnings(label, run)
        out.append(f"{label}: {breakdown(run)}")
    return out


def run_warnings(label: str, run: dict[str, Any]) -> list[str]:
    """What went wrong in one run (``run_details``) that its figures alone would not show:
    CPU sampling that stopped early, error messages from the server."""
    out = []
    if run["usage"]["sampling_error"] is not None:
        out.append(f"{label}: CPU sampling stopped: {run['usage']['sampling_error']}")
    if run["error_count"]:
        out.append(f"{label}: {run['error_count']} error message(s) from the server, "
                   f"e.g. {'; '.join(run['errors'][:2])}")
    return out


def breakdown(run: dict[str, Any]) -> str:
    """One line: per-stage compute p50, per-hop p50 and bytes, drops by reason."""
    stages = ", ".join(f"{name} {figures.get('p50', math.nan):.2f}" for name, figures in run["compute_ms"].items())
    hops = ", ".join(f"{name} {link['hop_ms'].get('p50', math.nan):.2f} ms x "
                     f"{link['bytes_per_message'] / 1000:.1f} kB"
                     for name, link in run["hops"].items())
    drops = ", ".join(f"{reason} {n}" for reason, n in run["drops"].items() if n) or "none"
    return f"compute p50 ms: {stages}; hops p50: {hops or 'none'}; drops: {drops}"


def generator_comparison(rows: list[dict[str, Any]]) -> str:
    """One line: the distributed layouts' FPS and p50 per generator, per input."""
    dist = [row for row in rows if row["ranks"] > 1]
    parts = []
    for mode in dict.fromkeys(row["input"] for row in dist):
        figures = [f"{GENERATORS.get(row['generator'], row['generator'])} {row['fps']:.1f} FPS / p50 "
                   f"{row['p50_ms']:.1f} ms" for row in dist if row["input"] == mode]
        parts.append(f"{mode}: {', '.join(figures)}")
    return f"Distributed, by generator: {'; '.join(parts) or 'not measured'}."


def generator_warnings(jobs: dict[str, dict[str, Any]]) -> list[str]:
    """A line for each job whose log does not show the generator its layout selects."""
    out = []
    for name, job in jobs.items():
        ran = job.get("generators_ran", [])
        if not ran or any(not entry.startswith(f"{job['generator']} on ") for entry in ran):
            out.append(f"{name}: expected generator '{job['generator']}', the job's log shows "
                       f"{', '.join(ran) or 'no generator ready line'}; see {job['log']}")
    return out
