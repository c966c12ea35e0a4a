"""Benchmark section 3, "Transport vs alternatives": our channel against what else could
carry a frame between two processes on one host.

    python -m runtime.bench.transport [--quick] [--rounds N] [--sizes 32768,1228800]

Methods, each moving one tensor of the payload's real dtype and shape from rank 0 to
rank 1 (and back, for latency); ``runtime.bench.transport_ranks`` holds the ranks and
each method's code, this module plans the rounds and turns timings into the section:

    channel   our channel (comms.links.create_links, one link per direction, defaults)
              as the runtime builds it between two ranks of one node: Unix socket +
              shared memory
    channel_gloo  our channel as the runtime builds it between two nodes: a torch link,
              everything over gloo
    raw       torch.distributed send/recv on the same backend (gloo): its ceiling
    grpc      grpcio on bytes (runtime.bench.grpc_tensor): the seeds' approach
    mp_queue  multiprocessing.Queue carrying the numpy array, as one does with frames
    memcpy    Tensor.copy_ into a preallocated tensor in one process: the physical reference

Throughput: rank 0 streams ``messages`` tensors; the clock stops when the receiver's
acknowledgement that it took the last one arrives. Latency: half of a ping-pong round
trip with the payload both ways, all on rank 0's clock. (A one-way stamp per message
would need each message to wait for the previous one's arrival, or it measures
queueing; that wait is the ping-pong.) Memcpy's round trip is a copy there and back.
Each round runs every method once per size, back to back, so machine noise hits all
methods alike; figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import grpc
import torch

from comms.config import TransportConfig
from runtime.bench import report, stats
from runtime.bench.options import BenchOptions
from runtime.bench.progress import Progress
from runtime.bench.results import Column, PlotSpec, SectionResult, Target
from runtime.bench.transport_ranks import METHODS, Job, Payload, Ranks, Sample

LARGE_BYTES = 1_000_000
"""Payloads from this size on are held to the throughput targets."""


PAYLOADS = (
    Payload("32 KB", torch.float32, (8192,)),
    Payload("1.2 MB", torch.float32, (3, 320, 320)),
    Payload("2.5 MB", torch.float32, (6, 320, 320)),
    Payload("2.76 MB", torch.uint8, (720, 1280, 3)),
)
"""The issue's sizes: a small tensor, 1 and 2 stacked 320x320 RGB float frames, a 720p frame."""


def payloads_of(sizes: str | int | list | tuple) -> tuple[Payload, ...]:
    """Payloads for byte counts ('32768,1228800', one number or a list): the standard
    payload of that size, else a flat uint8 tensor of that many bytes."""
    listed = sizes.split(",") if isinstance(sizes, str) else [sizes] if isinstance(sizes, int) else sizes
    counts = [int(s) for s in listed]
    if not counts or min(counts) < 1:
        raise ValueError(f"transport sizes: expected byte counts >= 1, got {sizes!r}")
    standard = {p.nbytes: p for p in PAYLOADS}
    return tuple(standard.get(n) or Payload(f"{n:,} B", torch.uint8, (n,)) for n in counts)


@dataclass(frozen=True, slots=True)
class Plan:
    """What the section runs. ``options.extra`` may set sizes, messages, pings or
    inline_max_bytes (the channel's setting, for experiments), by that name (shared with
    any other section that reads it) or as 'transport.<name>'."""

    sizes: tuple[Payload, ...]
    rounds: int
    messages: int
    """Tensors per throughput run."""
    pings: int
    """Round trips per latency run."""
    warmup: int = 3
    """Messages and round trips per path and size before anything is measured."""
    inline_max_bytes: int = TransportConfig().inline_max_bytes
    """Payloads up to this size travel with their header on both channel paths."""

    def __post_init__(self) -> None:
        TransportConfig(inline_max_bytes=self.inline_max_bytes)  # refuses what the channel does not take

    @property
    def jobs_per_round(self) -> int:
        return len(self.sizes) * len(METHODS)

    @property
    def transport(self) -> TransportConfig:
        """The channel's settings: the defaults, but for ``inline_max_bytes``."""
        return TransportConfig(inline_max_bytes=self.inline_max_bytes)


