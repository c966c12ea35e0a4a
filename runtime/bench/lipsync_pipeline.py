"""Section 'lipsync', its pipeline part: the real pipeline, started with the real launcher,
fed real speech by 1 and then 4 concurrent sessions.

Two layouts, each one job (``jobs.PipelineJob``), both with ``avatar_dir`` the folder of
avatars built for the section (``lipsync_inputs``); the avatars have no trained model, so
the mouth is the non-neural one (``MouthSynth``):

- ``configs/lipsync-local.yaml``: every stage a thread of one process, in-process links;
- ``configs/lipsync.yaml`` on 4 ranks (``torchrun --standalone``): rank 0 web server,
  speech and present, ranks 1-2 the two lip-sync replicas, rank 3 compositing
  (``placement: least_loaded``; where each avatar went is read from ``GET /models``).

Before measuring, a short warm-up talks through every avatar at once (loading each on its
replica, filling the compositors' caches). Then one run per session count, each session
its own WebSocket and avatar (``lipsync_session.talk``). Per run, one row: output FPS per
session and in total, latency as the page sees it and after the audio, frames lost, which
generator made each frame, bytes per frame on each hop, the job's CPU use.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import statistics
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from runtime.bench.jobs import REPO, PipelineJob
from runtime.bench.lipsync_inputs import AVATAR_SECONDS
from runtime.bench.lipsync_session import (
    AUDIO_WAIT_MS,
    LOOKAHEAD_MS,
    LOOKAHEAD_SAMPLES,
    STAGGER_S,
    expected_frames,
    first_frame_ms,
    hop_bytes,
    session_figures,
    stats_around,
    talk,
)
from runtime.bench.options import BenchOptions
from runtime.bench.progress import Progress
from runtime.bench.results import Column, PlotSpec, Target
from runtime.bench.speech import RATE
from runtime.bench.stats import percentile
from runtime.bench.sysmon import SysMonitor, Usage
from stages.lipsync.crop import INNER
from stages.server.config import ServerConfig

log = logging.getLogger(__name__)

PIPELINE_PART = "Pipeline: real launcher, espeak-ng speech at real-time pace (non-neural mouth)"
TALKERS_ANCHOR = "LiveTalking users report stutter beyond 2-3 talkers"

WARMUP_S = {False: 2.0, True: 1.0}
"""Seconds of the speech (from its start) every avatar's warm-up session sends."""
SESSIONS = (1, 4)
"""Concurrent sessions per run (``--set lipsync_sessions=[1,4,16]`` measures others)."""
MAX_SESSIONS = 64
"""Most sessions a run may have (the speech stage keeps 64 sessions' audio state)."""
SERVER_SESSIONS = ServerConfig().max_sessions
"""Pages the web server admits at once by default (8): a run with more raises it."""

