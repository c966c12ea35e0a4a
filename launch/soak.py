"""Soak the mirror pipeline: many browser-like sessions for minutes; errors, starvation, memory.

    python launch/soak.py                                  # 8 sessions, 60 s warm-up + 600 s, 3 ranks
    python launch/soak.py --duration 60 --warmup 5         # the CI version (tests/launch/test_soak.py)
    python launch/soak.py --url http://127.0.0.1:8765/     # attach to a running server
    python launch/soak.py --world-size 1 --config configs/local.yaml

Without ``--url`` the soak starts the pipeline itself as the README does (``torchrun
--standalone --nproc-per-node N launch/mirror.py``; ``--world-size 1`` one process) on a
free port and stops it at the end; with more than 8 clients it raises
``server.max_sessions`` to fit. With ``--url`` the server must run on this machine: its
ranks are found from its port and their RSS is read from /proc.

Each session behaves like the page (``runtime/bench/soak_client.py``): it streams the
640x480 astronaut fixture at the live ``target_fps`` (20 by default; ``--fps`` pins it) with
at most 3 frames unanswered, and reads everything the server sends. Sessions connect over
the first second; the first ``--warmup`` seconds are not measured, then ``--duration``
seconds are. The warm-up is long (60 s) because memory settles slowly: the vision rank's
RSS climbs by ~30 MiB during its first minute of load, then stays flat. Every rank of
this machine has its RSS sampled before the sessions connect, every ``--sample-every``
seconds, at the end of the warm-up (the baseline) and at the end.

The report (stdout; JSON in ``OUT/soak.json``): per session frames sent and received,
frames/s, latency p50/p95 and its longest wait for a frame; per rank RSS idle, start, end,
max and growth. Exit code 0 when nothing failed, 1 when a session saw an error or starved,
a rank exited or grew past the RSS bound, or the job did not stop cleanly
(``runtime/bench/soak_report.py`` says why each bound); 2 when the soak could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from runtime.bench.jobs import REPO, JobError, PipelineJob
from runtime.bench.soak_client import SessionRecord, SessionSettings, run_session, socket_url
from runtime.bench.soak_memory import MiB, RssSampler, find_ranks
from runtime.bench.soak_report import SoakLimits, SoakResult, format_report, judge, summarize_rank, summarize_session

FIXTURE = REPO / "tests" / "fixtures" / "astronaut_640x480.jpg"
DEFAULT_LIMITS = SoakLimits()
CONNECT_SPREAD_S = 1.0
"""Sessions connect evenly over this long, as pages opened by people would, not in one burst."""
CLOSE_TIMEOUT_S = 15.0
"""How long the sessions have to close at the end before they are cancelled (and say so)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8, help="browser-like sessions (default 8)")
    p.add_argument("--duration", type=float, default=600.0, help="seconds measured (default 600)")
    p.add_argument("--warmup", type=float, default=60.0,
                   help="seconds of load before measuring, the RSS baseline at its end (default 60)")
    p.add_argument("--fps", type=float,
                   help="pin each session's frame rate (default: the live target_fps, as the page does)")
    p.add_argument("--url",
                   help="attach to a running server (the URL launch/mirror.py printed) instead of starting one")
    p.add_argument("--token", default=os.environ.get("MINDMIRROR_TOKEN"),
                   help="the server's access token (default: $MINDMIRROR_TOKEN)")
    p.add_argument("--insecure", action="store_true", help="with a wss:// URL: accept a self-signed certificate")
    p.add_argument("--world-size", type=int, default=3,
                   help="ranks of the job the soak starts (default 3; 1 = one process)")
    p.add_argument("--config", type=Path, help="YAML config of the job the soak starts (default: the embedded one)")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples (default 5)")
    p.add_argument("--progress-every", type=float, default=30.0, help="seconds between progress lines on stderr")
    p.add_argument("--rss-growth-mb", type=float, default=DEFAULT_LIMITS.rss_growth_mb,
                   help=f"most a rank's RSS may grow after the warm-up (default {DEFAULT_LIMITS.rss_growth_mb:g})")
    p.add_argument("--max-gap", type=float, default=DEFAULT_LIMITS.max_gap_s,
                   help=("longest wait for a frame before a session counts as starved "
                         f"(default {DEFAULT_LIMITS.max_gap_s:g} s)"))
    p.add_argument("--out", type=Path, help="folder for the job's log and soak.json (default: a new temporary folder)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> SoakLimits:
    """The limits; ValueError naming the argument for anything out of range."""
    if not 1 <= args.clients <= 1024:
        raise ValueError(f"--clients must be within 1..1024, got {args.clients}")
    for name, value, least in (("--duration", args.duration, 0.0), ("--sample-every", args.sample_every, 0.0),
                               ("--progress-every", args.progress_every, 0.0)):
        if not (math.isfinite(value) and value > least):
            raise ValueError(f"{name} must be a finite number > 0, got {value}")
    if not (math.isfinite(args.warmup) and args.warmup >= 0):
        raise ValueError(f"--warmup must be a finite number >= 0, got {args.warmup}")
    if args.world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
    if args.url and args.config:
        raise ValueError("--config is for a job the soak starts; with --url the server is already running")
    return SoakLimits(rss_growth_mb=args.rss_growth_mb, max_gap_s=args.max_gap)


def job_config(args: argparse.Namespace) -> dict:
    """The config of the job to start: the given file or the embedded default, with room for every client."""
    config = yaml.safe_load(args.config.read_text()) if args.config else {}
    server = config.setdefault("server", {})
    server["max_sessions"] = max(args.clients, server.get("max_sessions", 8))
    return config


async def soak(args: argparse.Namespace, url: str, sampler: RssSampler, result_notes: list[str]):
    """Run the sessions; returns (records, window start, window end)."""
    ws_url, origin = socket_url(url, args.token)
    settings = SessionSettings(url=ws_url, origin=origin, jpeg=FIXTURE.read_bytes(), fps=args.fps,
                               verify_tls=not args.insecure)
    stop = asyncio.Event()
    sampler.sample(time.monotonic())  # idle: before any session
    records = [SessionRecord(index=i) for i in range(args.clients)]
    spread = CONNECT_SPREAD_S / args.clients
    tasks = [asyncio.create_task(run_session(r, settings, stop, start_delay_s=spread * r.index)) for r in records]
    t0 = time.monotonic()
    window_start, window_end = t0 + args.warmup, t0 + args.warmup + args.duration
    next_sample, next_progress, baseline = t0, t0 + args.progress_every, False
    while (now := time.monotonic()) < window_end and not all(t.done() for t in tasks):
        if not baseline and now >= window_start:
            sampler.sample(now)
            window_start, baseline = now, True
        if now >= next_sample:
            sampler.sample(now)
            next_sample = now + args.sample_every
        if now >= next_progress:
            progress(tasks, sampler, now - t0)
            next_progress = now + args.progress_every
        wake = min(next_sample, next_progress, window_end, window_start if not baseline else math.inf)
        await asyncio.sleep(max(0.0, wake - time.monotonic()))
    window_end = min(window_end, time.monotonic())
    sampler.sample(window_end)
    if not baseline:  # every session ended during the warm-up: report what there is, from the start
        window_start = t0
        result_notes.append("every session ended before the warm-up did: the figures cover the warm-up")
    stop.set()
    _, stuck = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S)
    for task, record in zip(tasks, records, strict=True):
        if task in stuck:  # e.g. a send held up by a server that stopped reading
            task.cancel()
            record.error(f"the session did not close within {CLOSE_TIMEOUT_S:g} s of the end")
    return records, window_start, window_end