_KNOBS = {"sizes": payloads_of, "messages": int, "pings": int, "inline_max_bytes": int}


def plan_of(options: BenchOptions) -> Plan:
    """Quick: 20 messages and pings, one round. Full: 200 each, ``options.rounds`` rounds."""
    if options.quick:
        plan = Plan(sizes=PAYLOADS, rounds=1, messages=20, pings=20)
    else:
        plan = Plan(sizes=PAYLOADS, rounds=options.rounds, messages=200, pings=200)
    changes = {}
    for key, value in options.extra.items():
        name = key.removeprefix("transport.")
        if name in _KNOBS:
            try:
                changes[name] = _KNOBS[name](value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"extra {key!r}: {e}") from None
        elif name != key:  # unprefixed unknown keys may be another section's
            raise ValueError(f"extra {key!r}: unknown; transport takes {', '.join(_KNOBS)}")
    plan = replace(plan, **changes)
    if plan.messages < 1 or plan.pings < 1:
        raise ValueError(f"transport messages and pings must be >= 1, got {plan.messages} and {plan.pings}")
    return plan


@dataclass(frozen=True, slots=True)
class Figures:
    """One method at one size in one round."""

    mb_per_s: float
    p50_us: float
    p99_us: float


def figures_of(sample: Sample, job: Job) -> Figures:
    """Throughput in MB/s (10^6 bytes) of payload; one-way latency as half a round trip."""
    one_way_us = [ns / 2 / 1000 for ns in sample.round_trips_ns]
    return Figures(mb_per_s=job.payload.nbytes * job.messages / sample.stream_s / 1e6,
                   p50_us=stats.percentile(one_way_us, 50), p99_us=stats.percentile(one_way_us, 99))


Round = dict[tuple[str, str], Figures]
"""One round's figures by (method, payload label)."""

_RATIOS = {"vs_raw_mb_per_s": ("raw", "mb_per_s"), "vs_raw_p50": ("raw", "p50_us"),
           "vs_grpc_mb_per_s": ("grpc", "mb_per_s")}
"""Channel-row ratio columns: (the other method, the figure compared)."""


def rows_of(sizes: tuple[Payload, ...], rounds: list[Round], methods: tuple[str, ...] = METHODS) -> list[dict]:
    """One row per size and method with the median of each figure over the rounds; the
    channel rows also get their ratios to the raw and gRPC rows' medians (those of them
    ``methods`` has: section 'multihost' runs no gRPC)."""
    rows = []
    for payload in sizes:
        medians = {method: {key: stats.median(getattr(r[method, payload.label], key) for r in rounds)
                            for key in ("mb_per_s", "p50_us", "p99_us")} for method in methods}
        for method in methods:
            row = {"method": method, "size_label": payload.label, "size_bytes": payload.nbytes,
                   "tensor": payload.describe(), **medians[method]}
            if method.startswith("channel"):
                row |= {column: stats.ratio(medians[method][key], medians[other][key])
                        for column, (other, key) in _RATIOS.items() if other in medians}
            rows.append(row)
    return rows


def _judge(rows: list[dict], name: str, size: str, column: str, bar: float, at_least: bool) -> Target:
    """The channel row's ratio ``column`` at ``size`` against ``bar`` (>= or <=)."""
    goal = f"{'>=' if at_least else '<='} {bar:g}x"
    by = {(row["method"], row["size_label"]): row for row in rows}
    if not any(method == "channel" for method, _ in by):
        return Target(name=name, goal=goal, measured="not measured: no channel in this run", met=None)
    if ("channel", size) not in by:
        return Target(name=name, goal=goal, measured=f"not measured: no {size} payload in this run", met=None)
    other, key = _RATIOS[column]
    value = by["channel", size][column]
    met = None if math.isnan(value) else value >= bar if at_least else value <= bar
    unit = "MB/s" if key == "mb_per_s" else "µs"
    measured = f"{value:.2f}x ({by['channel', size][key]:.0f} vs {by[other, size][key]:.0f} {unit} {other})"
    return Target(name=name, goal=goal, measured=measured, met=met)