LOCAL_CONFIG = REPO / "configs" / "lipsync-local.yaml"
DIST_CONFIG = REPO / "configs" / "lipsync.yaml"
DIST_RANKS = 4
"""configs/lipsync.yaml's layout: server+speech+present, two lip-sync replicas, compositing."""
HOP_PAIRS = (("speech", "lipsync"), ("lipsync", "composite"), ("composite", "present"))
"""The stage pairs whose bytes per frame the table shows, in pipeline order."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Layout:
    key: str
    name: str
    config_path: Path
    world_size: int


LAYOUTS = (Layout(key="local", name="1 process (lipsync-local.yaml)", config_path=LOCAL_CONFIG, world_size=1),
           Layout(key="ranks", name=f"{DIST_RANKS} ranks (lipsync.yaml)", config_path=DIST_CONFIG,
                  world_size=DIST_RANKS))


def session_counts(options: BenchOptions) -> tuple[int, ...]:
    """``SESSIONS``, or the counts of ``--set lipsync_sessions=N`` / ``=[N, M, ...]``."""
    value = options.extra.get("lipsync_sessions", SESSIONS)
    counts = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(counts, (list, tuple)) or not counts
            or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_SESSIONS for n in counts)):
        raise ValueError(f"lipsync_sessions: expected a session count or a list of them, each 1..{MAX_SESSIONS}; "
                         f"got {value!r}")
    return tuple(counts)


def pipeline_steps(options: BenchOptions) -> int:
    """Per layout: its start and warm-up, and one run per session count."""
    return len(LAYOUTS) * (1 + len(session_counts(options)))


def job_config(layout: Layout, root: Path, sessions: int = max(SESSIONS)) -> dict[str, Any]:
    """The layout's shipped config with both avatar folders pointed at ``root`` (the port
    comes from the job's ``--port 0``); the server admits ``sessions`` pages at once when
    that is more than its default."""
    config = yaml.safe_load(layout.config_path.read_text())
    config["lipsync"]["avatar_dir"] = str(root)
    config["composite"]["avatar_dir"] = str(root)
    config.pop("server", None)
    if sessions > SERVER_SESSIONS:
        config["server"] = {"max_sessions": sessions}
    return config


def pipeline_part(root: Path, avatars: list[str], pcm: np.ndarray, options: BenchOptions, progress: Progress,
                  details: dict[str, Any]) -> list[dict[str, Any]]:
    """Every layout's rows; none (and the steps passed) when ``pcm`` is not espeak-ng's speech."""
    if details["speech"]["source"] != "espeak-ng":
        details["pipeline_skipped"] = "needs espeak-ng for real speech (apt install espeak-ng)"
        for _ in range(pipeline_steps(options)):
            progress.step("lipsync: pipeline runs skipped, no espeak-ng")
        return []
    details["runs"], details["jobs"] = {}, {}
    rows = []
    for layout in LAYOUTS:
        rows += pipeline_rows(layout, root, avatars, pcm, options, progress, details)
    return rows


def pipeline_rows(layout: Layout, root: Path, avatars: list[str], pcm: np.ndarray, options: BenchOptions,
                  progress: Progress, details: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    progress.start(f"lipsync: starting {layout.name}")
    counts = session_counts(options)
    config = job_config(layout, root, max(max(counts), len(avatars)))
    with PipelineJob(config, name=f"lipsync-{layout.key}", out_dir=options.out_dir / "logs",
                     world_size=layout.world_size) as job:
        warm = pcm[:int(WARMUP_S[options.quick] * RATE) + LOOKAHEAD_SAMPLES]
        records, _ = asyncio.run(talk(job.port, warm, avatars, stats_after_s=0.0, settle_s=2.0))
        job_info: dict[str, Any] = {"startup_s": job.startup_s, "log": str(job.log_path),
                                    "warmup_first_frame_ms": {r.avatar: first_frame_ms(r) for r in records}}
        progress.step()
        for sessions in counts:
            chosen = [avatars[s % len(avatars)] for s in range(sessions)]
            progress.start(f"lipsync: {layout.name}, {sessions} session(s)")
            with SysMonitor(job.pids) as monitor:
                records, start = asyncio.run(talk(job.port, pcm, chosen))
            end = start + len(pcm) / RATE
            usage = monitor.summary(start, end)
            expected = expected_frames(len(pcm))
            figures = [session_figures(r, expected) for r in records]
            before, after = stats_around(records[0], start)
            hops = hop_bytes(before, after)
            row = run_row(layout, figures, hops, usage)
            rows.append(row)
            details["runs"][f"{layout.name}, {row['sessions_label']}"] = run_details(figures, hops, after, usage)
            progress.step()
        if layout.world_size > 1:
            job_info["placement"] = placement(job.port)
    job_info.update(stop_s=job.stop_s, clean_stop=job.exit.clean, returncode=job.exit.returncode)
    details["jobs"][layout.name] = job_info
    return rows


def placement(port: int) -> dict[str, list[int]]:
    """Avatar -> the lip-sync replicas holding it, from ``GET /models``."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/models", timeout=10) as reply:
            models = json.load(reply)
    except (OSError, ValueError) as e:
        log.warning("lipsync bench: GET /models failed: %s", e)
        return {}
    return {avatar: list(info.get("replicas") or []) for avatar, info in models.get("avatars", {}).items()}


