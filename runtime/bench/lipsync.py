"""Section 'lipsync': the lip-sync pipeline run for real on this machine, what its parts cost
per frame, and (on a CUDA host) the 328 U-Net on the GPU.

Pipeline (CPU; the avatars have no trained model, so the mouth is the non-neural one,
``MouthSynth``). Two layouts, each started with the real launcher (``jobs.PipelineJob``):

- ``configs/lipsync-local.yaml``: every stage a thread of one process, in-process links;
- ``configs/lipsync.yaml`` on 4 ranks (``torchrun --standalone``): rank 0 web server,
  speech and present, ranks 1-2 the two lip-sync replicas, rank 3 compositing;

both with ``avatar_dir`` a temporary folder holding four avatars built here from the
astronaut photo (as is, mirrored, shifted, zoomed: ``prepare.build_avatar``), so sessions
show distinct avatars and the 4-rank run spreads them over its two lip-sync replicas
(``placement: least_loaded``; where each went is read from ``GET /models``).

Each job is fed real speech (espeak-ng, 16 kHz) by 1 and then 4 concurrent sessions,
each its own WebSocket and avatar, as the page sends a microphone: 20 ms PCM16 chunks
(binary kind 2) at real-time pace, each sent when its last sample would have been
captured, stamped with the page clock at its first sample. Before measuring, a short
warm-up talks through every avatar at once (loading each on its replica, filling the
compositors' caches). Per run:

- output FPS per session (frames back over the time they took to arrive) and in total;
- latency as the page sees it: arrival - the frame's timestamp (the page clock at the
  frame's first sample). It holds the look-ahead: frame i needs audio up to
  ``audio_windows.lookahead_seconds()`` (452.5 ms) past its first sample, all sent 460 ms
  after it with 20 ms chunks. 'after audio' = arrival - the moment the chunk completing
  frame i's look-ahead was sent: the pipeline's own processing and transport;
- frames lost (of those the audio sent makes: ``expected_frames``), which generator
  made each frame (the ``vision`` message's ``lipsync.generator``), the job's CPU use;
- bytes per frame on each hop: the growth over the run of the ``stats`` message's
  per-link counters (``runtime.aggregate``), bytes_sent / messages_sent per stage pair.

Micro figures, in this process with one torch and one OpenCV thread (a rank's default
share): compositing a 640x480 frame (``compose_frame``, hard paste and feathered), its
JPEG encoding, the compositor's whole per-frame work; the mouth patch's bytes per frame as
uint8 / float16 / float32 and the compositor's conversion of each; the non-neural mouth;
the half- and full-width 328 U-Net at batch 1 with random weights (timing only); the audio
front end (streaming mel, VAD, encoder windows) per 20 ms chunk.

GPU (CUDA only; a note says why not otherwise): ``lipsync_gpu.gpu_part``, merged into
this section's rows and targets.

Rows carry a ``part`` key, so the report prints one table per part with its own columns.
Figures are printed, never judged against a bar of this machine's own: the targets are
informational, with the anchors beside them (the seeds' 15-18 ms per frame and 58 FPS per
process; LiveTalking users report stutter beyond 2-3 talkers), plus the GPU part's three.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import shutil
import subprocess
import tempfile
import time
import urllib.request
import wave
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import psutil
import torch
import yaml
from websockets.asyncio.client import ClientConnection, connect

from runtime.bench import lipsync_gpu
from runtime.bench.jobs import REPO, PipelineJob
from runtime.bench.options import BenchOptions
from runtime.bench.progress import Progress
from runtime.bench.results import Column, PlotSpec, SectionResult, Target
from runtime.bench.stage_harness import ASTRONAUT, Timing, time_calls
from runtime.bench.stats import median, percentile
from runtime.bench.sysmon import SysMonitor, Usage
from stages.lipsync.audio_windows import StreamingEncoderInputs, lookahead_samples, lookahead_seconds
from stages.lipsync.avatar import AvatarStore
from stages.lipsync.composite_stage import patch_rgb
from stages.lipsync.compositing import compose_frame
from stages.lipsync.crop import INNER, cut_crop
from stages.lipsync.mel import StreamingMel
from stages.lipsync.mouth_synth import MouthSynth
from stages.lipsync.prepare import DEFAULT_AVATAR, build_avatar, ensure_default_avatar
from stages.lipsync.speech_activity import SpeechActivity
from stages.lipsync.unet import AUDIO_CHANNELS, AUDIO_SIZE, IMAGE_CHANNELS, SIZE, LipSyncUNet, parameter_count
from stages.server import protocol
from stages.server.config import ServerConfig
from stages.server.protocol import BinaryFrame, Kind

log = logging.getLogger(__name__)

TITLE = "Lip-sync: the pipeline on this machine, cost per frame of its parts, the U-Net on a GPU"
RATE = 16_000
CHUNK = 320
"""Samples per audio chunk (20 ms), what the page sends."""
FRAME_SAMPLES = 640
"""Audio samples per video frame (25 fps)."""
LOOKAHEAD_MS = 1000.0 * lookahead_seconds()
"""The speech stage's look-ahead (452.5 ms): audio past a frame's first sample it must have."""
AUDIO_WAIT_MS = 1000.0 * math.ceil(max(lookahead_samples(i) for i in range(25)) / CHUNK) * CHUNK / RATE
"""When the page sends 20 ms chunks as they fill, every frame's look-ahead is complete this
long (460 ms) after its first sample: the look-ahead rounded up to whole chunks."""

SPEECH = {False: ("Hello there. This is a benchmark of the lip sync pipeline.", 0.6, 0.9),
          True: ("Hello there.", 0.3, 0.6)}
"""(text, lead silence s, tail silence s) by ``options.quick``. The tail must exceed the
look-ahead, or the last spoken frames never come out."""
WARMUP_S = {False: 2.0, True: 1.0}
"""Seconds of the speech (from its start) every avatar's warm-up session sends."""
AVATAR_SECONDS = {False: 2.0, True: 1.0}
"""Idle-sway length of the avatars built here (the default astronaut is always 4 s)."""
SESSIONS = (1, 4)
"""Concurrent sessions per run (``--set lipsync_sessions=[1,4,16]`` measures others)."""
MAX_SESSIONS = 64
"""Most sessions a run may have (the speech stage keeps 64 sessions' audio state)."""
SERVER_SESSIONS = ServerConfig().max_sessions
"""Pages the web server admits at once by default (8): a run with more raises it."""
STAGGER_S = 0.01
"""Session s starts s x this after session 0 (real pages are not in step)."""
SETTLE_S = 3.0
"""After the last chunk, how long to wait for frames still missing."""
STATS_AFTER_S = 0.6
"""The figures of a run come from a stats message sent at least this long after its last
frame: the ranks' heartbeats (every 0.5 s) have reported everything by then."""

