"""The generator stage: crop the main face and turn it into an animated low-fi portrait.

Per micro-batch it reads the live settings once, crops each frame around its largest
face (or the centre when there is none), resizes every crop to ``output_size`` on the
stage's device and styles them all in one ``lowfi.stylize`` call, each with the style
of its own emotion. Per-session state (previous output for temporal smoothing, crop
box for a steady framing) is kept in a small LRU, evicted when a session goes idle.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from comms.message import Message
from core.config import check, check_range
from core.settings import RuntimeView
from stages.base import Stage
from stages.generator import lowfi
from stages.payloads import IMAGE_RGB
from stages.prompt import StylePrompt, style_prompt
from stages.registry import register_stage

MAX_PHASE_STEP_S = 0.5
"""Longest time step the animation takes between two frames of a session (a paused or
reordered stream resumes where it was instead of skipping ahead or backwards)."""


@dataclass(kw_only=True, slots=True)
class GeneratorConfig:
    face_margin: float = 0.55
    """Context kept around the face on each side, as a fraction of the face size."""
    face_drop: float = 0.05
    """Crop centre moved down by this fraction of the face height, to show the chin."""
    min_face_quality: float = 0.0
    """Faces whose ``quality`` is below this are ignored (the frame counts as no-face)."""
    fallback_confidence: float = 0.5
    """Emotion confidence used when there is no face or the face has no probabilities."""
    face_hold_s: float = 0.5
    """A session's last face framing and emotion are kept this long when detection misses
    a few frames, so the portrait does not jump to the centre crop and back."""
    box_smoothing: float = 0.6
    """EMA of the crop box per session, 0 (follow every detection) to 0.95 (very steady)."""
    animation_hz: float = 0.5
    """Base animation frequency; each emotion runs at a multiple of it."""
    max_sessions_state: int = 32
    """Sessions whose temporal state is kept; the least recently seen is dropped beyond."""
    session_idle_s: float = 30.0
    """A session unseen for this long loses its temporal state."""

    def __post_init__(self) -> None:
        check_range(self.face_margin, "face_margin", 0.0, 3.0)
        check_range(self.face_drop, "face_drop", -1.0, 1.0)
        check_range(self.min_face_quality, "min_face_quality", 0.0, 1.0)
        check_range(self.fallback_confidence, "fallback_confidence", 0.0, 1.0)
        check_range(self.face_hold_s, "face_hold_s", 0.0, 10.0)
        check_range(self.box_smoothing, "box_smoothing", 0.0, 0.95)
        check_range(self.animation_hz, "animation_hz", 0.0, 10.0)
        check(self.max_sessions_state >= 1, "max_sessions_state",
              f"must be >= 1, got {self.max_sessions_state}")
        check(self.session_idle_s > 0.0, "session_idle_s", f"must be > 0, got {self.session_idle_s}")


@dataclass(slots=True)
class _SessionState:
    last_seen: float
    box: tuple[float, float, float] | None = None  # centre x, centre y, side (pixels)
    face_seen: float = 0.0  # monotonic time the box last followed a detected face
    emotion: tuple[str, float] = ("neutral", 0.0)  # label and confidence of that face
    clock: float | None = None  # capture time (s) of the last frame, for the phase step
    phase: float = 0.0  # animation phase, radians
    previous: torch.Tensor | None = field(default=None)  # [3, S, S] float on the device


@dataclass(slots=True)
class _Item:
    msg: Message
    crop: torch.Tensor  # [1, 3, S, S] float 0..1 on the device
    box: tuple[int, int, int]  # x0, y0, side of the crop in the frame
    prompt: StylePrompt
    face_id: Any
    phase: float


@register_stage
class GeneratorStage(Stage):
    """Takes frames (``IMAGE_RGB``, with meta["faces"] largest first when vision found
    any); emits portraits (``IMAGE_RGB``: tensors[0] an RGB uint8 HWC square
    portrait of the live ``output_size``, on the stage's device) with the input meta
    (faces kept) plus meta["style"] = {name, prompt, emotion, confidence, face_id,
    crop [x, y, w, h]} and ``revision`` = the live settings' revision it was made with.
    Frames whose tensor is not an HWC RGB image are dropped with a ``bad_frame`` event."""

    kind = "generator"
    Config = GeneratorConfig
    accepts = IMAGE_RGB
    emits = IMAGE_RGB

    def setup(self) -> None:
        self._sessions: OrderedDict[str, _SessionState] = OrderedDict()
        self._luts: dict[str, torch.Tensor] = {}
        # Warm up: first calls build grids, kernels and palette tables.
        view = self.context.runtime()
        size = view.settings.output_size
        warmup_frame = torch.zeros(1, 3, size, size, device=self.context.device)
        prompt = style_prompt("neutral", 0.5, "auto")
        lowfi.stylize(warmup_frame, lowfi.LowFiBatch.from_prompts([prompt], [0.0], 0.5, self.context.device, self._luts))

    def process(self, batch: list[Message]) -> list[Message]:
        if not batch:
            return []
        started = time.time()
        view = self.context.runtime()
        settings = view.settings
        size = settings.output_size
        now = time.monotonic()
        self._evict(now)

        items = [item for msg in batch if (item := self._prepare(msg, settings, size, now)) is not None]
        if not items:
            return []
        crops = torch.cat([it.crop for it in items])
        params = lowfi.LowFiBatch.from_prompts([it.prompt for it in items], [it.phase for it in items],
                                               settings.strength, self.context.device, self._luts)
        styled = lowfi.stylize(crops, params)

        outputs = []
        # Sequential so two frames of one session in a batch smooth into each other.
        for i, it in enumerate(items):
            state = self._state(it.msg.session, now)
            frame = lowfi.temporal_smooth(styled[i], state.previous, settings.smoothing)
            # styled[i] is a view of the whole batch: keeping it would pin max_batch frames
            # per session; without smoothing nothing needs keeping at all.
            state.previous = None if settings.smoothing <= 0 else (
                frame.clone() if frame.data_ptr() == styled[i].data_ptr() else frame)
            portrait = (frame * 255.0).round_().to(torch.uint8).permute(1, 2, 0).contiguous()
            outputs.append(self._emit(it, portrait, view, started))
        return outputs

    def teardown(self) -> None:
        sessions = getattr(self, "_sessions", None)
        if sessions is not None:
            sessions.clear()
            self._luts.clear()

    def _prepare(self, msg: Message, settings: Any, size: int, now: float) -> _Item | None:
        """Crop, resize and choose the style of one frame; None (and an event) if unusable."""
        frame = msg.tensors[0] if msg.tensors else None
        if frame is None or frame.dim() != 3 or frame.shape[2] != 3 or frame.dtype != torch.uint8 \
                or frame.shape[0] < 2 or frame.shape[1] < 2:
            shape = None if frame is None else (tuple(frame.shape), str(frame.dtype))
            self.log.warning("session %s frame %d: not an RGB uint8 HWC frame: %s", msg.session, msg.frame_id, shape)
            return self.reject(msg, "bad_frame", "generator got no image")
        height, width = int(frame.shape[0]), int(frame.shape[1])
        face = self._main_face(msg.meta.get("faces") or [])
        state = self._state(msg.session, now)
        box = self._crop_box(face, width, height, state, now)
        x0, y0, side = box
        crop = frame[y0:y0 + side, x0:x0 + side].to(self.context.device, non_blocking=True)
        crop = crop.permute(2, 0, 1).unsqueeze(0)  # a channels-last view: no copy
        if side != size and crop.device.type == "cpu":
            # The CPU has a SIMD uint8 resize path (~10x faster than float on one thread).
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        crop = crop.float().div_(255.0)
        if side != size and crop.device.type != "cpu":
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                                 antialias=side > size).clamp_(0.0, 1.0)
        crop = crop.contiguous()
        if face is not None:
            state.emotion = self._emotion(face)
        elif now - state.face_seen > self.config.face_hold_s:
            state.emotion = ("neutral", self.config.fallback_confidence)
        prompt = style_prompt(*state.emotion, settings.style)
        # The capture clock animates the portrait, so the motion follows the camera's
        # timing and not queueing jitter; frames without one fall back to wall time. The
        # phase is integrated per session: the speed changes with every confidence
        # wobble, and speed × absolute time would then jump around instead of flowing.
        t = msg.capture_ts / 1000.0 if msg.capture_ts > 0 else time.time()
        step = 0.0 if state.clock is None else min(max(t - state.clock, 0.0), MAX_PHASE_STEP_S)
        state.clock = t
        state.phase = lowfi.advance_phase(state.phase, step, self.config.animation_hz * prompt.speed)
        phase = state.phase
        face_id = None if face is None else face.get("face_id")
        return _Item(msg=msg, crop=crop, box=box, prompt=prompt, face_id=face_id, phase=phase)

    def _main_face(self, faces: list[dict[str, Any]]) -> dict[str, Any] | None:
        best, best_area = None, 0.0
        for face in faces:
            bbox = face.get("bbox")
            if not bbox or len(bbox) != 4 or float(face.get("quality", 1.0)) < self.config.min_face_quality:
                continue
            area = float(bbox[2]) * float(bbox[3])
            if area > best_area:
                best, best_area = face, area
        return best

    def _crop_box(self, face: dict[str, Any] | None, width: int, height: int,
                  state: _SessionState, now: float) -> tuple[int, int, int]:
        """Square crop (x0, y0, side) inside the frame around the face, or the centre."""
        limit = min(width, height)
        if face is not None:
            x, y, w, h = (float(v) for v in face["bbox"])
            target = (x + w / 2.0, y + h / 2.0 + self.config.face_drop * h,
                      max(w, h) * (1.0 + 2.0 * self.config.face_margin))
            if state.box is None:
                state.box = target
            else:
                a = self.config.box_smoothing
                state.box = tuple(a * p + (1.0 - a) * t for p, t in zip(state.box, target))
            state.face_seen = now
        elif state.box is None or now - state.face_seen > self.config.face_hold_s:
            # No face for a while: a centred square; forget the framing so the next face
            # snaps to it instead of gliding over from where the last one was.
            state.box = None
            return (width - limit) // 2, (height - limit) // 2, limit
        cx, cy, side = state.box
        side_px = int(round(min(max(side, 2.0), limit)))
        x0 = int(round(min(max(cx - side_px / 2.0, 0.0), width - side_px)))
        y0 = int(round(min(max(cy - side_px / 2.0, 0.0), height - side_px)))
        return x0, y0, side_px

    def _emotion(self, face: dict[str, Any] | None) -> tuple[str, float]:
        if face is None:
            return "neutral", self.config.fallback_confidence
        label = str(face.get("emotion") or "neutral")
        probs = face.get("emotion_probs") or {}
        confidence = probs.get(label, self.config.fallback_confidence)
        return label, float(confidence)

    def _state(self, session: str, now: float) -> _SessionState:
        state = self._sessions.get(session)
        if state is None:
            state = self._sessions[session] = _SessionState(last_seen=now)
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

    def _emit(self, it: _Item, portrait: torch.Tensor, view: RuntimeView, started: float) -> Message:
        x0, y0, side = it.box
        meta = dict(it.msg.meta)
        meta["style"] = {
            "name": it.prompt.name,
            "prompt": it.prompt.text,
            "emotion": it.prompt.emotion,
            "confidence": round(it.prompt.confidence, 4),
            "face_id": it.face_id,
            "crop": [x0, y0, side, side],
        }
        out = it.msg.derive(tensors=[portrait], meta=meta)
        out.revision = view.revision
        return out.stamp("generator.start", started).stamp("generator.end")

    @property
    def sessions_tracked(self) -> int:
        """How many sessions currently hold temporal state."""
        return len(self._sessions)