def run_details(figures: list[dict[str, Any]], hops: dict[str, Any], stats: dict | None,
                usage: Usage | None) -> dict[str, Any]:
    """What the JSON keeps of one run beyond its row."""
    stats = stats or {}
    return {
        "sessions": [{key: value for key, value in f.items() if key not in ("latencies_ms", "after_audio_ms")}
                     | {"latencies_ms": [round(ms, 2) for ms in f["latencies_ms"]],
                        "after_audio_ms": [round(ms, 2) for ms in f["after_audio_ms"]]} for f in figures],
        "hops": hops,
        "compute_ms": {name: stage.get("compute_ms", {}) for name, stage in stats.get("stages", {}).items()},
        "mean_batch": {name: stage.get("mean_batch") for name, stage in stats.get("stages", {}).items()},
        "drops": stats.get("drops", {}),
        "server_latency_ms": stats.get("server_latency_ms", {}),
        "usage": None if usage is None else {"mean": usage.mean, "max": usage.max, "samples": usage.samples,
                                             "sampling_error": usage.sampling_error},
    }


# -- the table -------------------------------------------------------------------------------

def run_row(layout: Layout, figures: list[dict[str, Any]], hops: dict[str, Any], usage: Usage | None) -> dict[str, Any]:
    """The table row of one run (layout x sessions) from its sessions' figures. Keys whose
    figure could not be measured are left out (a missing figure prints '–')."""
    latencies = [ms for f in figures for ms in f["latencies_ms"]]
    after = [ms for f in figures for ms in f["after_audio_ms"]]
    fps = [f["fps"] for f in figures if not math.isnan(f["fps"])]
    generators: Counter = Counter()
    for f in figures:
        generators.update(f["generators"])
    sessions = len(figures)
    row: dict[str, Any] = {
        "part": PIPELINE_PART, "layout": layout.name, "layout_key": layout.key, "ranks": layout.world_size,
        "sessions": sessions, "sessions_label": f"{sessions} session{'s' if sessions > 1 else ''}",
        "avatars": len({f["avatar"] for f in figures}), "frames": sum(f["received"] for f in figures),
        "expected": sum(f["expected"] for f in figures), "lost": sum(f["lost"] for f in figures),
        "out_of_order": sum(f["out_of_order"] for f in figures), "lookahead_ms": LOOKAHEAD_MS,
        "generators": ", ".join(f"{name} {n}" for name, n in sorted(generators.items())) or "none",
        "errors": sum(len(f["errors"]) for f in figures)}
    if fps:
        row.update(fps_session=statistics.fmean(fps), fps_session_min=min(fps), fps_total=sum(fps))
    if latencies:
        row.update(p50_ms=percentile(latencies, 50), p95_ms=percentile(latencies, 95))
    if after:
        row.update(after_p50_ms=percentile(after, 50), after_p95_ms=percentile(after, 95))
    for source, target in HOP_PAIRS:
        pair = hops["pairs"].get(f"{source}->{target}")
        if pair is not None:
            row[f"kb_{source}_{target}"] = pair["bytes_per_message"] / 1000.0
    for key, figure in (("cpu_job_pct", "job_cpu_pct"), ("cpu_system_pct", "system_cpu_pct"),
                        ("cpu_other_pct", "other_cpu_pct")):
        if usage is not None and figure in usage.mean:
            row[key] = usage.mean[figure]
    return row


PIPELINE_COLUMNS = [
    Column(key="layout", header="layout"),
    Column(key="sessions", header="sessions"),
    Column(key="fps_session", header="FPS per session", fmt="{:.1f}"),
    Column(key="fps_total", header="FPS total", fmt="{:.1f}"),
    Column(key="p50_ms", header="latency p50 ms", fmt="{:.0f}"),
    Column(key="p95_ms", header="p95 ms", fmt="{:.0f}"),
    Column(key="lookahead_ms", header="of which look-ahead ms", fmt="{:.1f}"),
    Column(key="after_p50_ms", header="after audio p50 ms", fmt="{:.1f}"),
    Column(key="after_p95_ms", header="after audio p95 ms", fmt="{:.1f}"),
    Column(key="lost", header="frames lost"),
    Column(key="frames", header="frames back"),
    Column(key="generators", header="generators"),
    Column(key="kb_speech_lipsync", header="speech→lipsync kB/frame", fmt="{:.1f}"),
    Column(key="kb_lipsync_composite", header="lipsync→composite kB/frame", fmt="{:.1f}"),
    Column(key="kb_composite_present", header="composite→present kB/frame", fmt="{:.1f}"),
    Column(key="cpu_job_pct", header="job CPU % of 1 core", fmt="{:.0f}"),
    Column(key="cpu_system_pct", header="machine CPU %", fmt="{:.0f}"),
    Column(key="cpu_other_pct", header="others' CPU %", fmt="{:.0f}"),
]
PIPELINE_PLOTS = [
    PlotSpec(file="lipsync_pipeline_fps.png", title="Lip-sync pipeline: output FPS per session (25 = real time)",
             x="sessions_label", y="fps_session", series="layout", ylabel="frames per second"),
    PlotSpec(file="lipsync_pipeline_latency.png", title="Lip-sync pipeline: latency p50 as the page sees it",
             x="sessions_label", y="p50_ms", series="layout", ylabel="ms (look-ahead included)"),
    PlotSpec(file="lipsync_pipeline_after_audio.png", title="Lip-sync pipeline: p50 after the audio (processing)",
             x="sessions_label", y="after_p50_ms", series="layout", ylabel="ms"),
]