LOCAL_CONFIG = REPO / "configs" / "lipsync-local.yaml"
DIST_CONFIG = REPO / "configs" / "lipsync.yaml"
DIST_RANKS = 4
"""configs/lipsync.yaml's layout: server+speech+present, two lip-sync replicas, compositing."""
HOP_PAIRS = (("speech", "lipsync"), ("lipsync", "composite"), ("composite", "present"))

PIPELINE_PART = "Pipeline: real launcher, espeak-ng speech at real-time pace (non-neural mouth)"
MICRO_PART = "CPU, in this process (1 torch and 1 OpenCV thread): cost and bytes per frame"
GPU_PART = "GPU: 328 U-Net, random weights (timing only)"

MICRO_TIMING = {False: Timing(warmup=3, min_calls=20, budget_s=0.7, max_calls=500),
                True: Timing(warmup=1, min_calls=3, budget_s=0.0, max_calls=3)}
UNET_TIMING = {False: Timing(warmup=1, min_calls=3, budget_s=1.5, max_calls=20),
               True: Timing(warmup=1, min_calls=2, budget_s=0.0, max_calls=2)}
UNET_WIDTHS = (0.5, 1.0)
JPEG_QUALITY = 80
"""The lip-sync configs' ``runtime.jpeg_quality``."""
FEATHER_PX = 6
"""``composite.feather_px`` default."""
OPENING = 0.6
"""How far the non-neural mouth is opened for its timing."""
PATCH_DTYPES = (("uint8", torch.uint8, "default"), ("float16", torch.float16, ""),
                ("float32", torch.float32, "the seeds' contract"))
MICRO_STEPS = 6
PLOT_LABELS = {"paste": "paste", f"feather {FEATHER_PX}": "feather", "JPEG": "JPEG", "composite": "composite",
               "mouth-synth": "mouth", "U-Net half": "U-Net 0.5", "U-Net full": "U-Net 1", "audio chunk": "audio"}
"""Micro rows in the chart (``micro_id`` -> short bar label); the patch conversions stay in the table."""
SEEDS_ANCHOR = "the seeds: 15-18 ms per frame, 58 FPS per process (U-Net on an RTX 6000 Ada)"
TALKERS_ANCHOR = "LiveTalking users report stutter beyond 2-3 talkers"


@dataclass(frozen=True, kw_only=True, slots=True)
class Layout:
    key: str
    name: str
    config_path: Path
    world_size: int


LAYOUTS = (Layout(key="local", name="1 process (lipsync-local.yaml)", config_path=LOCAL_CONFIG, world_size=1),
           Layout(key="ranks", name=f"{DIST_RANKS} ranks (lipsync.yaml)", config_path=DIST_CONFIG,
                  world_size=DIST_RANKS))


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def session_counts(options: BenchOptions) -> tuple[int, ...]:
    """``SESSIONS``, or the counts of ``--set lipsync_sessions=N`` / ``=[N, M, ...]``."""
    value = options.extra.get("lipsync_sessions", SESSIONS)
    counts = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(counts, (list, tuple)) or not counts
            or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_SESSIONS for n in counts)):
        raise ValueError(f"lipsync_sessions: expected a session count or a list of them, each 1..{MAX_SESSIONS}; "
                         f"got {value!r}")
    return tuple(counts)


def steps(options: BenchOptions) -> int:
    """Avatars and speech, per layout its start and warm-up and one run per session count,
    the micro figures, the GPU part."""
    return 1 + len(LAYOUTS) * (1 + len(session_counts(options))) + MICRO_STEPS + lipsync_gpu.gpu_steps(options.quick)


