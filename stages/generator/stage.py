"""The generator stage: frame the primary face and turn it into a stylized portrait.

Per micro-batch it reads the live settings once; for each frame it picks the primary
face (``framing.choose_primary``), eases the session's window toward that face's
landmark-aligned framing (or the whole frame when nobody is there) and cuts the window
out on the stage's device; then one renderer call styles every crop of the batch
(``renderers``: the learned style net by default, the low-fi stylizer as the cheap
fallback), each with its own face's emotion. A motion-gated EMA (``temporal.smooth``)
calms flicker without ghosting. Per-session state (window, primary face, last mood,
previous output) lives in a small LRU, evicted when a session goes idle.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from comms.message import Message
from core.config import check, check_choice, check_range
from core.settings import RuntimeSettings, RuntimeView
from stages.base import Stage
from stages.generator import lowfi, temporal
from stages.generator.framing import FaceFollower, Framing, PortraitConfig, cut_out
from stages.generator.renderers import LowFiRenderer, Mood, StyleNetRenderer
from stages.payloads import IMAGE_RGB, capture_seconds, describe_tensor, rgb_image
from stages.registry import register_stage
from stages.session_states import SessionStates

MODELS = ("stylenet", "lowfi")
"""Renderers a generator can run: the learned style net, or the low-fi stylizer."""

MAX_PHASE_STEP_S = 0.5
"""Longest time step the low-fi animation takes between two frames of a session (a paused
or reordered stream resumes where it was instead of skipping ahead or backwards)."""


@dataclass(kw_only=True, slots=True)
class GeneratorConfig(PortraitConfig):
    model: str = "stylenet"
    """Renderer: 'stylenet' (Magenta's 26-style network, shipped weights) or 'lowfi'
    (palette and warp effects, no network: the cheap fallback)."""
    weights: str | None = None
    """Style-net weights file; null means the shipped ``stages/generator/weights/multistyle26.pt``."""
    net_side: int | None = None
    """Side the style net runs at (64..1024), resized to the live ``output_size``; null
    means ``output_size`` on a GPU and at most 192 on a CPU (one core: ~25 ms at 192,
    ~46 ms at 256, ~61 ms at 320). Its cost grows with the square of the side."""
    animation_hz: float = 0.5
    """Base animation frequency of the low-fi warps; each emotion runs at a multiple of it."""
    def __post_init__(self) -> None:
        check_choice(self.model, "model", MODELS)
        check(self.weights is None or bool(self.weights.strip()), "weights",
              "must be a file path or null (the shipped weights), got an empty string")
        if self.net_side is not None:
            check_range(self.net_side, "net_side", 64, 1024)
        self.check_portrait()
        check_range(self.animation_hz, "animation_hz", 0.0, 10.0)


@dataclass(slots=True)
class _SessionState:
    follower: FaceFollower
    clock: float | None = None  # capture time (s) of the last frame, for the animation
    phase: float = 0.0  # low-fi animation phase, radians
    previous: torch.Tensor | None = field(default=None)  # [3, S, S] float on the device


@dataclass(slots=True)
class _Item:
    msg: Message
    crop: torch.Tensor  # [1, 3, S, S] float 0..1 on the device
    framing: Framing
    mood: Mood
    face_id: Any


@register_stage
class GeneratorStage(Stage):
    """Takes frames (``IMAGE_RGB``, with meta["faces"] when vision found any); emits
    portraits (``IMAGE_RGB``: tensors[0] an RGB uint8 HWC square portrait of the live
    ``output_size``, on the stage's device) with the input meta plus meta["style"] =
    {generator, name, emotion, confidence, face_id (the primary face, or None), crop
    [x, y, w, h], angle (degrees)} and ``revision`` = the live settings' revision it was
    made with. Frames whose tensor is not an HWC RGB image are dropped with a
    ``bad_frame`` event."""

    kind = "generator"
    Config = GeneratorConfig
    accepts = IMAGE_RGB
    emits = IMAGE_RGB

    def setup(self) -> None:
        cfg = self.config
        self._sessions = SessionStates(
            lambda now: _SessionState(follower=FaceFollower.from_config(cfg)),
            max_sessions=cfg.max_sessions_state, idle_s=cfg.session_idle_s, log=self.log, what="temporal state")
        device = self.context.device
        weights = None if self.config.weights is None else Path(self.config.weights)
        self.renderer = (StyleNetRenderer(device, weights, self.config.net_side) if self.config.model == "stylenet"
                         else LowFiRenderer(device))
        # Warm up: the first calls pick kernels and build grids and palette tables.
        settings = self.context.runtime().settings
        size = settings.output_size
        mood = Mood(emotion="neutral", confidence=0.5, probs={"neutral": 1.0}, phase=0.0)
        self.renderer.render(torch.zeros(1, 3, size, size, device=device), [mood], settings)
        self.log.info("generator ready: %s on %s", self.renderer.name, device)

    def process(self, batch: list[Message]) -> list[Message]:
        if not batch:
            return []
        started = time.time()
        view = self.context.runtime()
        settings = view.settings
        now = time.monotonic()
        self._sessions.evict_idle(now)

        items = [item for msg in batch if (item := self._prepare(msg, settings, now)) is not None]
        if not items:
            return []
        styled = self.renderer.render(torch.cat([it.crop for it in items]), [it.mood for it in items], settings)

        outputs = []
        # Sequential so two frames of one session in a batch smooth into each other.
        for i, it in enumerate(items):
            state = self._sessions.get(it.msg.session, now)
            frame = temporal.smooth(styled[i], state.previous, settings.smoothing)
            # styled[i] is a view of the whole batch: keeping it would pin max_batch frames
            # per session; without smoothing nothing needs keeping at all.
            state.previous = None if settings.smoothing <= 0 else (
                frame.clone() if frame.data_ptr() == styled[i].data_ptr() else frame)
            portrait = (frame * 255.0).round_().to(torch.uint8).permute(1, 2, 0).contiguous()
            outputs.append(self._emit(it, portrait, view, settings, started))
        return outputs

    def teardown(self) -> None:
        sessions = getattr(self, "_sessions", None)
        if sessions is not None:
            sessions.clear()

    def _prepare(self, msg: Message, settings: RuntimeSettings, now: float) -> _Item | None:
        """Frame, cut out and choose the mood of one frame; None (and an event) if unusable."""
        frame = rgb_image(msg)
        if frame is None:
            return self.reject(msg, "bad_frame", f"generator got no RGB uint8 H x W x 3 image: {describe_tensor(msg)}")
        height, width = int(frame.shape[0]), int(frame.shape[1])
        state = self._sessions.get(msg.session, now)
        t = capture_seconds(msg)
        framing = state.follower.follow(msg.meta.get("faces") or [], width, height, t)
        mood = self._mood_of(state.follower.face)
        if isinstance(self.renderer, LowFiRenderer):
            # The phase is integrated per session: the speed changes with every confidence
            # wobble, and speed x absolute time would then jump around instead of flowing.
            step = 0.0 if state.clock is None else min(max(t - state.clock, 0.0), MAX_PHASE_STEP_S)
            hz = self.config.animation_hz * self.renderer.speed(mood, settings)
            state.phase = lowfi.advance_phase(state.phase, step, hz)
        state.clock = t
        mood = Mood(emotion=mood.emotion, confidence=mood.confidence, probs=mood.probs, phase=state.phase)
        crop = cut_out(frame.to(self.context.device, non_blocking=True), framing, settings.output_size)
        return _Item(msg=msg, crop=crop, framing=framing, mood=mood, face_id=state.follower.face_id)

    def _mood_of(self, face: dict[str, Any] | None) -> Mood:
        if face is None:
            return Mood(emotion="neutral", confidence=self.config.fallback_confidence, probs={"neutral": 1.0},
                        phase=0.0)
        label = str(face.get("emotion") or "neutral")
        probs = {str(k): float(v) for k, v in (face.get("emotion_probs") or {}).items()}
        confidence = probs.get(label, self.config.fallback_confidence)
        return Mood(emotion=label, confidence=float(confidence), probs=probs or {label: 1.0}, phase=0.0)

    def _emit(self, it: _Item, portrait: torch.Tensor, view: RuntimeView, settings: RuntimeSettings,
              started: float) -> Message:
        meta = dict(it.msg.meta)
        meta["style"] = {
            "generator": self.renderer.name,
            "name": self.renderer.style_name(it.mood, settings),
            "emotion": it.mood.emotion,
            "confidence": round(it.mood.confidence, 4),
            "face_id": it.face_id,
            "crop": it.framing.box(),
            "angle": round(math.degrees(it.framing.angle), 1),
        }
        out = it.msg.derive(tensors=[portrait], meta=meta)
        out.revision = view.revision
        return out.stamp("generator.start", started).stamp("generator.end")

    @property
    def sessions_tracked(self) -> int:
        """How many sessions currently hold temporal state."""
        return len(self._sessions)
