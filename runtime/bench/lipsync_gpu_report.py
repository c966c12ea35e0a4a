"""How the lip-sync GPU part reads in the report: its table's columns and charts, the
issue's three targets beside the best rows, the notes a reader needs, and the part as a
section of its own.

The targets printed beside the figures are the issue's: <= 5 ms single-frame latency,
>= 2,000 frames/s batched, >= 60 concurrent 25 fps streams with distinct avatars on one
GPU; the issue's anchors for scale: 15-18 ms per frame and 58 FPS per process, 1,100-1,200
FPS with 20 processes on an RTX 6000 Ada.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from runtime.bench.lipsync_gpu import RANDOM_WEIGHTS, gpu_part
from runtime.bench.lipsync_streams import FPS, LATENCY_MS, MAX_BATCH, RESOLUTION
from runtime.bench.options import BenchOptions
from runtime.bench.progress import Progress
from runtime.bench.results import Column, PlotSpec, SectionResult, Target
from stages.lipsync import batching

TITLE = "Lip-sync U-Net on the GPU: latency, throughput, concurrent streams"
NO_CUDA = ("GPU rows: not measured, no CUDA device on this machine (torch.cuda.is_available() is False); "
           "the lip-sync U-Net's GPU figures need a GPU host.")

SINGLE_FRAME_GOAL_MS = 5.0
BATCHED_GOAL_FPS = 2000.0
STREAMS_GOAL = 60
ANCHOR = ("the issue's anchors: 15-18 ms per frame and 58 FPS per process, 1,100-1,200 FPS with 20 processes, "
          "on an RTX 6000 Ada")


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
