"""Section 'models': what each network and each stage costs per 640x480 frame.

Every network the pipeline runs, alone, then the two stages around them, on the
astronaut fixture (one face) and, when ``tests/fixtures/group6_640x480.jpg`` exists, a
six-face group photo:

- MTCNN full detection (the whole cascade) on batches of frames;
- MTCNN verification (ONet alone) of 1 and 6 boxes per frame, what the tracker runs on
  the frames between full detections;
- the emotion network (``VisionStage.classify``) on 64x64 face crops, one per frame;
- the style net at 192, 256 and 320 px (the generator runs it at ``net_side``: by
  default 192 px on a CPU, resized to the 320 px output, and the output size on a GPU);
- ``VisionStage.process`` in its steady state: each batch element a session fed
  consecutive frames, timed over cycles of ``detect_every`` calls, so one full detection
  and ``detect_every - 1`` verifications per session, as a live stream gets them;
- ``GeneratorStage.process`` with the style net and with the low-fi renderer.

Each case runs at two batch sizes (1 and 8; 1 and 2 with ``--quick``) on the CPU with
one torch and one OpenCV thread (what a pipeline rank gets by default: ``compute``'s
torch_threads / opencv_threads), and on ``cuda`` too when there is one. The figure is the
median of the timed calls after warm-up; on CUDA the device is synchronised around each
timed call (``stage_harness.time_calls``). ms per frame = ms per call / frames per call.

Its targets are the detection-quality ones (``vision_quality``): faces found and false
positives over a stream of webcam-like frames of each fixture, a scene cut, landmarks.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import cv2
import psutil
import torch
import torch.nn.functional as F

from runtime.bench.options import BenchOptions
from runtime.bench.progress import Progress
from runtime.bench.results import Column, PlotSpec, SectionResult, Target
from runtime.bench.stage_harness import (
    ASTRONAUT,
    GROUP,
    StyleWeights,
    Timing,
    fixture_frame,
    fixture_rgb,
    frame_batch,
    release,
    stage_context,
    style_weights,
    time_calls,
)
from runtime.bench.stats import median
from runtime.bench.vision_quality import quality_targets
from stages.generator.stage import GeneratorConfig, GeneratorStage
from stages.generator.style_table import emotion_style_weights
from stages.generator.stylenet import load_style_net
from stages.vision.config import VisionConfig
from stages.vision.face_crops import border_value, crop_face
from stages.vision.stage import VisionStage

TITLE = "Models: cost per 640x480 frame of each network and stage"
BATCHES = {False: (1, 8), True: (1, 2)}
"""Batch sizes (frames per call), by ``options.quick``."""
TIMING = {False: Timing(warmup=2, min_calls=5, budget_s=1.0, max_calls=200),
          True: Timing(warmup=1, min_calls=2, budget_s=0.0, max_calls=2)}
"""Calls per case, by ``options.quick``: the full run keeps timing cheap cases for about a
second (dozens of samples) and expensive ones at least 5 times."""
STYLE_SIDES = (192, 256, 320)
VERIFY_BOXES = (1, 6)
VISION = VisionConfig()
SETTINGS_SIDE = 320
"""The default live ``output_size``: the side the generator renders at."""
MOOD = {"happy": 0.8, "neutral": 0.2}
"""Emotion probabilities the style net's weights are blended from (the cost does not depend on them)."""
VISION_TARGET = "vision stage on CPU: ms per 640x480 frame"

COLUMNS = [
    Column(key="model", header="model"),
    Column(key="device", header="device"),
    Column(key="batch", header="batch"),
    Column(key="ms_call", header="ms per call", fmt="{:.2f}"),
    Column(key="ms_frame", header="ms per frame", fmt="{:.2f}"),
    Column(key="calls", header="timed calls"),
]
PLOTS = [
    PlotSpec(file="models_networks.png", title="Networks: ms per frame (median)", x="network", y="ms_frame",
             series="case", ylabel="ms per frame", log_y=True),
    PlotSpec(file="models_stages.png", title="Stages: ms per frame (median)", x="stage", y="ms_frame",
             series="case", ylabel="ms per frame", log_y=True),
]
"""Networks and stages in two charts (short labels in the row keys 'network' and 'stage'),
so the bar groups' labels stay readable."""


def devices() -> list[torch.device]:
    return [torch.device("cpu")] + ([torch.device("cuda:0")] if torch.cuda.is_available() else [])


