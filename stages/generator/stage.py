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
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from comms.message import Message
from core.config import check, check_choice, check_range
from core.settings import RuntimeSettings, RuntimeView
from stages.base import Stage
from stages.generator import lowfi, temporal
from stages.generator.framing import Framing, FramingEaser, choose_primary, cut_out, face_framing, full_frame
from stages.generator.renderers import LowFiRenderer, Mood, StyleNetRenderer
from stages.payloads import IMAGE_RGB
from stages.registry import register_stage

MODELS = ("stylenet", "lowfi")
"""Renderers a generator can run: the learned style net, or the low-fi stylizer."""

MAX_PHASE_STEP_S = 0.5
"""Longest time step the low-fi animation takes between two frames of a session (a paused
or reordered stream resumes where it was instead of skipping ahead or backwards)."""


@dataclass(kw_only=True, slots=True)
class GeneratorConfig:
    model: str = "stylenet"
    """Renderer: 'stylenet' (Magenta's 26-style network, shipped weights) or 'lowfi'
    (palette and warp effects, no network: the cheap fallback)."""
    weights: str | None = None
    """Style-net weights file; null means the shipped ``stages/generator/weights/multistyle26.pt``."""
    net_side: int | None = None
    """Side the style net runs at (64..1024), resized to the live ``output_size``; null
    means ``output_size`` on a GPU and at most 192 on a CPU (one core: ~25 ms at 192,
    ~46 ms at 256, ~61 ms at 320). Its cost grows with the square of the side."""
    face_margin: float = 0.45
    """Context kept around the face on each side, as a fraction of the face size (0..3)."""
    face_drop: float = 0.06
    """Window centre moved down the face by this fraction of its size, to show the chin."""
    min_face_quality: float = 0.0
    """Faces whose ``quality`` is below this are ignored (the frame counts as no-face)."""
    fallback_confidence: float = 0.5
    """Emotion confidence used when there is no face or the face has no probabilities."""
    face_hold_s: float = 0.3
    """After the primary face disappears, its framing and mood are kept this long before
    the portrait eases out to the whole frame (a missed frame or a blink does not zoom out)."""
    ease_s: float = 0.25
    """Time constant of the window's glide toward its target, in seconds (0 = no easing)."""
    animation_hz: float = 0.5
    """Base animation frequency of the low-fi warps; each emotion runs at a multiple of it."""
    max_sessions_state: int = 32
    """Sessions whose temporal state is kept; the least recently seen is dropped beyond."""
    session_idle_s: float = 30.0
    """A session unseen for this long loses its temporal state."""

    def __post_init__(self) -> None:
        check_choice(self.model, "model", MODELS)
        check(self.weights is None or bool(self.weights.strip()), "weights",
              "must be a file path or null (the shipped weights), got an empty string")
        if self.net_side is not None:
            check_range(self.net_side, "net_side", 64, 1024)
        check_range(self.face_margin, "face_margin", 0.0, 3.0)
        check_range(self.face_drop, "face_drop", -1.0, 1.0)
        check_range(self.min_face_quality, "min_face_quality", 0.0, 1.0)
        check_range(self.fallback_confidence, "fallback_confidence", 0.0, 1.0)
        check_range(self.face_hold_s, "face_hold_s", 0.0, 10.0)
        check_range(self.ease_s, "ease_s", 0.0, 5.0)
        check_range(self.animation_hz, "animation_hz", 0.0, 10.0)
        check(self.max_sessions_state >= 1, "max_sessions_state",
              f"must be >= 1, got {self.max_sessions_state}")
        check(self.session_idle_s > 0.0, "session_idle_s", f"must be > 0, got {self.session_idle_s}")