# -- targets and notes --------------------------------------------------------------------------

def pipeline_targets(rows: list[dict[str, Any]]) -> list[Target]:
    """Informational targets: the runs' pace beside the talkers anchor, and the latency split
    into the wait for the look-ahead's audio and the processing after it."""
    runs = [r for r in rows if r.get("part") == PIPELINE_PART]
    if runs:
        parts = [f"{r['layout']}, {r['sessions']} session{'s' if r['sessions'] > 1 else ''}: "
                 f"{r.get('fps_session', math.nan):.1f} FPS each, {r['lost']}/{r['expected']} lost" for r in runs]
        sessions = "; ".join(parts)
    else:
        sessions = "not measured: no pipeline run (see the notes)"
    first = next((r for r in runs if r["sessions"] == 1 and "p50_ms" in r), None)
    latency = ("not measured" if first is None else
               f"p50 {first['p50_ms']:.0f} ms ({first['layout']}, 1 session) = {AUDIO_WAIT_MS:.0f} ms until the "
               f"look-ahead's audio is sent ({LOOKAHEAD_MS:.1f} ms look-ahead in 20 ms chunks) + "
               f"{first['after_p50_ms']:.0f} ms after it (p50)")
    return [
        Target(name="lip-sync pipeline on this machine's CPU (non-neural mouth): 25 fps per talking session",
               goal=f"informational (25 FPS per session, nothing lost; anchor: {TALKERS_ANCHOR})",
               measured=sessions, met=None),
        Target(name="audio-to-lip latency as the page sees it (look-ahead included)",
               goal=f"report (README): look-ahead {LOOKAHEAD_MS:.1f} ms (audio_windows.lookahead_seconds()) + "
                    "processing", measured=latency, met=None),
    ]


