"""Section 'gpu': the real stages timed on a CUDA device, and NCCL links between two GPUs.

Stages. ``VisionStage`` (MTCNN full detection every ``detect_every`` frames of a session,
ONet verification of the tracked faces in between, the emotion network; all on the GPU,
with host work around them), MTCNN's full detection alone, the emotion network alone
(``VisionStage.classify``, one face per frame) and ``GeneratorStage`` with the learned
style net and with the low-fi renderer, each built and set up as a rank builds it, are fed
batches of 1 and 8 frames of the 640x480 astronaut fixture from 1 or 8 sessions. Frames
start on the GPU, as an NCCL link delivers them. After a warm-up every batch is timed
between two ``torch.cuda.synchronize`` calls: the stage's host work (cropping, NMS,
tracking, bookkeeping, copies) counts, as it does in the pipeline; CUDA events alone would
hide it. Per-frame time is batch time / batch size. 'GPU peak MiB' is torch's peak
allocation while one stage's cases run (only that stage is built at the time).

The pipeline's FPS with its vision and generator ranks on the GPU is what section
'pipeline' measures on a CUDA host (worker stages default to ``device: auto``, a GPU when
the node has one); this section does not start a pipeline job of its own.

NCCL (2 devices or more). Two spawned ranks stream ``messages`` payloads of the issue's
large sizes (1.2 MB: a 3x320x320 float32 frame; 2.76 MB: a 1280x720 RGB uint8 frame, as
in section 'transport') from cuda:0 to cuda:1, through a torch link on NCCL made by
``comms.links.create_links`` (as the planner declares it between two GPUs) and through raw
``dist.send``/``dist.recv`` on an NCCL group, in alternating rounds. The receiver times
each round from a shared barrier until the last payload is on its GPU; the median of the
rounds is reported, and the channel/raw ratio is checked against ``RATIO_GOAL``.

Without CUDA the section is skipped at once, saying why.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import cv2
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from comms.link_spec import LinkSpec, Transport
from comms.links import create_links
from comms.message import Kind, Message
from runtime.bench.options import BenchOptions
from runtime.bench.ports import free_port
from runtime.bench.progress import Progress
from runtime.bench.results import Column, PlotSpec, SectionResult, Target
from runtime.bench.stage_harness import (ASTRONAUT, StyleWeights, fixture_frame, fixture_rgb, frame_batch, release,
                                         stage_context, style_weights)
from runtime.bench.stage_harness import sync as sync_device
from runtime.bench.stats import median, ratio, summarize
from runtime.dist import destroy_distributed
from stages.generator.stage import GeneratorConfig, GeneratorStage
from stages.vision.config import VisionConfig
from stages.vision.face_crops import border_value, crop_face
from stages.vision.stage import VisionStage

log = logging.getLogger(__name__)

TITLE = "GPU: stages on CUDA, NCCL links"
NO_CUDA = ("no CUDA device on this machine (torch.cuda.is_available() is False); "
           "GPU figures need a GPU host")
STAGES = ("vision stage", "MTCNN detection", "emotion model", "generator, style net", "generator, low-fi")
BATCH_SIZES = (1, 8)
PAYLOADS: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
    "1.2 MB": (torch.float32, (3, 320, 320)),
    "2.76 MB": (torch.uint8, (720, 1280, 3)),
}
"""Payload label -> (dtype, shape) of the tensor each message carries."""
RATIO_GOAL = 0.9
"""The NCCL channel should keep at least this share of raw NCCL send/recv throughput."""
LINK_TIMEOUT_S = 300.0
"""Longest the two NCCL ranks may take in all before the section fails."""

COLUMNS = [
    Column(key="what", header="what"),
    Column(key="size", header="batch / payload"),
    Column(key="p50_ms", header="per frame p50 ms", fmt="{:.2f}"),
    Column(key="p95_ms", header="per frame p95 ms", fmt="{:.2f}"),
    Column(key="fps", header="frames/s", fmt="{:.0f}"),
    Column(key="mb_s", header="MB/s", fmt="{:.0f}"),
    Column(key="peak_mib", header="GPU peak MiB", fmt="{:.0f}"),
]
PLOTS = [
    PlotSpec(file="gpu_stages.png", title="Stages on the GPU: time per frame (p50)", x="what", y="p50_ms",
             series="size", ylabel="ms per frame"),
    PlotSpec(file="gpu_nccl.png", title="cuda:0 -> cuda:1 throughput: channel vs raw NCCL", x="size",
             y="mb_s", series="what", ylabel="MB/s"),
]


def steps(options: BenchOptions) -> int:
    if not torch.cuda.is_available():
        return 1
    return len(STAGES) * len(BATCH_SIZES) + (1 if torch.cuda.device_count() >= 2 else 0)


def run(options: BenchOptions, progress: Progress) -> SectionResult:
    if not torch.cuda.is_available():
        progress.step("gpu: skipped, no CUDA device")
        return SectionResult(name="gpu", title=TITLE, skipped=NO_CUDA)
    device = torch.device("cuda:0")
    warmup, timed = iterations(options)
    weights = style_weights(options.out_dir / "scratch")
    rows = stage_rows(device, warmup, timed, progress, weights=weights)
    free, total = torch.cuda.mem_get_info(device)
    notes = [f"Device: {torch.cuda.get_device_name(device)}; {torch.cuda.device_count()} CUDA device(s).",
             f"Stages: {warmup} warm-up and {timed} timed batches per case; p50/p95 over the timed batches. "
             f"The vision stage's p95 is its full MTCNN detection frames (1 in {VisionConfig().detect_every} "
             "per session; the others verify the tracked faces with ONet alone).",
             f"Device memory in use after the stage timings: {(total - free) / 2**30:.2f} of "
             f"{total / 2**30:.1f} GiB (CUDA context and other processes included).",
             "Pipeline FPS with the generator rank on the GPU: run section 'pipeline' on this host (its worker "
             "stages default to device 'auto', a GPU when the node has one); not repeated here."]
    if weights.note:
        notes.append(f"Style net weights: {weights.note}.")
    details: dict[str, Any] = {"warmup": warmup, "timed": timed}
    plots = PLOTS[:1]
    if torch.cuda.device_count() >= 2:
        messages = 20 if options.quick else 200
        progress.start("gpu: NCCL channel vs raw send/recv, cuda:0 -> cuda:1")
        seconds = link_seconds("nccl", ("cuda:0", "cuda:1"), PAYLOADS, messages, options.rounds)
        progress.step()
        link_rows, targets = nccl_figures(seconds, messages)
        rows += link_rows
        details["nccl_round_seconds"] = seconds
        plots = PLOTS
        notes.append(f"NCCL: {options.rounds} alternating rounds of {messages} messages per payload and path; "
                     "median round reported (MB = 10^6 bytes).")
    else:
        targets = [Target(name=_target_name(label), goal=f">= {RATIO_GOAL}x",
                          measured="not measured: needs 2 CUDA devices", met=None) for label in PAYLOADS]
        notes.append("NCCL figures skipped: NCCL cannot link two ranks on one GPU, and this machine has "
                     "1 CUDA device.")
    return SectionResult(name="gpu", title=TITLE, columns=COLUMNS, rows=rows, targets=targets, notes=notes,
                         plots=plots, details=details)


def iterations(options: BenchOptions) -> tuple[int, int]:
    """(warm-up, timed) batches per stage case."""
    return (3, 10) if options.quick else (20, 200)


# ---------------------------------------------------------------------------- stages

def stage_rows(device: torch.device, warmup: int, timed: int, progress: Progress, *, weights: StyleWeights,
               batch_sizes: tuple[int, ...] = BATCH_SIZES) -> list[dict[str, Any]]:
    """One row per stage and batch size, the stages running on ``device`` (the section
    uses cuda:0; tests run the same code on the CPU, with smaller batches)."""
    frame = fixture_frame(device)
    rgb = fixture_rgb(ASTRONAUT)
    rows = []
    vision = VisionStage(VisionConfig(), stage_context(device, "vision"))
    vision.setup()
    try:
        (probe,) = vision.process(frame_batch(frame, 1, 0, prefix="probe"))
        faces = probe.meta["faces"]
        if not faces:
            raise RuntimeError(f"the detector found no face in {ASTRONAUT}; the timings need one")
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        crop = crop_face(gray, tuple(faces[0]["bbox"]), vision.config.emotion_margin, border_value(gray))
        cases: list[tuple[str, Callable[[Any], Any], Callable[[int, int], Any]]] = [
            ("vision stage", vision.process, lambda b, i: frame_batch(frame, b, i)),
            ("MTCNN detection", vision.detector.detect, lambda b, i: [rgb] * b),
            ("emotion model", vision.classify, lambda b, i: [crop] * b),
        ]
        for what, process, make_batch in cases:
            rows += _time_stage(what, process, make_batch, device, warmup, timed, progress, batch_sizes)
    finally:
        vision.teardown()
        release(device)
    for what, model in (("generator, style net", "stylenet"), ("generator, low-fi", "lowfi")):
        config = GeneratorConfig(model=model, weights=str(weights.path) if model == "stylenet" else None)
        generator = GeneratorStage(config, stage_context(device, "generator"))
        generator.setup()
        try:
            rows += _time_stage(what, generator.process, lambda b, i: frame_batch(frame, b, i, faces),
                                device, warmup, timed, progress, batch_sizes)
        finally:
            generator.teardown()
            release(device)
    return rows


def _time_stage(what: str, process: Callable[[Any], Any], make_batch: Callable[[int, int], Any],
                device: torch.device, warmup: int, timed: int, progress: Progress,
                batch_sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    rows = []
    frame_index = itertools.count(1)  # sessions keep one clock across cases, as a live stream would
    for batch in batch_sizes:
        progress.start(f"gpu: {what}, batch {batch}")
        for _ in range(warmup):
            process(make_batch(batch, next(frame_index)))
        sync_device(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        per_frame_ms = []
        for _ in range(timed):
            inputs = make_batch(batch, next(frame_index))
            sync_device(device)
            started = time.perf_counter()
            process(inputs)
            sync_device(device)
            per_frame_ms.append((time.perf_counter() - started) * 1000.0 / batch)
        summary = summarize(per_frame_ms)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
        rows.append({"what": what, "size": f"batch {batch}", "batch": batch, "p50_ms": summary["p50"],
                     "p95_ms": summary["p95"], "fps": 1000.0 / summary["mean"], "peak_mib": peak})
        progress.step()
    return rows


# ------------------------------------------------------------------------ NCCL links

def nccl_figures(seconds: dict[str, dict[str, list[float]]], messages: int) -> tuple[list[dict], list[Target]]:
    """Rows (MB/s per payload and path, median round) and the channel/raw targets."""
    rows, targets = [], []
    for label, (dtype, shape) in PAYLOADS.items():
        size = math.prod(shape) * dtype.itemsize
        mb_s = {path: median(size * messages / s / 1e6 for s in rounds) for path, rounds in seconds[label].items()}
        rows.append({"what": "NCCL channel", "size": label, "bytes": size, "mb_s": mb_s["channel"]})
        rows.append({"what": "raw NCCL send/recv", "size": label, "bytes": size, "mb_s": mb_s["raw"]})
        share = ratio(mb_s["channel"], mb_s["raw"])
        targets.append(Target(name=_target_name(label), goal=f">= {RATIO_GOAL}x",
                              measured=f"{share:.2f}x ({mb_s['channel']:.0f} vs {mb_s['raw']:.0f} MB/s)",
                              met=None if math.isnan(share) else share >= RATIO_GOAL))
    return rows, targets


def _target_name(label: str) -> str:
    return f"NCCL channel / raw throughput at {label}"


def link_seconds(backend: str, devices: tuple[str, str], payloads: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 messages: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Receiver-side seconds per round, ``{label: {"channel": [...], "raw": [...]}}``, from two
    spawned ranks linked rank 0 (``devices[0]``) -> rank 1 (``devices[1]``) over ``backend``
    (the section uses NCCL; tests use gloo on the CPU)."""
    context = mp.get_context("spawn")
    answers = context.Queue()
    port = free_port()
    ranks = [context.Process(target=_link_rank, name=f"bench-link-rank-{rank}", daemon=True,
                             args=(rank, port, backend, devices, payloads, messages, rounds, answers))
             for rank in (0, 1)]
    for process in ranks:
        process.start()
    try:
        return _receiver_answer(ranks, answers, time.monotonic() + LINK_TIMEOUT_S)
    except BaseException:
        for process in ranks:
            process.kill()  # the other rank would sit out its timeouts waiting for the failed one
        raise
    finally:
        for process in ranks:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()