@dataclass(slots=True)
class _SessionState:
    last_seen: float
    easer: FramingEaser
    primary_id: Any = None  # face_id the portrait follows
    target: Framing | None = None  # framing of that face when it was last seen
    face_seen: float = 0.0  # capture time (s) the primary face was last seen
    mood: Mood | None = None  # its last mood, kept through face_hold_s
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
        self._sessions: OrderedDict[str, _SessionState] = OrderedDict()
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
        self._evict(now)

        items = [item for msg in batch if (item := self._prepare(msg, settings, now)) is not None]
        if not items:
            return []
        styled = self.renderer.render(torch.cat([it.crop for it in items]), [it.mood for it in items], settings)

        outputs = []
        # Sequential so two frames of one session in a batch smooth into each other.
        for i, it in enumerate(items):
            state = self._state(it.msg.session, now)
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
        frame = msg.tensors[0] if msg.tensors else None
        if frame is None or frame.dim() != 3 or frame.shape[2] != 3 or frame.dtype != torch.uint8 \
                or frame.shape[0] < 2 or frame.shape[1] < 2:
            shape = None if frame is None else (tuple(frame.shape), str(frame.dtype))
            self.log.warning("session %s frame %d: not an RGB uint8 HWC frame: %s", msg.session, msg.frame_id, shape)
            return self.reject(msg, "bad_frame", "generator got no image")
        height, width = int(frame.shape[0]), int(frame.shape[1])
        state = self._state(msg.session, now)
        # The capture clock drives easing and animation, so motion follows the camera's
        # timing and not queueing jitter; frames without one fall back to wall time.
        t = msg.capture_ts / 1000.0 if msg.capture_ts > 0 else time.time()
        face = choose_primary(msg.meta.get("faces") or [], state.primary_id, self.config.min_face_quality)
        if face is not None:
            state.primary_id = face.get("face_id")
            state.target = face_framing(face, self.config.face_margin, self.config.face_drop, width, height)
            state.face_seen = t
            state.mood = self._mood_of(face)
        elif state.target is None or t - state.face_seen > self.config.face_hold_s \
                or not _fits(state.target, width, height):
            state.primary_id, state.target, state.mood = None, None, None
        framing = state.easer.step(state.target or full_frame(width, height), t)
        mood = state.mood or Mood(emotion="neutral", confidence=self.config.fallback_confidence,
                                  probs={"neutral": 1.0}, phase=0.0)
        if isinstance(self.renderer, LowFiRenderer):
            # The phase is integrated per session: the speed changes with every confidence
            # wobble, and speed x absolute time would then jump around instead of flowing.
            step = 0.0 if state.clock is None else min(max(t - state.clock, 0.0), MAX_PHASE_STEP_S)
            hz = self.config.animation_hz * self.renderer.speed(mood, settings)
            state.phase = lowfi.advance_phase(state.phase, step, hz)
        state.clock = t
        mood = Mood(emotion=mood.emotion, confidence=mood.confidence, probs=mood.probs, phase=state.phase)
        crop = cut_out(frame.to(self.context.device, non_blocking=True), framing, settings.output_size)
        face_id = None if face is None and state.target is None else state.primary_id
        return _Item(msg=msg, crop=crop, framing=framing, mood=mood, face_id=face_id)

    def _mood_of(self, face: dict[str, Any]) -> Mood:
        label = str(face.get("emotion") or "neutral")
        probs = {str(k): float(v) for k, v in (face.get("emotion_probs") or {}).items()}
        confidence = probs.get(label, self.config.fallback_confidence)
        return Mood(emotion=label, confidence=float(confidence), probs=probs or {label: 1.0}, phase=0.0)

    def _state(self, session: str, now: float) -> _SessionState:
        state = self._sessions.get(session)
        if state is None:
            state = self._sessions[session] = _SessionState(last_seen=now, easer=FramingEaser(self.config.ease_s))
        else:
            state.last_seen = now
            self._sessions.move_to_end(session)
        while len(self._sessions) > self.config.max_sessions_state:
            dropped, _ = self._sessions.popitem(last=False)
            self.log.debug("dropped temporal state of session %s (over max_sessions_state)", dropped)
        return state

    def _evict(self, now: float) -> None:
        # The LRU order is also last-seen order, so idle sessions sit at the front.
        while self._sessions:
            session, state = next(iter(self._sessions.items()))
            if now - state.last_seen < self.config.session_idle_s:
                break
            del self._sessions[session]
            self.log.debug("dropped temporal state of idle session %s", session)

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


def _fits(framing: Framing, width: int, height: int) -> bool:
    """Whether a held framing still lies inside a ``width`` x ``height`` frame (the capture
    size can change between frames)."""
    half = framing.side / 2.0
    return half <= framing.cx <= width - half and half <= framing.cy <= height - half
