"""Section 'lipsync', its CPU part: what the lip-sync pipeline's pieces cost per frame on
one core, measured in this process.

With one torch and one OpenCV thread (a rank's default share), on the default avatar's
first frame: compositing a 640x480 frame (``compose_frame``, hard paste and feathered), its
JPEG encoding, the compositor's whole per-frame work; the mouth patch's bytes per frame as
uint8 / float16 / float32 and the compositor's conversion of each; the non-neural mouth;
the half- and full-width 328 U-Net at batch 1 with random weights (timing only); the audio
front end (streaming mel, VAD, encoder windows) per 20 ms chunk.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import psutil
import torch

from runtime.bench.lipsync_gpu import RANDOM_WEIGHTS, random_inputs, random_unet
from runtime.bench.lipsync_session import CHUNK
from runtime.bench.progress import Progress
from runtime.bench.results import Column, PlotSpec, Target
from runtime.bench.stage_harness import Timing, time_calls
from runtime.bench.stats import median, percentile
from stages.lipsync.audio_windows import StreamingEncoderInputs
from stages.lipsync.avatar import AvatarStore
from stages.lipsync.composite_stage import patch_rgb
from stages.lipsync.compositing import compose_frame
from stages.lipsync.crop import INNER, cut_crop
from stages.lipsync.mel import StreamingMel
from stages.lipsync.mouth_synth import MouthSynth
from stages.lipsync.prepare import DEFAULT_AVATAR
from stages.lipsync.speech_activity import SpeechActivity
from stages.lipsync.unet import LipSyncUNet, parameter_count

MICRO_PART = "CPU, in this process (1 torch and 1 OpenCV thread): cost and bytes per frame"
SEEDS_ANCHOR = "the seeds: 15-18 ms per frame, 58 FPS per process (U-Net on an RTX 6000 Ada)"

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
"""Progress steps of ``micro_rows``: compositing, patches, the mouth, one per U-Net width, audio."""
PLOT_LABELS = {"paste": "paste", f"feather {FEATHER_PX}": "feather", "JPEG": "JPEG", "composite": "composite",
               "mouth-synth": "mouth", "U-Net half": "U-Net 0.5", "U-Net full": "U-Net 1", "audio chunk": "audio"}
"""Micro rows in the chart (``micro_id`` -> short bar label); the patch conversions stay in the table."""


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


def timing_details(timing: Timing) -> dict[str, Any]:
    return {"warmup": timing.warmup, "min_calls": timing.min_calls, "budget_s": timing.budget_s}


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
        self.patch_bgr = torch.from_numpy(np.ascontiguousarray(self.patch[..., ::-1])).permute(2, 0, 1).contiguous()
        """The patch as lip-sync sends it to compositing (``MOUTH_PATCH``: [3, 320, 320] BGR uint8)."""
        self.details: dict[str, Any] = {"frame": list(self.frame.shape), "rect": [int(v) for v in self.rect],
                                        "timing": timing_details(timing), "unet_timing": timing_details(unet_timing)}

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

        def composite() -> bytes:  # what CompositeStage does per frame with a patch
            return self._encode(compose_frame(self.frame, self.rect, patch_rgb(self.patch_bgr), FEATHER_PX))

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
        rows = []
        for name, dtype, remark in PATCH_DTYPES:
            tensor = self.patch_bgr if dtype == torch.uint8 else (self.patch_bgr.to(dtype) / 255.0)
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
        cpu = torch.device("cpu")
        x, audio = random_inputs(1, cpu, torch.float32)
        self.details["unet_params"] = {}
        for width in UNET_WIDTHS:
            name = "full" if width == 1.0 else "half"
            self.progress.start(f"lipsync: U-Net 328, {name} width, CPU")
            model = random_unet(width, cpu, torch.float32, seed=0)
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
        row = self._row("audio front end per 20 ms chunk: streaming mel + VAD + encoder windows (mean)", "audio chunk")
        row.update(ms=mean, calls=len(samples))  # the chunks' mean, each timed above, not one call timed
        return [row]


# -- table, plot, targets, notes -------------------------------------------------------------------

MICRO_COLUMNS = [
    Column(key="ms", header="ms (median)", fmt="{:.2f}"),
    Column(key="fps_core", header="frames/s on 1 core", fmt="{:.0f}"),
    Column(key="bytes_frame", header="bytes per frame", fmt="{:,}"),
    Column(key="calls", header="timed calls"),
]
MICRO_PLOTS = [
    PlotSpec(file="lipsync_cpu_micro.png", title="Lip-sync parts on 1 CPU core (median)", x="micro", y="ms",
             ylabel="ms per frame (audio: per 20 ms chunk)", log_y=True),
]


def micro_targets(rows: list[dict[str, Any]]) -> list[Target]:
    """Informational targets: the costs beside the seeds' anchor, and the patch's bytes per
    frame for each dtype."""
    micro = {r.get("micro_id"): r for r in rows if r.get("part") == MICRO_PART}

    def ms(key: str) -> str:
        return f"{micro[key]['ms']:.1f} ms" if key in micro else "not measured"

    costs = (f"non-neural mouth {ms('mouth-synth')}; U-Net half width {ms('U-Net half')}, full width "
             f"{ms('U-Net full')} (random weights, batch 1); compositing {ms(f'feather {FEATHER_PX}')} + JPEG "
             f"{ms('JPEG')}; audio front end {ms('audio chunk')} per 20 ms chunk")
    patch_bytes = "; ".join(f"{name} {micro[f'patch {name}']['bytes_frame']:,} B"
                            for name, _, _ in PATCH_DTYPES if f"patch {name}" in micro)
    jpeg = micro.get("JPEG", {}).get("bytes_frame")
    return [
        Target(name="cost per frame on one CPU core", goal=f"informational (anchor: {SEEDS_ANCHOR})",
               measured=costs, met=None),
        Target(name="mouth patch bytes per frame, lip-sync -> compositing",
               goal="report: uint8 by default; float16 / float32 selectable (float32 = the seeds' contract)",
               measured=(patch_bytes or "not measured") + (f"; output JPEG {jpeg:,} B" if jpeg else ""), met=None),
    ]


def micro_notes(quick: bool, details: dict[str, Any]) -> list[str]:
    """How the CPU rows were measured, on what, and what the U-Net, patch and audio rows mean."""
    load = details["load_avg_1min"]
    micro = details.get("micro", {})
    params = micro.get("unet_params", {})
    timing, unet_timing = MICRO_TIMING[quick], UNET_TIMING[quick]
    return [
        (f"CPU rows: in this process with torch.set_num_threads(1) and cv2.setNumThreads(1) (a rank's default "
         f"share), on the default avatar's first frame ({micro.get('frame', ['?'])[1]}x{micro.get('frame', ['?'])[0]}, "
         f"crop rect {micro.get('rect')}); median of at least {timing.min_calls} timed calls after {timing.warmup} "
         f"warm-up (the U-Net: at least {unet_timing.min_calls} after {unet_timing.warmup}). frames/s on 1 core = "
         "1000 / ms. The machine has "
         f"{psutil.cpu_count()} logical core(s); 1-minute load average {load['before']:.2f} before, "
         f"{load['after']:.2f} after."),
        (f"U-Net rows: SyncTalk_2D's unet_328 ('ave'), {params.get('half', 0) / 1e6:.2f} M parameters at half "
         f"width, {params.get('full', 0) / 1e6:.2f} M at full width, {RANDOM_WEIGHTS}. On the CPU they "
         "are far from real time; the pipeline runs above use the non-neural mouth."),
        (f"Mouth patch rows: the bytes per frame lip-sync sends compositing for each patch_dtype ({INNER}x{INNER}x3 "
         "x itemsize) and what compositing pays to turn it back into an RGB uint8 image (composite_stage.patch_rgb)."
         f" Audio front end: the speech stage's per-chunk work over the speech above (mean of "
         f"{micro.get('audio_chunk_ms', {}).get('chunks', 0)} chunks; p95 "
         f"{micro.get('audio_chunk_ms', {}).get('p95', math.nan):.2f} ms; 20 ms of audio per chunk)."),
    ]