def models() -> list[tuple[str, str, str]]:
    """(table label, plot key, short label) of every case, in the order they run (the
    vision cases share one loaded stage); the group photo's detection only when its fixture exists."""
    out = [("MTCNN detect, 1 face", "network", "detect")]
    if GROUP.is_file():
        out.append(("MTCNN detect, group photo", "network", "detect grp"))
    out += [(f"MTCNN verify, {n} box{'es' if n > 1 else ''}/frame", "network", f"verify {n}") for n in VERIFY_BOXES]
    out.append(("emotion net, 64x64 crop", "network", "emotion"))
    out.append((f"vision stage, detect every {VISION.detect_every}", "stage", "vision"))
    out += [(f"style net, {side} px", "network", f"style {side}") for side in STYLE_SIDES]
    out += [(f"generator stage, style net {SETTINGS_SIDE} px", "stage", "gen style net"),
            (f"generator stage, low-fi {SETTINGS_SIDE} px", "stage", "gen low-fi")]
    return out


QUALITY_FRAMES = {False: 100, True: 10}
"""Frames per fixture of the detection-quality streams, by ``options.quick``."""


def steps(options: BenchOptions) -> int:
    return len(models()) * len(devices())


def run(options: BenchOptions, progress: Progress) -> SectionResult:
    batches, timing = BATCHES[options.quick], TIMING[options.quick]
    weights = style_weights(options.out_dir / "scratch")
    load_before = psutil.getloadavg()[0]
    threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)  # one pipeline rank's share (compute.torch_threads / opencv_threads)
    cv2.setNumThreads(1)
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {"timing": {"warmup": timing.warmup, "min_calls": timing.min_calls,
                                          "budget_s": timing.budget_s, "max_calls": timing.max_calls},
                               "devices": {}}
    try:
        for device in devices():
            bench = ModelBench(device, batches, timing, weights, progress)
            rows += bench.rows()
            details["devices"][device.type] = bench.details
        quality, details["quality"] = quality_targets(QUALITY_FRAMES[options.quick])
    finally:
        torch.set_num_threads(threads[0])
        cv2.setNumThreads(threads[1])
    details["load_avg_1min"] = {"before": load_before, "after": psutil.getloadavg()[0]}
    return SectionResult(name="models", title=TITLE, columns=COLUMNS, rows=rows,
                         targets=[vision_target(rows), *quality],
                         notes=notes(options, weights, details), plots=PLOTS, details=details)


