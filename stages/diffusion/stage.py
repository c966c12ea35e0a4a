"""The diffusion stage: the generator's portrait, painted by an img2img diffusion model.

It frames the primary face exactly as the generator does (``stages.generator.framing``:
landmark-aligned window, sticky primary face, easing), cuts the window out at the
model's side, and asks the curated emotion → style table (``stages.prompt``) for the
prompt. Per micro-batch, the frames that need a render go through one
``RealtimeImg2Img.render`` call (one UNet call per step for every session in the batch);
the others show their session's previous portrait again (``meta["style"]["skipped"]``):

* a crop too similar to the session's last rendered one (``gating.SimilarityFilter``);
* a session over its render budget (``gating.TokenBucket``).

A changed prompt (emotion, intensity, live style) or live strength always renders,
budget permitting. The live ``strength`` blends the render with the photo crop, as the
generator's does; the portrait is resized to the live ``output_size`` and smoothed by
``stages.generator.temporal.smooth``. Per-session state lives in a bounded LRU, dropped
when a session goes idle.

Without a ``model_path`` the stage loads nothing and never paints from random weights:
``setup`` succeeds, ``unavailable()`` / ``status()`` say why it cannot serve, and every
frame is rejected with a ``diffusion_unavailable`` event so the pipeline's fallback
serves instead. A model that is named but cannot be loaded fails startup, saying what
is missing.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from comms.message import Message
from core.settings import RuntimeSettings, RuntimeView
from stages.base import Stage, StageContext
from stages.diffusion.config import DiffusionConfig
from stages.diffusion.gating import SimilarityFilter, TokenBucket
from stages.diffusion.loading import load_model, resolve_dtype
from stages.diffusion.prompts import PromptEmbeddings, canonical_prompts
from stages.diffusion.realtime import RealtimeImg2Img
from stages.generator import temporal
from stages.generator.framing import FaceFollower, cut_out
from stages.payloads import IMAGE_RGB, capture_seconds, describe_tensor, rgb_image
from stages.prompt import StylePrompt, style_prompt
from stages.registry import register_stage
from stages.session_states import SessionStates

UNCONFIGURED = "diffusion: no model configured"
NOT_SET_UP = "diffusion: not set up"


@dataclass(slots=True)
class _Rendered:
    """A session's last rendered portrait and what it was made from."""

    portrait: torch.Tensor  # [3, size, size] float 0..1, blended with the photo, on the device
    signature: torch.Tensor  # the crop's similarity signature
    prompt_text: str
    strength: float  # live strength it was blended with
    style: dict[str, Any]  # meta["style"] of the render


@dataclass(slots=True)
class _SessionState:
    follower: FaceFollower  # the primary face, its window, and the face kept through face_hold_s
    bucket: TokenBucket
    rendered: _Rendered | None = None
    skipped_in_row: int = 0
    previous: torch.Tensor | None = field(default=None)  # last output at output_size, for smoothing


@dataclass(slots=True)
class _Item:
    msg: Message
    state: _SessionState
    crop: torch.Tensor  # [1, 3, size, size] float 0..1 on the device
    prompt: StylePrompt
    style: dict[str, Any]  # meta["style"] if this frame is rendered


