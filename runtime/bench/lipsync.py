"""Section 'lipsync': the lip-sync pipeline run for real on this machine, what its parts cost
per frame, and (on a CUDA host) the 328 U-Net on the GPU.

Three parts, each a module of its own, after the avatars and speech they share
(``lipsync_inputs``: four avatars built from the astronaut photo, espeak-ng speech):

- pipeline (``lipsync_pipeline``, CPU): the real launcher on 1 process and on 4 ranks,
  fed real speech at real-time pace by 1 and 4 concurrent sessions (``lipsync_session``,
  the page's stand-in): FPS per session, latency as the page sees it (look-ahead
  included) and after the audio, frames lost, bytes per frame on each hop, CPU use;
- CPU micro figures (``lipsync_cpu``): compositing, JPEG, the mouth patch's bytes per
  dtype, the non-neural mouth, the U-Net at batch 1, the audio front end, on one core;
- GPU (CUDA only; a note says why not otherwise): ``lipsync_gpu.gpu_part``, merged into
  this section's rows and targets (``lipsync_gpu_report``).

Rows carry a ``part`` key, so the report prints one table per part with its own columns.
Figures are printed, never judged against a bar of this machine's own: the targets are
informational, with the anchors beside them (the seeds' 15-18 ms per frame and 58 FPS per
process; LiveTalking users report stutter beyond 2-3 talkers), plus the GPU part's three.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from runtime.bench import lipsync_gpu, lipsync_gpu_report
from runtime.bench.lipsync_cpu import (
    MICRO_COLUMNS,
    MICRO_PLOTS,
    MICRO_STEPS,
    MICRO_TIMING,
    SEEDS_ANCHOR,
    micro_notes,
    micro_rows,
    micro_targets,
)
from runtime.bench.lipsync_inputs import AVATAR_SECONDS, build_avatars, speech
from runtime.bench.lipsync_pipeline import (
    PIPELINE_COLUMNS,
    PIPELINE_PLOTS,
    TALKERS_ANCHOR,
    pipeline_notes,
    pipeline_part,
    pipeline_steps,
    pipeline_targets,
)
from runtime.bench.lipsync_session import AUDIO_WAIT_MS, LOOKAHEAD_MS
from runtime.bench.options import BenchOptions
from runtime.bench.progress import Progress
from runtime.bench.results import Column, SectionResult, Target
from stages.lipsync.avatar import AvatarStore

log = logging.getLogger(__name__)

TITLE = "Lip-sync: the pipeline on this machine, cost per frame of its parts, the U-Net on a GPU"
GPU_PART = "GPU: 328 U-Net, random weights (timing only)"


def steps(options: BenchOptions) -> int:
    """Avatars and speech, per layout its start and warm-up and one run per session count,
    the micro figures, the GPU part."""
    return 1 + pipeline_steps(options) + MICRO_STEPS + lipsync_gpu.gpu_steps(options.quick)


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
        rows += pipeline_part(root, avatars, pcm, options, progress, details)
        rows += micro_rows(AvatarStore(root), pcm, options.quick, progress, details)
    gpu_rows, gpu = gpu_part(options, progress, details)
    rows += gpu_rows
    details["load_avg_1min"]["after"] = psutil.getloadavg()[0]
    targets = cpu_targets(rows) + gpu_targets(gpu_rows, gpu, details)
    plots = PLOTS + (lipsync_gpu_report.PLOTS if gpu_rows else [])
    return SectionResult(name="lipsync", title=TITLE, columns=COLUMNS, rows=rows, targets=targets,
                         notes=notes(options, details, gpu), plots=plots, details=details)


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
    targets = lipsync_gpu_report.gpu_targets(rows, gpu)
    if "gpu_error" in details:
        for target in targets:
            target.measured = f"not measured: the GPU part failed ({details['gpu_error']}; traceback in bench.log)"
    return targets


# -- table, plots, targets, notes ----------------------------------------------------------------

COLUMNS = ([Column(key="what", header="what")] + PIPELINE_COLUMNS + MICRO_COLUMNS
           + [c for c in lipsync_gpu_report.COLUMNS if c.key != "what"])
"""Every part's columns; the report shows each part with the columns its rows fill."""
PLOTS = PIPELINE_PLOTS + MICRO_PLOTS


def cpu_targets(rows: list[dict[str, Any]]) -> list[Target]:
    """Informational targets: what the CPU figures say beside the anchors."""
    return pipeline_targets(rows) + micro_targets(rows)


def notes(options: BenchOptions, details: dict[str, Any], gpu: dict[str, Any] | None) -> list[str]:
    out = pipeline_notes(options, details) + micro_notes(options.quick, details)
    out.append(f"Anchors: {SEEDS_ANCHOR}; {TALKERS_ANCHOR}.")
    out += lipsync_gpu_report.gpu_notes(gpu)
    if "gpu_error" in details:
        out.append(f"GPU part FAILED: {details['gpu_error']} (traceback in bench.log); the CPU figures stand.")
    if options.quick:
        out.append(f"Quick run: {details['speech']['seconds']:.1f} s of speech per run, "
                   f"{MICRO_TIMING[options.quick].min_calls} timed call(s) per CPU case; these figures are not for "
                   "quoting.")
    return out