class ModelBench:
    """Every case of one device: models loaded as a rank loads them, one at a time."""

    def __init__(self, device: torch.device, batches: tuple[int, ...], timing: Timing, weights: StyleWeights,
                 progress: Progress) -> None:
        self.device = device
        self.batches = batches
        self.timing = timing
        self.weights = weights
        self.progress = progress
        self.labels = {label: (key, short) for label, key, short in models()}
        self.details: dict[str, Any] = {}
        self.faces: list[dict[str, Any]] = []
        """The astronaut's faces as the vision stage reports them: the generator's input."""
        self._rows: list[dict[str, Any]] = []

    def rows(self) -> list[dict[str, Any]]:
        self._vision_cases()
        self._style_net_cases()
        for model in ("stylenet", "lowfi"):
            self._generator_case(model)
        return self._rows

    def _case(self, label: str, call: Callable[[Any], Any], make_input: Callable[[int], Callable[[], Any]],
              calls_per_sample: int = 1) -> None:
        """Time ``call`` at every batch size (``make_input(batch)`` gives the input maker);
        a sample spanning ``calls_per_sample`` calls counts as that many calls."""
        self.progress.start(f"models: {label}, {self.device.type}")
        key, short = self.labels[label]
        for batch in self.batches:
            samples = time_calls(call, make_input(batch), self.device, self.timing)
            ms_call = median(samples) / calls_per_sample
            self._rows.append({"model": label, "device": self.device.type, "batch": batch, "ms_call": ms_call,
                               "ms_frame": ms_call / batch, "calls": len(samples) * calls_per_sample,
                               key: short, "case": f"{self.device.type}, batch {batch}"})
        self.progress.step()

    # -- vision: MTCNN, emotion net, the stage ---------------------------------------

    def _vision_cases(self) -> None:
        stage = VisionStage(VISION, stage_context(self.device, "vision"))
        stage.setup()
        try:
            detector = stage.detector
            astronaut = fixture_rgb(ASTRONAUT)
            faces = detector.detect([astronaut])[0]
            if not faces:
                raise RuntimeError(f"MTCNN found no face in {ASTRONAUT}; the timings need one")
            self._case("MTCNN detect, 1 face", detector.detect, lambda b: lambda: [astronaut] * b)
            group, group_faces = None, []
            if GROUP.is_file():
                group = fixture_rgb(GROUP)
                group_faces = detector.detect([group])[0]
                self.details["group_faces"] = len(group_faces)
                self._case("MTCNN detect, group photo", detector.detect, lambda b: lambda: [group] * b)
            for n in VERIFY_BOXES:
                # ONet's cost follows the box count, not which boxes: without n faces in a
                # fixture, the astronaut's box n times costs what n faces would.
                frame, boxes = ((group, [f.box for f in group_faces[:n]]) if len(group_faces) >= n
                                else (astronaut, [faces[0].box] * n))
                self.details[f"verify_{n}_source"] = "group photo" if frame is group else "astronaut"
                self._case(f"MTCNN verify, {n} box{'es' if n > 1 else ''}/frame",
                           lambda args: detector.verify(*args),
                           lambda b, frame=frame, boxes=boxes: lambda: ([frame] * b, [boxes] * b))
            self._emotion_case(stage)
            self._vision_stage_case(stage)
        finally:
            stage.teardown()
            release(self.device)

    def _emotion_case(self, stage: VisionStage) -> None:
        frame = fixture_frame(self.device)
        (probe,) = stage.process(frame_batch(frame, 1, 1, prefix="probe"))
        self.faces = probe.meta["faces"]  # what vision hands the generator
        if not self.faces:
            raise RuntimeError(f"the vision stage found no face in {ASTRONAUT}; the timings need one")
        gray = cv2.cvtColor(fixture_rgb(ASTRONAUT), cv2.COLOR_RGB2GRAY)
        crop = crop_face(gray, tuple(self.faces[0]["bbox"]), VISION.emotion_margin, border_value(gray))
        self._case("emotion net, 64x64 crop", stage.classify, lambda b: lambda: [crop] * b)

    def _vision_stage_case(self, stage: VisionStage) -> None:
        """Sessions ``b{batch}-s*``, consecutive frames; one sample = ``detect_every`` calls,
        so every sample holds one full detection per session and the rest verifications."""
        frame = fixture_frame(self.device)
        every = stage.config.detect_every
        counts = count_detector_calls(stage)
        index = itertools.count(1)

        def cycle(batches: list) -> None:
            for batch in batches:
                stage.process(batch)

        self._case(f"vision stage, detect every {every}", cycle,
                   lambda b: lambda: [frame_batch(frame, b, next(index), prefix=f"b{b}-s") for _ in range(every)],
                   calls_per_sample=every)
        self.details["vision_stage_frames"] = dict(counts)

    # -- generator: the style net alone, the stage with either renderer --------------

    def _style_net_cases(self) -> None:
        net = load_style_net(self.weights.path, self.device)
        frame = fixture_frame(self.device).permute(2, 0, 1)[None].float() / 255.0
        style = torch.as_tensor(emotion_style_weights(MOOD), device=self.device)[None]

        def forward(args: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            with torch.inference_mode():
                return net(*args)

        try:
            for side in STYLE_SIDES:
                image = F.interpolate(frame, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
                self._case(f"style net, {side} px", forward,
                           lambda b, image=image: lambda: (image.expand(b, -1, -1, -1).contiguous(),
                                                           style.expand(b, -1).contiguous()))
        finally:
            release(self.device)

    def _generator_case(self, model: str) -> None:
        config = GeneratorConfig(model=model, weights=str(self.weights.path) if model == "stylenet" else None)
        stage = GeneratorStage(config, stage_context(self.device, "generator"))
        stage.setup()
        frame = fixture_frame(self.device)
        index = itertools.count(1)  # sessions keep one capture clock across batch sizes, as a stream would
        label = f"generator stage, {'style net' if model == 'stylenet' else 'low-fi'} {SETTINGS_SIDE} px"
        try:
            self._case(label, stage.process, lambda b: lambda: frame_batch(frame, b, next(index), self.faces))
        finally:
            stage.teardown()
            release(self.device)


def count_detector_calls(stage: VisionStage) -> dict[str, int]:
    """Frames the stage's detector gets from now on, by kind ('detect': full cascade,
    'verify': ONet alone), counted through wrappers on the detector instance."""
    counts = {"detect": 0, "verify": 0}
    detector = stage.detector
    detect, verify = detector.detect, detector.verify

    def counted_detect(frames, *args, **kwargs):
        counts["detect"] += len(frames)
        return detect(frames, *args, **kwargs)

    def counted_verify(frames, *args, **kwargs):
        counts["verify"] += len(frames)
        return verify(frames, *args, **kwargs)

    detector.detect, detector.verify = counted_detect, counted_verify
    return counts


# -- target and notes ----------------------------------------------------------------

def vision_target(rows: list[dict[str, Any]]) -> Target:
    """The vision stage's steady-state CPU cost per frame, for the record (no bar to meet)."""
    cpu = {row["batch"]: row["ms_frame"] for row in rows
           if row["device"] == "cpu" and row["model"].startswith("vision stage")}
    goal = "informational (20 fps leaves a vision rank 50 ms per frame)"
    if not cpu:
        return Target(name=VISION_TARGET, goal=goal, measured="not measured", met=None)
    parts = [f"{ms:.1f} ms at batch {batch}" + (f" (one rank: <= {1000.0 / ms:.0f} FPS)" if batch == 1 else "")
             for batch, ms in sorted(cpu.items())]
    return Target(name=VISION_TARGET, goal=goal, measured="; ".join(parts), met=None)


def notes(options: BenchOptions, weights: StyleWeights, details: dict[str, Any]) -> list[str]:
    timing = details["timing"]
    load = details["load_avg_1min"]
    out = [f"Threads: torch.set_num_threads(1) and cv2.setNumThreads(1) for every row, what one pipeline rank gets "
           f"by default (compute.torch_threads / opencv_threads): on the CPU a rank's whole compute, on CUDA its "
           f"host side. The machine has {psutil.cpu_count()} logical core(s); "
           f"1-minute load average {load['before']:.2f} before, {load['after']:.2f} after (this section adds ~1; "
           "more means other programs competed for the cores and the figures are high).",
           f"Median of the timed calls after {timing['warmup']} warm-up call(s); at least {timing['min_calls']} "
           f"timed calls, more within {timing['budget_s']:g} s (at most {timing['max_calls']}). On CUDA the "
           "device is synchronised before and after each timed call, so host work and device work both count. "
           "ms per frame = ms per call / batch (frames per call; the emotion net gets one crop per frame).",
           f"Vision stage: each batch element is a session fed consecutive frames of {ASTRONAUT.name}; one sample "
           f"is {VISION.detect_every} process calls (a full MTCNN detection, then verifications by ONet alone, "
           "per session), reported per call."]
    for name, device in details["devices"].items():
        frames = device.get("vision_stage_frames", {})
        total = frames.get("detect", 0) + frames.get("verify", 0)
        if total:
            out.append(f"{name}: the vision stage ran a full detection on {frames['detect']} of {total} frames "
                       f"({frames['detect'] / total:.0%}; steady state is 1 in {VISION.detect_every}), "
                       f"verification on the rest.")
    first = next(iter(details["devices"].values()), {})
    if "group_faces" in first:
        out.append(f"Group photo {GROUP.name}: MTCNN found {first['group_faces']} face(s).")
    else:
        out.append(f"No group photo ({GROUP.name} missing): no group detection row.")
    if first.get(f"verify_{max(VERIFY_BOXES)}_source") == "astronaut":
        out.append(f"Verify of {max(VERIFY_BOXES)} boxes/frame: the astronaut's box {max(VERIFY_BOXES)} times "
                   "(ONet's cost follows the number of boxes, not which they are).")
    out.append(f"Style net and generator stage: emotion-blended style weights; the generator renders the default "
               f"{SETTINGS_SIDE} px portrait (net_side null: 192 px on a CPU, resized) with the default live "
               "settings.")
    if weights.note:
        out.append(f"Style net weights: {weights.note}.")
    if "cuda" in details["devices"]:
        out.append(f"CUDA rows: {torch.cuda.get_device_name(0)}; frames handed to the stages on the GPU.")
    else:
        out.append("No CUDA device on this machine: CPU rows only.")
    if options.quick:
        out.append(f"Quick run: batches {BATCHES[True]} and {TIMING[True].min_calls} timed call(s) per case; "
                   "these figures are not for quoting.")
    return out