def run(options: BenchOptions, progress: Progress) -> SectionResult:
    details: dict[str, Any] = {"load_avg_1min": {"before": psutil.getloadavg()[0]}, "lookahead_ms": LOOKAHEAD_MS,
                               "audio_wait_ms": AUDIO_WAIT_MS}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mm-bench-lipsync-") as scratch:
        root = Path(scratch) / "avatars"
        progress.start("lipsync: avatars and speech")
        started = time.monotonic()
        avatars, details["avatar_build"] = build_avatars(root, Path(scratch), AVATAR_SECONDS[options.quick])
        details["avatars_s"] = time.monotonic() - started
        pcm, details["speech"] = speech(options.quick)
        progress.step()
        if details["speech"]["source"] == "espeak-ng":
            details["runs"], details["jobs"] = {}, {}
            for layout in LAYOUTS:
                rows += pipeline_rows(layout, root, avatars, pcm, options, progress, details)
        else:
            details["pipeline_skipped"] = "needs espeak-ng for real speech (apt install espeak-ng)"
            for _ in range(len(LAYOUTS) * (1 + len(session_counts(options)))):
                progress.step("lipsync: pipeline runs skipped, no espeak-ng")
        rows += micro_rows(AvatarStore(root), pcm, options.quick, progress, details)
    gpu_rows, gpu = gpu_part(options, progress, details)
    rows += gpu_rows
    details["load_avg_1min"]["after"] = psutil.getloadavg()[0]
    targets = cpu_targets(rows) + gpu_targets(gpu_rows, gpu, details)
    plots = PLOTS + (lipsync_gpu.PLOTS if gpu_rows else [])
    return SectionResult(name="lipsync", title=TITLE, columns=COLUMNS, rows=rows, targets=targets,
                         notes=notes(options, rows, details, gpu), plots=plots, details=details)


# -- avatars and speech --------------------------------------------------------------------

def avatar_variants() -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Avatar id -> how its photo is made from the astronaut's (BGR): distinct pictures of
    one face that MTCNN still finds."""
    def shifted(image: np.ndarray) -> np.ndarray:
        return cv2.warpAffine(image, np.float32([[1, 0, 48], [0, 1, 16]]), image.shape[1::-1],
                              borderMode=cv2.BORDER_REFLECT)

    def zoomed(image: np.ndarray) -> np.ndarray:
        matrix = cv2.getRotationMatrix2D((280.0, 150.0), 0.0, 1.15)
        return cv2.warpAffine(image, matrix, image.shape[1::-1], borderMode=cv2.BORDER_REFLECT)

    return {"mirrored": lambda image: cv2.flip(image, 1), "shifted": shifted, "zoomed": zoomed}


def build_avatars(root: Path, scratch: Path, seconds: float) -> tuple[list[str], dict[str, Any]]:
    """The default avatar and the variants under ``root``; returns the ids that exist (a
    variant whose build fails is left out and reported) and what each build took."""
    built: dict[str, Any] = {}
    started = time.monotonic()
    ensure_default_avatar(root)
    built[DEFAULT_AVATAR] = {"s": time.monotonic() - started}
    photo = cv2.imread(str(ASTRONAUT))
    if photo is None:
        raise FileNotFoundError(f"benchmark fixture missing or unreadable: {ASTRONAUT}")
    ids = [DEFAULT_AVATAR]
    for avatar, make in avatar_variants().items():
        path = scratch / f"{avatar}.jpg"
        cv2.imwrite(str(path), make(photo))
        started = time.monotonic()
        try:
            build_avatar(image=path, video=None, avatar=avatar, root=root, seconds=seconds)
        except (ValueError, FileNotFoundError) as e:
            log.warning("lipsync bench: avatar %s could not be built: %s", avatar, e)
            built[avatar] = {"error": f"{type(e).__name__}: {e}"}
            continue
        built[avatar] = {"s": time.monotonic() - started}
        ids.append(avatar)
    return ids, built


def espeak_speech(text: str, lead_s: float, tail_s: float) -> np.ndarray:
    """``text`` spoken by espeak-ng as int16 mono 16 kHz between stretches of digital silence."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", "en", "-s", "150", "-w", str(path), text], check=True,
                       capture_output=True, timeout=60)
        with wave.open(str(path)) as wav:
            rate, raw = wav.getframerate(), wav.readframes(wav.getnframes())
    voice = np.frombuffer(raw, np.int16).astype(np.float64)
    times = np.arange(int(len(voice) * RATE / rate)) / RATE
    resampled = np.interp(times, np.arange(len(voice)) / rate, voice)  # espeak's 22050 Hz -> 16 kHz
    pcm = np.concatenate([np.zeros(int(lead_s * RATE)), resampled, np.zeros(int(tail_s * RATE))])
    return pcm.round().clip(-32768, 32767).astype(np.int16)


def synthetic_speech(seconds: float) -> np.ndarray:
    """A voiced, syllable-paced stand-in for speech (harmonics of 140 Hz, 4 Hz envelope),
    for the audio front end's timing when espeak-ng is missing."""
    t = np.arange(int(seconds * RATE)) / RATE
    voice = sum(np.sin(2 * np.pi * 140.0 * k * t) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * 4.0 * t), 0.0, None)
    return (3000.0 * voice * envelope).round().clip(-32768, 32767).astype(np.int16)