def _receiver_answer(ranks: list, answers, deadline: float) -> dict[str, dict[str, list[float]]]:
    """Rank 1's figures once both ranks reported; raises with the reason when either fails."""
    results = {}
    while len(results) < len(ranks):
        try:
            rank, error, figures = answers.get(timeout=1.0)
        except queue.Empty:
            for process in ranks:
                if process.exitcode not in (None, 0):
                    raise RuntimeError(f"{process.name} exited with code {process.exitcode} before reporting") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"link ranks did not finish within {LINK_TIMEOUT_S:.0f} s") from None
            continue
        if error is not None:
            log.error("link rank %d failed:\n%s", rank, error)
            raise RuntimeError(f"link rank {rank} failed: {error.strip().splitlines()[-1]} (traceback in the log)")
        results[rank] = figures
    return results[1]


def _link_rank(rank: int, port: int, backend: str, devices: tuple[str, str], payloads: dict, messages: int,
               rounds: int, answers) -> None:
    """One spawned rank: measure, then put (rank, traceback or None, figures) on ``answers``."""
    try:
        answers.put((rank, None, _measure_links(rank, port, backend, devices, payloads, messages, rounds)))
    except BaseException:
        answers.put((rank, traceback.format_exc(), None))


def _measure_links(rank: int, port: int, backend: str, devices: tuple[str, str], payloads: dict,
                   messages: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    device = torch.device(devices[rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl" if backend == "nccl" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        spec = LinkSpec(name="bench", src_rank=0, dst_rank=1, transport=Transport.TORCH, backend=backend,
                        src_device=devices[0], dst_device=devices[1])
        ends = create_links([spec])
        link = ends.writers["bench"] if rank == 0 else ends.readers["bench"]
        raw = dist.new_group([0, 1], backend=backend)
        sync = dist.new_group([0, 1], backend="gloo")
        figures = {}
        for label, (dtype, shape) in payloads.items():
            payload = torch.full(shape, rank + 1, dtype=dtype, device=device)
            _raw_round(rank, payload, 2, raw, sync)  # warm-up: communicators, buffers, kernels
            _channel_round(rank, link, payload, 2, sync)
            figures[label] = {"channel": [], "raw": []}
            for _ in range(rounds):
                figures[label]["raw"].append(_raw_round(rank, payload, messages, raw, sync))
                figures[label]["channel"].append(_channel_round(rank, link, payload, messages, sync))
        link.close()
        dist.barrier(group=sync)
        link.join(5.0)
        return figures
    finally:
        destroy_distributed(10.0)


def _raw_round(rank: int, payload: torch.Tensor, messages: int, group, sync) -> float:
    dist.barrier(group=sync)
    started = time.perf_counter()
    for _ in range(messages):
        if rank == 0:
            dist.send(payload, 1, group=group)
        else:
            dist.recv(payload, 0, group=group)
    sync_device(payload.device)
    return time.perf_counter() - started


def _channel_round(rank: int, link, payload: torch.Tensor, messages: int, sync) -> float:
    dist.barrier(group=sync)
    started = time.perf_counter()
    for i in range(messages):
        if rank == 0:
            link.send(Message(kind=Kind.DATA, frame_id=i, tensors=[payload]), timeout=30.0)
        else:
            link.recv(timeout=30.0)
    sync_device(payload.device)
    return time.perf_counter() - started