@register_stage
class DiffusionStage(Stage):
    """Takes frames (``IMAGE_RGB``, with meta["faces"] when vision found any); emits
    portraits (``IMAGE_RGB``: an RGB uint8 HWC square of the live ``output_size``, on the
    stage's device) with the input meta plus meta["style"] = {generator: 'diffusion',
    name, emotion, confidence, face_id, crop, angle, skipped} and ``revision`` = the live
    settings' revision. ``skipped`` is true when the previous portrait was shown again
    (the crop was too similar, or the session was over its render budget); name, emotion,
    crop and angle then describe that portrait. Frames that are not an HWC RGB image are
    dropped with ``bad_frame``; every frame is dropped with ``diffusion_unavailable``
    while the stage has no model."""

    kind = "diffusion"
    Config = DiffusionConfig
    accepts = IMAGE_RGB
    emits = IMAGE_RGB

    def __init__(self, config: DiffusionConfig, context: StageContext) -> None:
        super().__init__(config, context)
        self._reason: str | None = NOT_SET_UP
        self._sessions = SessionStates(
            lambda now: _SessionState(
                follower=FaceFollower.from_config(config),
                bucket=TokenBucket.full(config.regen_rate, config.regen_burst, now)),
            max_sessions=config.max_sessions_state, idle_s=config.session_idle_s, log=self.log)
        self.loop: RealtimeImg2Img | None = None
        self.prompts: PromptEmbeddings | None = None
        self._filter: SimilarityFilter | None = None

    def setup(self) -> None:
        config = self.config
        if config.model_path is None:
            self._reason = UNCONFIGURED
            self.log.warning("%s: frames are rejected (diffusion_unavailable) for the fallback to serve", UNCONFIGURED)
            return
        device = self.context.device
        dtype = resolve_dtype(config.dtype, device)
        started = time.monotonic()
        model = load_model(config.model_path, device, dtype, variant=config.variant,
                           tiny_autoencoder_path=config.tiny_autoencoder_path)
        if config.cuda_graphs and device.type != "cuda":
            self.log.info("diffusion: cuda_graphs ignored on %s", device)
        self.prompts = PromptEmbeddings(model.tokenizers, model.text_encoders, device, dtype, config.prompt_cache_size)
        self.loop = RealtimeImg2Img(model, size=config.size, steps=config.steps, strength=config.strength,
                                    guidance_scale=config.guidance_scale, seed=config.seed, compile=config.compile,
                                    cuda_graphs=config.cuda_graphs, channels_last=config.channels_last)
        self._filter = SimilarityFilter(config.similarity_threshold, config.similarity_max_skips,
                                        random.Random(config.seed))
        # Warm up before saying ready: every curated prompt encoded, and one render (kernel
        # choice, compilation, the batch-1 CUDA graph) so the first sitter does not wait.
        self.prompts.warm(canonical_prompts())
        neutral = style_prompt("neutral", config.fallback_confidence, self.context.runtime().settings.style)
        self._render(torch.zeros(1, 3, config.size, config.size, device=device), [neutral])
        self._reason = None
        self.log.info("diffusion ready: %s (%s, %s, %d steps, strength %g) on %s in %.1f s", model.path,
                      str(dtype).removeprefix("torch."), type(model.scheduler).__name__, config.steps,
                      config.strength, device, time.monotonic() - started)

    def unavailable(self) -> str | None:
        """Why the stage cannot serve (no model configured, not set up), or None."""
        return self._reason

    def report(self) -> dict[str, Any] | None:
        """Denoising steps run so far, for rank 0's ``mindmirror_diffusion_steps_total``."""
        loop = self.loop
        return None if loop is None else {"diffusion": {"steps": loop.steps_run}}

    def status(self) -> dict[str, Any]:
        """{"ready": bool, "reason": why not (None when ready)}."""
        return {"ready": self._reason is None, "reason": self._reason}

    def process(self, batch: list[Message]) -> list[Message]:
        if not batch:
            return []
        if self._reason is not None:
            for msg in batch:
                self.reject(msg, "diffusion_unavailable", self._reason)
            return []
        started = time.time()
        view = self.context.runtime()
        settings = view.settings
        now = time.monotonic()
        self._sessions.evict_idle(now)
        items = [item for msg in batch if (item := self._prepare(msg, settings, now)) is not None]
        if not items:
            return []
        crops = torch.cat([it.crop for it in items])
        signatures = self._filter.signatures(crops)
        similarities = self._filter.similarities(
            signatures, [None if it.state.rendered is None else it.state.rendered.signature for it in items])
        chosen = [i for i, it in enumerate(items) if self._wants_render(it, similarities[i], settings, now)]
        if chosen:
            styled = self._render(crops[chosen], [items[i].prompt for i in chosen])
            portraits = torch.lerp(crops[chosen], styled, settings.strength)
            for row, i in enumerate(chosen):
                it = items[i]
                # Copies: a row view would keep the whole batch alive per session.
                it.state.rendered = _Rendered(portrait=portraits[row].clone(), signature=signatures[i].clone(),
                                              prompt_text=it.prompt.text, strength=settings.strength,
                                              style=it.style)
        rendered = set(chosen)
        # Sequential so two frames of one session in a batch smooth into each other.
        return [self._emit(it, i not in rendered, view, settings, started) for i, it in enumerate(items)]

    def teardown(self) -> None:
        self._sessions.clear()
        self.loop = None
        self.prompts = None
        if self._reason is None:
            self._reason = NOT_SET_UP

    @property
    def sessions_tracked(self) -> int:
        """How many sessions currently hold state."""
        return len(self._sessions)

    def _render(self, crops: torch.Tensor, prompts: list[StylePrompt]) -> torch.Tensor:
        positives = self.prompts.get([p.text for p in prompts])
        negatives = self.prompts.get([p.negative for p in prompts]) if self.loop.classifier_free else None
        return self.loop.render(crops, positives, negatives)

    def _wants_render(self, it: _Item, similarity: float | None, settings: RuntimeSettings, now: float) -> bool:
        state = it.state
        last = state.rendered
        changed = last is None or last.prompt_text != it.prompt.text or last.strength != settings.strength
        if not changed and self._filter.skip(similarity, state.skipped_in_row):
            state.skipped_in_row += 1
            return False
        # A session's first frame renders even over budget: there is nothing to show again.
        if not state.bucket.take(now) and last is not None:
            return False
        state.skipped_in_row = 0
        return True

    def _prepare(self, msg: Message, settings: RuntimeSettings, now: float) -> _Item | None:
        """Frame, cut out and choose the prompt of one frame; None (and an event) if unusable."""
        frame = rgb_image(msg)
        if frame is None:
            return self.reject(msg, "bad_frame", f"diffusion got no RGB uint8 H x W x 3 image: {describe_tensor(msg)}")
        height, width = int(frame.shape[0]), int(frame.shape[1])
        state = self._sessions.get(msg.session, now)
        t = capture_seconds(msg)
        framing = state.follower.follow(msg.meta.get("faces") or [], width, height, t)
        emotion, confidence = self._mood_of(state.follower.face)
        prompt = style_prompt(emotion, confidence, settings.style)
        crop = cut_out(frame.to(self.context.device, non_blocking=True), framing, self.config.size)
        style = {"generator": "diffusion", "name": prompt.name, "emotion": prompt.emotion,
                 "confidence": round(confidence, 4), "face_id": state.follower.face_id,
                 "crop": framing.box(), "angle": round(math.degrees(framing.angle), 1)}
        return _Item(msg=msg, state=state, crop=crop, prompt=prompt, style=style)

    def _mood_of(self, face: dict[str, Any] | None) -> tuple[str, float]:
        if face is None:
            return "neutral", self.config.fallback_confidence
        label = str(face.get("emotion") or "neutral")
        probs = face.get("emotion_probs") or {}
        return label, float(probs.get(label, self.config.fallback_confidence))

    def _emit(self, it: _Item, skipped: bool, view: RuntimeView, settings: RuntimeSettings,
              started: float) -> Message:
        rendered = it.state.rendered
        size = settings.output_size
        portrait = rendered.portrait.unsqueeze(0)
        if portrait.shape[-1] != size:
            portrait = F.interpolate(portrait, size=(size, size), mode="bilinear", antialias=size < portrait.shape[-1],
                                     align_corners=False).clamp_(0.0, 1.0)
        frame = temporal.smooth(portrait[0], it.state.previous, settings.smoothing)
        it.state.previous = None if settings.smoothing <= 0 else frame
        meta = dict(it.msg.meta)
        meta["style"] = {**rendered.style, "skipped": skipped}
        out = it.msg.derive(tensors=[(frame * 255.0).round_().to(torch.uint8).permute(1, 2, 0).contiguous()],
                            meta=meta)
        out.revision = view.revision
        return out.stamp("diffusion.start", started).stamp("diffusion.end")