def targets_of(rows: list[dict], against_grpc: bool = True) -> list[Target]:
    """The issue's three goals; the throughput ones once per payload of >= 1 MB. Without
    ``against_grpc`` only the two against raw (for runs without gRPC, as 'multihost')."""
    large = list(dict.fromkeys(row["size_label"] for row in rows if row["size_bytes"] >= LARGE_BYTES))
    targets = [_judge(rows, f"channel / raw throughput at {size}", size, "vs_raw_mb_per_s", 0.9, True)
               for size in large]
    targets.append(_judge(rows, "channel / raw p50 latency, 32 KB", "32 KB", "vs_raw_p50", 1.5, False))
    if against_grpc:
        targets += [_judge(rows, f"channel / gRPC throughput at {size}", size, "vs_grpc_mb_per_s", 2.0, True)
                    for size in large]
    if not large:
        targets.append(Target(name="channel throughput at >= 1 MB",
                              goal=">= 0.9x raw, >= 2x gRPC" if against_grpc else ">= 0.9x raw",
                              measured="not measured: no payload of >= 1 MB in this run", met=None))
    return targets


COLUMNS = [
    Column(key="size_label", header="payload"),
    Column(key="tensor", header="tensor"),
    Column(key="method", header="method"),
    Column(key="mb_per_s", header="MB/s", fmt="{:.0f}"),
    Column(key="p50_us", header="p50 µs", fmt="{:.0f}"),
    Column(key="p99_us", header="p99 µs", fmt="{:.0f}"),
    Column(key="vs_raw_mb_per_s", header="÷ raw MB/s", fmt="{:.2f}x"),
    Column(key="vs_raw_p50", header="÷ raw p50", fmt="{:.2f}x"),
    Column(key="vs_grpc_mb_per_s", header="÷ gRPC MB/s", fmt="{:.2f}x"),
]

PLOTS = [
    PlotSpec(file="transport_throughput.png", title="One-way throughput by payload", x="size_label",
             y="mb_per_s", series="method", ylabel="MB/s (log)", log_y=True),
    PlotSpec(file="transport_latency_p50.png", title="One-way latency p50 by payload", x="size_label",
             y="p50_us", series="method", ylabel="µs (log)", log_y=True),
]


def notes_of(plan: Plan) -> list[str]:
    config = plan.transport
    return [
        f"2 processes (torch.multiprocessing spawn) on 127.0.0.1, gloo, one torch thread each, alive for the "
        f"whole section; torch {torch.__version__}, grpcio {grpc.__version__}, Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPU cores.",
        f"channel: our channel with TransportConfig defaults (capacity {config.link_capacity}, payloads up to "
        f"{config.inline_max_bytes} B with their header), one link per direction, a Message with one tensor, "
        "built as the runtime builds a link between two ranks of one node: a same-host link, "
        "comms.socket_link (header and credits over a Unix socket on the caller's thread, larger payloads through "
        "shared memory). channel_gloo: the link the runtime builds between two nodes, run here on one host: a "
        f"torch link, comms.torch_p2p (gloo; {config.slot_bytes}-byte header slot, larger payloads on a data "
        "group). Targets are judged on channel. raw: blocking dist.send/recv of the bare tensor into a buffer "
        "allocated beforehand, no header, no flow control.",
        "grpc: generic handlers on bytes, tensor.numpy().tobytes() and torch.frombuffer on both ends in the timed "
        "path; float payloads travel as float32 bytes, the 720p frame as its uint8 bytes (not widened).",
        f"mp_queue: multiprocessing.Queue(maxsize={config.link_capacity}) carrying the tensor's numpy array "
        "(pickled through a pipe, as one does with OpenCV frames); torch.from_numpy on receipt. A torch tensor "
        "put on the queue would be moved to shared memory instead (not measured here). memcpy: Tensor.copy_ "
        "into a preallocated tensor, cache-warm.",
        f"Throughput: {plan.messages} tensors streamed one way, clock stopped by the receiver's acknowledgement "
        f"after the last. Latency: half of a ping-pong round trip (payload both ways) on rank 0's clock, "
        f"{plan.pings} round trips per run; memcpy: one copy.",
        f"Every path warmed with {plan.warmup} messages per size first. {plan.rounds} round(s), each running every "
        "method once per size back to back (order rotated per round); figures are medians over rounds and "
        "ratios are between those medians.",
    ]