def progress(tasks: list[asyncio.Task], sampler: RssSampler, elapsed: float) -> None:
    rss = ", ".join(f"rank {r}: {m.samples[-1][1] / MiB:.0f} MiB" for r, m in sampler.ranks.items() if m.samples)
    running = sum(not t.done() for t in tasks)
    sys.stderr.write(f"soak: {elapsed:.0f} s, {running}/{len(tasks)} sessions connected; RSS {rss}\n")
    sys.stderr.flush()


def roles_from(records) -> dict[int, str]:
    """Rank -> role, from the newest ``stats`` message any session got."""
    for record in records:
        if record.last_stats:
            return {r["rank"]: r["role"] for r in record.last_stats.get("ranks", [])}
    return {}


def dead_ranks(records) -> list[str]:
    for record in records:
        if record.last_stats:
            return [f"rank {r['rank']} ({r['role']}) was not alive at the end (server's stats)"
                    for r in record.last_stats.get("ranks", []) if not r.get("alive", True)]
    return []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        limits = check_args(args)
        config = None if args.url else job_config(args)
        if args.url:
            socket_url(args.url)  # refuses a URL it cannot use before anything starts
    except (ValueError, OSError, yaml.YAMLError) as e:
        sys.stderr.write(f"soak: {e}\n")
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="mindmirror-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    job, failures, notes = None, [], []
    try:
        if args.url:
            url = args.url
        else:
            starting = PipelineJob(config, name="soak", out_dir=out, world_size=args.world_size)
            starting.start()  # stops what it started when it fails
            job, url = starting, starting.url
            notes.append(f"job: {job.world_size} rank(s), started in {job.startup_s:.1f} s; log {job.log_path}")
        ranks, world = find_ranks(urlsplit(url).port or (443 if url.startswith(("https", "wss")) else 80))
        sampler = RssSampler(ranks)
        sys.stderr.write(f"soak: {args.clients} sessions against {url} for {args.warmup:g} s warm-up + "
                         f"{args.duration:g} s; watching ranks {[r.rank for r in ranks]} (pids "
                         f"{[r.pid for r in ranks]})\n")
        records, start, end = asyncio.run(soak(args, url, sampler, notes))
    except (JobError, LookupError) as e:
        sys.stderr.write(f"soak: could not run: {e}\n")
        return 2
    finally:
        if job is not None:
            exit_ = job.stop()
            if not exit_.clean:
                failures.append(f"the job did not stop cleanly (exit {exit_.returncode}"
                                f"{', killed' if exit_.killed else ''}); see {job.log_path}")
    roles = roles_from(records)
    result = SoakResult(window_s=end - start, world_size=world, failures=dead_ranks(records) + failures, notes=notes,
                        sessions=[summarize_session(r, start, end) for r in records],
                        ranks=[summarize_rank(m, roles.get(rank, "?"), start) for rank, m in sampler.ranks.items()])
    judge(result, limits)
    (out / "soak.json").write_text(json.dumps(_finite(result.as_dict()), indent=1, allow_nan=False) + "\n")
    sys.stdout.write(format_report(result, limits))
    sys.stdout.write(f"Report: {out / 'soak.json'}\n")
    return 0 if result.passed else 1


def _finite(value):
    """``value`` with every NaN (a figure with no samples) as None, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