def speech(quick: bool) -> tuple[np.ndarray, dict[str, Any]]:
    text, lead, tail = SPEECH[quick]
    if have_espeak():
        pcm = espeak_speech(text, lead, tail)
        source = "espeak-ng"
    else:
        pcm = synthetic_speech(lead + 1.5 + tail)
        source = "synthetic (no espeak-ng)"
    return pcm, {"source": source, "text": text if source == "espeak-ng" else None, "seconds": len(pcm) / RATE,
                 "lead_s": lead, "tail_s": tail}


def expected_frames(samples: int) -> int:
    """Frames a session sending ``samples`` samples gets back: every frame i whose look-ahead
    the audio covers (``640 i + lookahead_samples(i) <= samples``); the last ~0.45 s of
    frames wait for audio that never comes."""
    count = 0
    while FRAME_SAMPLES * count + lookahead_samples(count) <= samples:
        count += 1
    return count


def enabling_chunk(frame: int) -> int:
    """The chunk whose arrival completes frame ``frame``'s look-ahead."""
    return (FRAME_SAMPLES * frame + lookahead_samples(frame) - 1) // CHUNK


# -- a talking session (the page's stand-in) ------------------------------------------------

@dataclass(kw_only=True)
class SessionRecord:
    """What one session sent and got back (monotonic seconds; page clock = monotonic ms)."""

    avatar: str
    chunk_sent: list[float] = field(default_factory=list)
    """When each chunk went out."""
    arrivals: list[tuple[int, float, float, int]] = field(default_factory=list)
    """(frame id, arrival s, client_ts ms, JPEG bytes) of each output frame, in arrival order."""
    visions: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Frame id -> the ``lipsync`` part of its ``vision`` message."""
    stats: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    configs: list[dict[str, Any]] = field(default_factory=list)


async def _read(ws: ClientConnection, record: SessionRecord) -> None:
    async for message in ws:
        now = time.monotonic()
        if isinstance(message, bytes):
            frame = protocol.decode_frame(message)
            if frame.kind is Kind.OUTPUT_FRAME:
                record.arrivals.append((frame.frame_id, now, frame.client_ts, len(frame.payload)))
            continue
        text = json.loads(message)
        kind, payload = text.get("type"), text.get("payload") or {}
        if kind == protocol.VISION:
            record.visions[int(payload.get("frame_id", -1))] = payload.get("lipsync") or {}
        elif kind == protocol.STATS:
            record.stats.append((now, payload))
        elif kind == protocol.ERROR:
            record.errors.append(f"{payload.get('code')}: {payload.get('message')}")
        elif kind == protocol.CONFIG_CURRENT:
            record.configs.append(payload)


async def _wait(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def _select(ws: ClientConnection, record: SessionRecord) -> None:
    """Choose the session's avatar; RuntimeError if the server refuses it."""
    await ws.send(protocol.encode_message(protocol.AVATAR_SELECT, {"id": record.avatar}))
    chosen = await _wait(lambda: record.errors or any(c.get("avatar") == record.avatar for c in record.configs), 15.0)
    if record.errors or not chosen:
        raise RuntimeError(f"avatar {record.avatar!r} was not selected: {record.errors or 'no answer in 15 s'}")


async def _send_audio(ws: ClientConnection, record: SessionRecord, pcm: np.ndarray, t0: float) -> None:
    """``pcm`` in 20 ms chunks, chunk k sent when its last sample would have been captured
    (t0 + its end), stamped with the page clock at its first sample."""
    for k, first in enumerate(range(0, len(pcm), CHUNK)):
        chunk = pcm[first:first + CHUNK]
        await asyncio.sleep(max(0.0, t0 + (first + len(chunk)) / RATE - time.monotonic()))
        await ws.send(protocol.encode_frame(BinaryFrame(kind=Kind.AUDIO_CHUNK, frame_id=k,
                                                        client_ts=1000.0 * (t0 + first / RATE),
                                                        payload=chunk.astype("<i2").tobytes())))
        record.chunk_sent.append(time.monotonic())


async def talk(port: int, pcm: np.ndarray, avatars: list[str], *, stagger_s: float = STAGGER_S,
               settle_s: float = SETTLE_S, stats_after_s: float = STATS_AFTER_S) -> tuple[list[SessionRecord], float]:
    """One session per entry of ``avatars`` (each its own WebSocket), all sending ``pcm``;
    returns the records and the time session 0 started. Waits for every expected frame
    (at most ``settle_s`` after the audio ends), then for a stats message sent at least
    ``stats_after_s`` after the last frame."""
    url = f"ws://127.0.0.1:{port}/ws"
    records = [SessionRecord(avatar=avatar) for avatar in avatars]
    expected = expected_frames(len(pcm))
    async with contextlib.AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(connect(url, compression=None, max_size=None, open_timeout=10))
                   for _ in records]
        readers = [asyncio.create_task(_read(ws, record)) for ws, record in zip(sockets, records)]
        try:
            for ws, record in zip(sockets, records):
                await _select(ws, record)
            await _wait(lambda: bool(records[0].stats), 3.0)  # the counters before the run
            start = time.monotonic() + 0.05
            await asyncio.gather(*(_send_audio(ws, record, pcm, start + s * stagger_s)
                                   for s, (ws, record) in enumerate(zip(sockets, records))))

            def complete() -> bool:
                return all(len({a[0] for a in r.arrivals}) >= expected for r in records)

            await _wait(complete, settle_s)
            last = max((a[1] for r in records for a in r.arrivals), default=time.monotonic())
            await _wait(lambda: records[0].stats and records[0].stats[-1][0] >= last + stats_after_s,
                        stats_after_s + 2.0)
        finally:
            for reader in readers:
                reader.cancel()
    for reader in readers:  # a reader that failed (a bad message) fails the run
        if reader.done() and not reader.cancelled() and reader.exception() is not None:
            raise reader.exception()
    return records, start


