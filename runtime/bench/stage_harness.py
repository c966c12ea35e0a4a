"""Real stages and networks outside a pipeline, for the sections that time them ('models', 'gpu').

What both sections need to build a stage as a rank builds it and feed it the fixture:

- ``fixture_rgb`` / ``fixture_frame``: a 640x480 fixture as RGB uint8 (numpy, or a torch
  tensor on the device: frames reach a GPU stage on the GPU, as an NCCL link delivers them);
- ``stage_context``: a ``StageContext`` with the default live settings;
- ``frame_batch``: one micro-batch, frame ``index`` of sessions ``s0..s{batch-1}``, as
  ingest hands vision (no faces) or vision hands the generator (with ``faces``);
- ``style_weights``: the style net's weights file; while the shipped one is missing, a
  stand-in of the same shape (random values, so every figure can still be measured: a
  dense float network costs the same whatever its weights; the notes say so);
- ``time_calls``: median-ready samples of one call, synchronised on CUDA;
- ``recompile_limit``: room for every compiled variant a GPU part asks of torch.compile.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from comms.message import Kind, Message
from core.settings import RuntimeSettings, RuntimeView
from stages.base import StageContext
from stages.generator.stylenet import DEFAULT_WEIGHTS as STYLE_WEIGHTS, StyleNet

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
ASTRONAUT = FIXTURES / "astronaut_640x480.jpg"
"""One face (Eileen Collins), 640x480."""
GROUP = FIXTURES / "group6_640x480.jpg"
"""Six faces, 640x480; optional (sections time the group cases only when it exists)."""
FRAME_MS = 50.0
"""Capture clock step between a session's frames (20 fps), for easing and animation."""
STANDIN_NOTE = ("the shipped style-net weights ({path}) are missing, so the style net ran with stand-in "
                "weights of the same shape (random values): the timings hold, a dense float network "
                "costs the same whatever its weights; the pictures would not")


def fixture_rgb(path: Path = ASTRONAUT) -> np.ndarray:
    """The fixture as an H x W x 3 RGB uint8 array."""
    bgr = cv2.imread(str(path))
    if bgr is None:
        raise FileNotFoundError(f"benchmark fixture missing or unreadable: {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def fixture_frame(device: torch.device, path: Path = ASTRONAUT) -> torch.Tensor:
    """The fixture as an RGB uint8 HWC tensor on ``device``."""
    return torch.from_numpy(fixture_rgb(path)).to(device)


def stage_context(device: torch.device, role: str, settings: RuntimeSettings | None = None) -> StageContext:
    """What a rank hands a stage: rank 0, replica 0, ``settings`` (default: the defaults) as revision 1."""
    view = RuntimeView(revision=1, settings=settings or RuntimeSettings())
    return StageContext(rank=0, role=role, replica=0, device=device,
                        logger=logging.getLogger(f"bench.{role}"), runtime=lambda: view)


def frame_batch(frame: torch.Tensor, batch: int, index: int, faces: list[dict[str, Any]] | None = None,
                prefix: str = "s") -> list[Message]:
    """Frame ``index`` of sessions ``{prefix}0..{prefix}{batch-1}``: camera frames (``faces``
    None) or analysed ones carrying ``faces`` in their meta (what vision hands the generator)."""
    meta = {} if faces is None else {"faces": faces}
    return [Message(kind=Kind.DATA, session=f"{prefix}{s}", frame_id=index, capture_ts=index * FRAME_MS,
                    meta=dict(meta), tensors=[frame]) for s in range(batch)]


@dataclass(frozen=True, slots=True)
class StyleWeights:
    path: Path
    """The file to load (``GeneratorConfig.weights`` / ``load_style_net``)."""
    standin: bool
    """True when ``path`` is a stand-in for missing shipped weights."""

    @property
    def note(self) -> str | None:
        """What the report must say about the weights, None when they are the shipped ones."""
        return STANDIN_NOTE.format(path=STYLE_WEIGHTS) if self.standin else None


def style_weights(scratch: Path) -> StyleWeights:
    """The shipped style-net weights, or (while they are missing) a stand-in written to
    ``scratch/standin-multistyle26.pt``: random values, seeded, so runs are comparable."""
    if STYLE_WEIGHTS.is_file():
        return StyleWeights(path=STYLE_WEIGHTS, standin=False)
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "standin-multistyle26.pt"
    generator = torch.Generator().manual_seed(0)
    state = {key: (torch.randn(value.shape, generator=generator) * 0.05 + (1.0 if key.endswith("gamma") else 0.0))
             for key, value in StyleNet().state_dict().items()}
    torch.save(state, path)
    return StyleWeights(path=path, standin=True)


@dataclass(frozen=True, slots=True)
class Timing:
    """How often one case is called: ``warmup`` untimed calls, then timed calls until
    both ``min_calls`` and ``budget_s`` are reached, never more than ``max_calls``."""

    warmup: int
    min_calls: int
    budget_s: float
    max_calls: int

    def __post_init__(self) -> None:
        if self.warmup < 0 or not 1 <= self.min_calls <= self.max_calls or not self.budget_s >= 0:
            raise ValueError(f"timing: need warmup >= 0, 1 <= min_calls <= max_calls, budget_s >= 0; got {self}")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU): a timed call must include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Hand cached device memory back between cases (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_calls(call: Callable[[Any], Any], make_input: Callable[[], Any], device: torch.device,
               timing: Timing) -> list[float]:
    """Milliseconds of each timed ``call(make_input())``. Inputs are made outside the timed
    span; on CUDA the device is synchronised before and after each call, so the span holds
    the call's host work and all the device work it queued (CUDA events alone would miss
    the host side, which a pipeline rank pays too)."""
    for _ in range(timing.warmup):
        call(make_input())
    sync(device)
    samples: list[float] = []
    deadline = time.monotonic() + timing.budget_s
    while len(samples) < timing.max_calls and (len(samples) < timing.min_calls or time.monotonic() < deadline):
        inputs = make_input()
        sync(device)
        started = time.perf_counter()
        call(inputs)
        sync(device)
        samples.append((time.perf_counter() - started) * 1000.0)
    return samples


@contextlib.contextmanager
def recompile_limit(limit: int) -> Iterator[None]:
    """Dynamo's recompile limit raised to at least ``limit`` while the block runs: each batch
    size (and dtype) a GPU part compiles is one more variant of the same function, and past
    the limit torch silently runs eager, which would time the wrong thing."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # its name before 2.6
    saved = getattr(config, name)
    setattr(config, name, max(saved, limit))
    try:
        yield
    finally:
        setattr(config, name, saved)