def pipeline_notes(options: BenchOptions, details: dict[str, Any]) -> list[str]:
    """How the runs were made and what their figures mean, one line per job and per run;
    or why there were none."""
    if "pipeline_skipped" in details:
        return [f"Pipeline runs not measured: {details['pipeline_skipped']}."]
    speech_info = details["speech"]
    built = ", ".join(f"{a} {b['s']:.1f} s" if "s" in b else f"{a} FAILED ({b['error']})"
                      for a, b in details["avatar_build"].items())
    out = [
        (f"Pipeline: the real launcher (launch/mirror.py through runtime.bench.jobs.PipelineJob). "
         f"'{LAYOUTS[0].name}': every stage a thread of one process, in-process links (the bytes are what a "
         f"wire would carry; the links pass references), torch_threads 1. '{LAYOUTS[1].name}': torchrun "
         f"--standalone, gloo: rank 0 web server + speech + present, ranks 1-2 two lip-sync replicas "
         "(placement least_loaded, routing by avatar affinity), rank 3 compositing. avatar_dir: a temporary "
         f"folder with the avatars built here (prepare.build_avatar from the astronaut photo as is, mirrored, "
         f"shifted, zoomed; {AVATAR_SECONDS[options.quick]:g} s idle sway, the default astronaut 4 s): {built}. "
         "No avatar has a trained model, so every spoken frame is the non-neural mouth ('mouth-synth'); "
         "silent frames ('silence') get no patch and show the avatar's frame as is."),
        (f"Speech: espeak-ng \"{speech_info['text']}\", {speech_info['seconds']:.2f} s at 16 kHz with "
         f"{speech_info['lead_s']:g} s silence before and {speech_info['tail_s']:g} s after; streamed as 20 ms "
         "PCM16 chunks (binary kind 2) at real-time pace, each sent when its last sample would have been "
         "captured (a microphone's pace) and stamped with the page clock at its first sample. One WebSocket "
         f"per session, sessions {1000 * STAGGER_S:.0f} ms apart; session s shows avatar s of the list above. "
         f"Before measuring, each job got a warm-up: {WARMUP_S[options.quick]:g} s of the speech in one "
         "session per avatar at once (loads each avatar on its replica, fills the compositors' caches)."),
        (f"Latency = arrival - the frame's timestamp (the page clock at its first audio sample), what the page "
         f"measures. It includes the look-ahead: frame i needs audio up to {LOOKAHEAD_MS:.1f} ms past its first "
         "sample (stages.lipsync.audio_windows.lookahead_seconds(); 442.5-452.5 ms by i mod 5), which with "
         f"20 ms chunks is all sent {AUDIO_WAIT_MS:.0f} ms after it. 'after audio' = arrival - the moment the "
         "chunk completing the frame's look-ahead was sent: the pipeline's processing and transport. FPS per "
         "session = (frames back - 1) / (last arrival - first arrival), the mean over sessions; total = their "
         "sum. Frames lost = frames the audio sent should give (every frame whose look-ahead it covers) that "
         "never came."),
        ("Bytes per frame per hop: the growth over the run of the stats message's per-link counters "
         "(bytes_sent / messages_sent, summed over the replicas of each stage pair; tensor payload only, no "
         "meta or headers). speech→lipsync carries the frame's new encoder inputs (80x16 float32 mel "
         f"windows); lipsync→composite the {INNER}x{INNER}x3 uint8 mouth patch (307,200 B) for a spoken frame "
         "and nothing for a silent one, so its column is the average over both; composite→present the JPEG. "
         "The per-run lines below also quote the runtime's compute, hop and server-latency percentiles: those "
         "are windows of the newest 512 samples, so a short run's may hold the run before it (the warm-up's "
         "cold avatar loads included)."),
    ]
    for name, job in details["jobs"].items():
        warm = ", ".join(f"{a} {ms:.0f} ms" for a, ms in job["warmup_first_frame_ms"].items() if ms is not None)
        line = (f"{name}: started in {job['startup_s']:.1f} s, stopped in {job['stop_s']:.1f} s; warm-up first "
                f"frame latency per avatar (cold: includes loading it): {warm or 'none came'}")
        if job.get("placement"):
            by_replica: dict[int, list[str]] = {}
            for avatar, replicas in sorted(job["placement"].items()):
                for replica in replicas:
                    by_replica.setdefault(replica, []).append(avatar)
            line += "; avatars on the lip-sync replicas (GET /models): " + "; ".join(
                f"replica {r}: {', '.join(a)}" for r, a in sorted(by_replica.items()))
        if not job["clean_stop"]:
            line += f"; the job did not stop cleanly (exit {job['returncode']}), see {job['log']}"
        out.append(line + ".")
    for label, run in details["runs"].items():
        out.append(f"{label}: {breakdown(run)}")
    return out


def breakdown(run: dict[str, Any]) -> str:
    """One line: per-stage compute p50, per-link bytes and hop p50, drops, errors."""
    stages = ", ".join(f"{name} {figures.get('p50', math.nan):.2f}" for name, figures in run["compute_ms"].items())
    links = ", ".join(f"{name} {link['messages']} x {link['bytes_per_message'] / 1000:.1f} kB"
                      + (f" (hop p50 {link['hop_p50_ms']:.2f} ms)" if link.get("hop_p50_ms") is not None else "")
                      for name, link in run["hops"]["links"].items() if link["messages"])
    drops = ", ".join(f"{reason} {n}" for reason, n in run["drops"].items() if n) or "none"
    errors = [e for s in run["sessions"] for e in s["errors"]]
    server = run.get("server_latency_ms") or {}
    text = f"compute p50 ms: {stages or 'none'}; links: {links or 'none'}; drops since start: {drops}"
    if server.get("p50") is not None:
        text += (f"; on the server, from the chunk completing a frame's audio to the frame going out: p50 "
                 f"{server['p50']:.1f} ms, p95 {server.get('p95', math.nan):.1f} ms")
    if errors:
        text += f"; {len(errors)} error message(s), e.g. {'; '.join(errors[:2])}"
    return text + "."