# -- figures of a run (pure) -----------------------------------------------------------------

def session_figures(record: SessionRecord, expected: int) -> dict[str, Any]:
    """One session's figures: frames back / lost / out of order, FPS, latency samples as
    the page sees them and after the audio, generators, JPEG bytes."""
    ids = [a[0] for a in record.arrivals]
    unique = set(ids)
    latencies = [1000.0 * at - ts for _, at, ts, _ in record.arrivals]
    after_audio = []
    for frame, at, _, _ in record.arrivals:
        k = enabling_chunk(frame)
        if k < len(record.chunk_sent):
            after_audio.append(1000.0 * (at - record.chunk_sent[k]))
    times = [a[1] for a in record.arrivals]
    span = max(times) - min(times) if len(times) > 1 else 0.0
    generators = Counter(str(record.visions.get(i, {}).get("generator", "unknown")) for i in unique)
    return {"avatar": record.avatar, "received": len(unique), "expected": expected,
            "lost": max(0, expected - len(unique & set(range(expected)))),
            "out_of_order": sum(1 for a, b in itertools.pairwise(ids) if b <= a),
            "fps": (len(times) - 1) / span if span > 0 else math.nan,
            "latencies_ms": latencies, "after_audio_ms": after_audio, "generators": dict(generators),
            "avatars_shown": sorted({str(v.get("avatar")) for v in record.visions.values()}),
            "jpeg_bytes": median([float(a[3]) for a in record.arrivals]), "errors": list(record.errors)}


def link_pair(name: str) -> tuple[str, str] | None:
    """'speech#0->lipsync#1' -> ('speech', 'lipsync'); None for a name of another shape."""
    source, sep, target = name.partition("->")
    if not sep:
        return None
    return source.partition("#")[0], target.partition("#")[0]