def steps(options: BenchOptions) -> int:
    """Progress steps: start-up, warm-up, then one per method, size and round."""
    plan = plan_of(options)
    return 2 + plan.rounds * plan.jobs_per_round


def _round_jobs(plan: Plan, index: int) -> list[Job]:
    return round_jobs(METHODS, plan.sizes, plan.messages, plan.pings, index)


def round_jobs(methods: tuple[str, ...], sizes: tuple[Payload, ...], messages: int, pings: int,
               index: int) -> list[Job]:
    """Round ``index``: every method once per size; the method order rotates from round to
    round, so no method always runs first (on a cold cache) or right after another."""
    shift = index % len(methods)
    order = methods[shift:] + methods[:shift]
    return [Job(method, payload, messages, pings) for payload in sizes for method in order]


def run(options: BenchOptions, progress: Progress) -> SectionResult:
    plan = plan_of(options)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    progress.start("transport: starting 2 ranks")
    with Ranks(options.out_dir / "transport-ranks.log", plan.transport) as ranks:
        progress.step()
        rounds = _measure(plan, ranks, progress)
    rows = rows_of(plan.sizes, rounds)
    per_round = [[{"method": m, "size_label": s, **asdict(f)} for (m, s), f in r.items()] for r in rounds]
    return SectionResult(name="transport", title="Transport vs alternatives", columns=COLUMNS, rows=rows,
                         targets=targets_of(rows), notes=notes_of(plan), plots=PLOTS,
                         details={"messages": plan.messages, "pings": plan.pings, "rounds": per_round})


def _measure(plan: Plan, ranks: Ranks, progress: Progress) -> list[Round]:
    """Warm every path at every size, then run the rounds."""
    progress.start("transport: warming every path")
    for payload in plan.sizes:
        for method in METHODS:
            ranks.run(Job(method, payload, plan.warmup, plan.warmup))
    progress.step()
    rounds = []
    for index in range(plan.rounds):
        figures: Round = {}
        for job in _round_jobs(plan, index):
            progress.start(f"transport round {index + 1}/{plan.rounds}: {job}")
            figures[job.method, job.payload.label] = figures_of(ranks.run(job), job)
            progress.step()
        rounds.append(figures)
    return rounds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Transport vs alternatives (benchmark section 3).")
    parser.add_argument("--quick", action="store_true", help="20 messages and pings, one round")
    parser.add_argument("--rounds", type=int, help="interleaved rounds, full mode only (default: BenchOptions.rounds)")
    parser.add_argument("--sizes", help="payload bytes, comma separated (default: the issue's four sizes)")
    parser.add_argument("--out-dir", type=Path, help="where the ranks' log goes (default: a new temp folder)")
    args = parser.parse_args(argv)
    options = BenchOptions(out_dir=args.out_dir or Path(tempfile.mkdtemp(prefix="transport-bench-")),
                           quick=args.quick, sections=("transport",),
                           extra={"transport.sizes": args.sizes} if args.sizes else {},
                           **({"rounds": args.rounds} if args.rounds else {}))
    progress = Progress(steps(options))
    result = run(options, progress)
    progress.close()
    print(report.section_markdown(result))


if __name__ == "__main__":
    main()