def hop_bytes(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Per link of ``after['hops']``: messages and bytes sent between two stats messages
    (``before`` None: since the job started), bytes per message, hop p50; and per stage
    pair ('speech->lipsync', ...) the same summed over its links (replicas)."""
    start = (before or {}).get("hops", {})
    links, pairs = {}, {}
    for name, link in (after or {}).get("hops", {}).items():
        messages = link.get("messages_sent", 0) - start.get(name, {}).get("messages_sent", 0)
        sent = link.get("bytes_sent", 0) - start.get(name, {}).get("bytes_sent", 0)
        links[name] = {"messages": messages, "bytes": sent, "bytes_per_message": sent / messages if messages else None,
                       "hop_p50_ms": link.get("hop_ms", {}).get("p50")}
        pair = link_pair(name)
        if pair is not None and messages:
            total = pairs.setdefault(f"{pair[0]}->{pair[1]}", {"messages": 0, "bytes": 0, "links": 0})
            total["messages"] += messages
            total["bytes"] += sent
            total["links"] += 1
    for total in pairs.values():
        total["bytes_per_message"] = total["bytes"] / total["messages"]
    return {"links": links, "pairs": pairs}


def stats_around(record: SessionRecord, start: float) -> tuple[dict | None, dict | None]:
    """The last stats message before ``start`` and the last one received."""
    before = [payload for at, payload in record.stats if at < start]
    return (before[-1] if before else None), (record.stats[-1][1] if record.stats else None)


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
        row.update(fps_session=statistics_mean(fps), fps_session_min=min(fps), fps_total=sum(fps))
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


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values)


# -- pipeline runs ---------------------------------------------------------------------------

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


def pipeline_rows(layout: Layout, root: Path, avatars: list[str], pcm: np.ndarray, options: BenchOptions,
                  progress: Progress, details: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    progress.start(f"lipsync: starting {layout.name}")
    counts = session_counts(options)
    config = job_config(layout, root, max(max(counts), len(avatars)))
    with PipelineJob(config, name=f"lipsync-{layout.key}", out_dir=options.out_dir / "logs",
                     world_size=layout.world_size) as job:
        warm = pcm[:int(WARMUP_S[options.quick] * RATE) + expected_tail()]
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


def expected_tail() -> int:
    """Samples of audio past a stretch's end that bring out its last frames (the look-ahead)."""
    return max(lookahead_samples(i) for i in range(25))


def first_frame_ms(record: SessionRecord) -> float | None:
    """Latency of a session's first frame (a cold avatar pays its load here)."""
    if not record.arrivals:
        return None
    _, at, ts, _ = record.arrivals[0]
    return 1000.0 * at - ts


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


# -- micro figures ---------------------------------------------------------------------------

def micro_rows(store: AvatarStore, pcm: np.ndarray, quick: bool, progress: Progress,
               details: dict[str, Any]) -> list[dict[str, Any]]:
    """Every in-process figure, with one torch and one OpenCV thread (restored after)."""
    threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        bench = MicroBench(store, MICRO_TIMING[quick], UNET_TIMING[quick], progress)
        rows = bench.compositing() + bench.patches() + bench.mouth() + bench.unets() + bench.audio(pcm)
        details["micro"] = bench.details
        return rows
    finally:
        torch.set_num_threads(threads[0])
        cv2.setNumThreads(threads[1])


class MicroBench:
    """The micro figures on the default avatar's first frame."""

    def __init__(self, store: AvatarStore, timing: Timing, unet_timing: Timing, progress: Progress) -> None:
        self.timing, self.unet_timing, self.progress = timing, unet_timing, progress
        manifest = store.manifest(DEFAULT_AVATAR)
        self.frame = store.read_frame(DEFAULT_AVATAR, 0)
        self.rect = store.crop_rects(DEFAULT_AVATAR)[0]
        self.crop = cut_crop(self.frame, self.rect)
        self.mouth_synth = MouthSynth(manifest.mouth)
        self.patch = self.mouth_synth.render(self.crop, OPENING)
        self.details: dict[str, Any] = {"frame": list(self.frame.shape), "rect": [int(v) for v in self.rect],
                                        "timing": {"warmup": timing.warmup, "min_calls": timing.min_calls,
                                                   "budget_s": timing.budget_s},
                                        "unet_timing": {"warmup": unet_timing.warmup,
                                                        "min_calls": unet_timing.min_calls,
                                                        "budget_s": unet_timing.budget_s}}

    def _time(self, call: Callable[[], Any], timing: Timing | None = None) -> tuple[float, int]:
        samples = time_calls(lambda _: call(), lambda: None, torch.device("cpu"), timing or self.timing)
        return median(samples), len(samples)

    def _row(self, what: str, short: str, call: Callable[[], Any] | None = None, *, per_frame: bool = True,
             bytes_frame: int | None = None, timing: Timing | None = None) -> dict[str, Any]:
        row: dict[str, Any] = {"part": MICRO_PART, "what": what, "micro_id": short}
        if short in PLOT_LABELS:
            row["micro"] = PLOT_LABELS[short]
        if call is not None:
            ms, calls = self._time(call, timing)
            row.update(ms=ms, calls=calls)
            if per_frame:
                row["fps_core"] = 1000.0 / ms
        if bytes_frame is not None:
            row["bytes_frame"] = bytes_frame
        return row

    def _encode(self, rgb: np.ndarray) -> bytes:
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        return jpeg.tobytes()

    def compositing(self) -> list[dict[str, Any]]:
        self.progress.start("lipsync: compositing")
        h, w = self.frame.shape[:2]
        composed = compose_frame(self.frame, self.rect, self.patch, FEATHER_PX)
        jpeg = self._encode(composed)
        patch_tensor = torch.from_numpy(np.ascontiguousarray(self.patch[..., ::-1])).permute(2, 0, 1).contiguous()

        def composite() -> bytes:  # what CompositeStage does per frame with a patch
            return self._encode(compose_frame(self.frame, self.rect, patch_rgb(patch_tensor), FEATHER_PX))

        rows = [self._row(f"compose_frame {w}x{h}, hard paste (feather 0)", "paste",
                          lambda: compose_frame(self.frame, self.rect, self.patch, 0)),
                self._row(f"compose_frame {w}x{h}, feather {FEATHER_PX} (default)", f"feather {FEATHER_PX}",
                          lambda: compose_frame(self.frame, self.rect, self.patch, FEATHER_PX)),
                self._row(f"JPEG encode {w}x{h}, quality {JPEG_QUALITY} (the output frame)", "JPEG",
                          lambda: self._encode(composed), bytes_frame=len(jpeg)),
                self._row(f"composite stage per frame: patch in, feather {FEATHER_PX}, JPEG out", "composite",
                          composite, bytes_frame=len(jpeg))]
        self.details["jpeg_bytes"] = len(jpeg)
        self.progress.step()
        return rows

    def patches(self) -> list[dict[str, Any]]:
        """The mouth patch as each ``patch_dtype`` sends it, and the compositor's conversion
        of it back to an RGB uint8 image."""
        self.progress.start("lipsync: mouth patch bytes")
        bgr = torch.from_numpy(np.ascontiguousarray(self.patch[..., ::-1])).permute(2, 0, 1).contiguous()
        rows = []
        for name, dtype, remark in PATCH_DTYPES:
            tensor = bgr if dtype == torch.uint8 else (bgr.to(dtype) / 255.0)
            nbytes = tensor.numel() * tensor.element_size()
            if nbytes != INNER * INNER * 3 * tensor.element_size():
                raise RuntimeError(f"patch of {nbytes} bytes; expected {INNER}x{INNER}x3 elements")
            label = f"mouth patch {INNER}x{INNER}x3 as {name}{f' ({remark})' if remark else ''}: to RGB uint8"
            rows.append(self._row(label, f"patch {name}", lambda t=tensor: patch_rgb(t), bytes_frame=nbytes))
        self.progress.step()
        return rows

    def mouth(self) -> list[dict[str, Any]]:
        self.progress.start("lipsync: non-neural mouth")
        row = self._row(f"non-neural mouth (MouthSynth.render, opening {OPENING:g})", "mouth-synth",
                        lambda: self.mouth_synth.render(self.crop, OPENING))
        self.progress.step()
        return [row]

    def unets(self) -> list[dict[str, Any]]:
        rows = []
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(1, IMAGE_CHANNELS, SIZE, SIZE, generator=generator)
        audio = torch.randn(1, AUDIO_CHANNELS, AUDIO_SIZE, AUDIO_SIZE, generator=generator)
        self.details["unet_params"] = {}
        for width in UNET_WIDTHS:
            name = "full" if width == 1.0 else "half"
            self.progress.start(f"lipsync: U-Net 328, {name} width, CPU")
            torch.manual_seed(0)
            model = LipSyncUNet(width=width).eval().requires_grad_(False)
            self.details["unet_params"][name] = parameter_count(model)

            def forward(model: LipSyncUNet = model) -> torch.Tensor:
                with torch.inference_mode():
                    return model(x, audio)

            rows.append(self._row(f"U-Net 328, {name} width ({width:g}), batch 1, random weights (timing only)",
                                  f"U-Net {name}", forward, timing=self.unet_timing))
            del model
            self.progress.step()
        return rows

    def audio(self, pcm: np.ndarray) -> list[dict[str, Any]]:
        """The speech stage's per-chunk work on ``pcm`` (mel, VAD, encoder windows), each
        chunk timed; the figure is the mean (VAD runs every 32 ms, so chunks differ)."""
        self.progress.start("lipsync: audio front end")
        rounds = max(1, self.timing.min_calls // 10)
        samples: list[float] = []
        for _ in range(rounds):
            mel, activity, inputs = StreamingMel(), SpeechActivity(), StreamingEncoderInputs()
            for first in range(0, len(pcm) - CHUNK + 1, CHUNK):
                chunk = torch.from_numpy(pcm[first:first + CHUNK].astype(np.float32) / 32768.0)
                started = time.perf_counter()
                activity.push(chunk)
                inputs.push(mel.push(chunk))
                samples.append((time.perf_counter() - started) * 1000.0)
        mean = sum(samples) / len(samples)
        self.details["audio_chunk_ms"] = {"mean": mean, "p50": percentile(samples, 50),
                                          "p95": percentile(samples, 95), "chunks": len(samples)}
        self.progress.step()
        return [{"part": MICRO_PART, "what": "audio front end per 20 ms chunk: streaming mel + VAD + encoder "
                 "windows (mean)", "micro_id": "audio chunk", "micro": PLOT_LABELS["audio chunk"], "ms": mean,
                 "calls": len(samples)}]


# -- GPU ----------------------------------------------------------------------------------------

def gpu_part(options: BenchOptions, progress: Progress,
             details: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """``lipsync_gpu.gpu_part``'s rows (tagged with the GPU part) and details; none without
    CUDA. A failure there is logged and noted; the CPU figures are kept."""
    if not torch.cuda.is_available():
        progress.step("lipsync: GPU part skipped, no CUDA device")
        return [], None
    try:
        rows, gpu = lipsync_gpu.gpu_part(options.quick, progress)
    except Exception as e:
        log.exception("lipsync GPU part failed")
        details["gpu_error"] = f"{type(e).__name__}: {e}"
        return [], None
    details["gpu"] = gpu
    return [{**row, "part": GPU_PART} for row in rows], gpu


def gpu_targets(rows: list[dict[str, Any]], gpu: dict[str, Any] | None, details: dict[str, Any]) -> list[Target]:
    targets = lipsync_gpu.gpu_targets(rows, gpu)
    if "gpu_error" in details:
        for target in targets:
            target.measured = f"not measured: the GPU part failed ({details['gpu_error']}; traceback in bench.log)"
    return targets


# -- table, plots, targets, notes ----------------------------------------------------------------

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
MICRO_COLUMNS = [
    Column(key="ms", header="ms (median)", fmt="{:.2f}"),
    Column(key="fps_core", header="frames/s on 1 core", fmt="{:.0f}"),
    Column(key="bytes_frame", header="bytes per frame", fmt="{:,}"),
    Column(key="calls", header="timed calls"),
]
COLUMNS = ([Column(key="what", header="what")] + PIPELINE_COLUMNS + MICRO_COLUMNS
           + [c for c in lipsync_gpu.COLUMNS if c.key != "what"])
"""Every part's columns; the report shows each part with the columns its rows fill."""

PLOTS = [
    PlotSpec(file="lipsync_pipeline_fps.png", title="Lip-sync pipeline: output FPS per session (25 = real time)",
             x="sessions_label", y="fps_session", series="layout", ylabel="frames per second"),
    PlotSpec(file="lipsync_pipeline_latency.png", title="Lip-sync pipeline: latency p50 as the page sees it",
             x="sessions_label", y="p50_ms", series="layout", ylabel="ms (look-ahead included)"),
    PlotSpec(file="lipsync_pipeline_after_audio.png", title="Lip-sync pipeline: p50 after the audio (processing)",
             x="sessions_label", y="after_p50_ms", series="layout", ylabel="ms"),
    PlotSpec(file="lipsync_cpu_micro.png", title="Lip-sync parts on 1 CPU core (median)", x="micro", y="ms",
             ylabel="ms per frame (audio: per 20 ms chunk)", log_y=True),
]


def cpu_targets(rows: list[dict[str, Any]]) -> list[Target]:
    """Informational targets: what the CPU figures say beside the anchors."""
    runs = [r for r in rows if r.get("part") == PIPELINE_PART]
    micro = {r.get("micro_id"): r for r in rows if r.get("part") == MICRO_PART}
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

    def ms(key: str) -> str:
        return f"{micro[key]['ms']:.1f} ms" if key in micro else "not measured"

    costs = (f"non-neural mouth {ms('mouth-synth')}; U-Net half width {ms('U-Net half')}, full width "
             f"{ms('U-Net full')} (random weights, batch 1); compositing {ms(f'feather {FEATHER_PX}')} + JPEG "
             f"{ms('JPEG')}; audio front end {ms('audio chunk')} per 20 ms chunk")
    patch_bytes = "; ".join(f"{name} {micro[f'patch {name}']['bytes_frame']:,} B"
                            for name, _, _ in PATCH_DTYPES if f"patch {name}" in micro)
    jpeg = micro.get("JPEG", {}).get("bytes_frame")
    return [
        Target(name="lip-sync pipeline on this machine's CPU (non-neural mouth): 25 fps per talking session",
               goal=f"informational (25 FPS per session, nothing lost; anchor: {TALKERS_ANCHOR})",
               measured=sessions, met=None),
        Target(name="audio-to-lip latency as the page sees it (look-ahead included)",
               goal=f"report (README): look-ahead {LOOKAHEAD_MS:.1f} ms (audio_windows.lookahead_seconds()) + "
                    "processing", measured=latency, met=None),
        Target(name="cost per frame on one CPU core", goal=f"informational (anchor: {SEEDS_ANCHOR})",
               measured=costs, met=None),
        Target(name="mouth patch bytes per frame, lip-sync -> compositing",
               goal="report: uint8 by default; float16 / float32 selectable (float32 = the seeds' contract)",
               measured=(patch_bytes or "not measured") + (f"; output JPEG {jpeg:,} B" if jpeg else ""), met=None),
    ]


def notes(options: BenchOptions, rows: list[dict[str, Any]], details: dict[str, Any],
          gpu: dict[str, Any] | None) -> list[str]:
    speech_info = details["speech"]
    built = ", ".join(f"{a} {b['s']:.1f} s" if "s" in b else f"{a} FAILED ({b['error']})"
                      for a, b in details["avatar_build"].items())
    load = details["load_avg_1min"]
    out = []
    if "pipeline_skipped" in details:
        out.append(f"Pipeline runs not measured: {details['pipeline_skipped']}.")
    else:
        out += [
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
    micro = details.get("micro", {})
    params = micro.get("unet_params", {})
    timing, unet_timing = MICRO_TIMING[options.quick], UNET_TIMING[options.quick]
    out += [
        (f"CPU rows: in this process with torch.set_num_threads(1) and cv2.setNumThreads(1) (a rank's default "
         f"share), on the default avatar's first frame ({micro.get('frame', ['?'])[1]}x{micro.get('frame', ['?'])[0]}, "
         f"crop rect {micro.get('rect')}); median of at least {timing.min_calls} timed calls after {timing.warmup} "
         f"warm-up (the U-Net: at least {unet_timing.min_calls} after {unet_timing.warmup}). frames/s on 1 core = "
         "1000 / ms. The machine has "
         f"{psutil.cpu_count()} logical core(s); 1-minute load average {load['before']:.2f} before, "
         f"{load['after']:.2f} after."),
        (f"U-Net rows: SyncTalk_2D's unet_328 ('ave'), {params.get('half', 0) / 1e6:.2f} M parameters at half "
         f"width, {params.get('full', 0) / 1e6:.2f} M at full width, {lipsync_gpu.RANDOM_WEIGHTS}. On the CPU they "
         "are far from real time; the pipeline runs above use the non-neural mouth."),
        (f"Mouth patch rows: the bytes per frame lip-sync sends compositing for each patch_dtype ({INNER}x{INNER}x3 "
         "x itemsize) and what compositing pays to turn it back into an RGB uint8 image (composite_stage.patch_rgb)."
         f" Audio front end: the speech stage's per-chunk work over the speech above (mean of "
         f"{micro.get('audio_chunk_ms', {}).get('chunks', 0)} chunks; p95 "
         f"{micro.get('audio_chunk_ms', {}).get('p95', math.nan):.2f} ms; 20 ms of audio per chunk)."),
        f"Anchors: {SEEDS_ANCHOR}; {TALKERS_ANCHOR}.",
    ]
    out += lipsync_gpu.gpu_notes(gpu)
    if "gpu_error" in details:
        out.append(f"GPU part FAILED: {details['gpu_error']} (traceback in bench.log); the CPU figures stand.")
    if options.quick:
        out.append(f"Quick run: {speech_info['seconds']:.1f} s of speech per run, {timing.min_calls} timed call(s) "
                   "per CPU case; these figures are not for quoting.")
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
