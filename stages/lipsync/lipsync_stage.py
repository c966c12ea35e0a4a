"""The lip-sync stage: audio features in, the avatar's mouth region out, for many avatars.

Each replica (a GPU rank, or CPU) keeps the avatars it served lately in a byte-bounded
``ModelRegistry``: an avatar's U-Net and audio encoder when it has a model, and its
crops (the 328 x 328 face region of every frame, cut once at load). The speech stage's
router sends an avatar's frames to the replica that holds it (``routing: affinity``,
placed by this kind's ``directory``), so a model is loaded once and then only used.

Per micro-batch:

1. each frame's new encoder inputs are encoded (one call per avatar) into the session's
   feature history, and the U-Net's audio window for the frame is read off it;
2. frames in silence (VAD) make no patch: compositing shows the background untouched;
3. frames of avatars with a model go through the U-Net together, whatever their avatar
   (``batching.infer``); frames of avatars without one get the non-neural mouth
   (``mouth_synth``), opened by the frame's loudness and labelled as such;
4. the 320 x 320 patch goes to compositing as uint8 (or float16/32, ``patch_dtype``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from comms.message import Message
from stages.base import Stage
from stages.lipsync import batching
from stages.lipsync.audio_encoder import AudioEncoder, load_audio_encoder
from stages.lipsync.audio_windows import FEATURE_WINDOW
from stages.lipsync.avatar import AvatarStore, Manifest, pingpong
from stages.lipsync.catalog import AvatarCatalog, open_store
from stages.lipsync.config import LipsyncConfig
from stages.lipsync.crop import bgr_tensor, cut_crop, unet_inputs
from stages.lipsync.device_memory import capacity_from_device
from stages.lipsync.directory import ModelDirectory
from stages.lipsync.model_files import load_unet, model_bytes
from stages.lipsync.mouth_synth import MouthSynth
from stages.lipsync.payloads import MOUTH_PATCH, SPEECH_FRAME
from stages.lipsync.registry import LoadFailed, ModelRegistry
from stages.lipsync.unet import LipSyncUNet
from stages.registry import register_stage
from stages.session_states import SessionStates

CPU_CAPACITY_MB = 1024
"""Registry budget on a CPU replica when ``capacity_mb`` is not set."""
HISTORY = 2 * FEATURE_WINDOW
"""Encoder outputs kept per session: a window reaches 9 back and 6 ahead of its frame."""
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(kw_only=True)
class LoadedAvatar:
    """What a replica holds for one avatar (a registry entry)."""

    manifest: Manifest
    crops_rgb: np.ndarray | None
    """[N, 328, 328, 3] uint8: every frame's face crop, for the non-neural mouth; None with a model."""
    crops_bgr: torch.Tensor | None = None
    """[N, 3, 328, 328] uint8 on the device, BGR as the U-Net was trained; None without a model."""
    unet: LipSyncUNet | None = None
    encoder: AudioEncoder | None = None
    mouth: MouthSynth | None = None
    """The non-neural mouth, placed where this avatar's lips are (``Manifest.mouth``)."""

    @property
    def generator(self) -> str:
        return "unet" if self.unet is not None else "mouth-synth"

    def nbytes(self) -> int:
        total = 0 if self.crops_rgb is None else self.crops_rgb.nbytes
        if self.crops_bgr is not None:
            total += self.crops_bgr.numel()
        for module in (self.unet, self.encoder):
            if module is not None:
                total += model_bytes(module)
        return total


@dataclass
class _Features:
    """One session's encoder outputs by encoder frame, the newest ``HISTORY`` of them."""

    by_index: dict[int, torch.Tensor] = field(default_factory=dict)

    def add(self, first: int, features: torch.Tensor) -> None:
        for offset, feature in enumerate(features):
            self.by_index[first + offset] = feature
        newest = first + len(features) - 1
        for j in [j for j in self.by_index if j <= newest - HISTORY]:
            del self.by_index[j]

    def window(self, frame: int, like: torch.Tensor) -> torch.Tensor:
        """The U-Net's audio input for video frame ``frame``: padded features P[i-8 : i+8],
        where P = [F0] + F (the right-edge pad never comes in a live stream) and anything
        missing or before the start is zeros; [16, 512] -> [32, 16, 16]."""
        zero = torch.zeros_like(like)
        rows = []
        for k in range(frame - FEATURE_WINDOW // 2, frame + FEATURE_WINDOW // 2):
            j = 0 if k == 0 else k - 1
            rows.append(self.by_index.get(j, zero) if k >= 0 else zero)
        return torch.stack(rows).reshape(32, 16, 16)


@register_stage
class LipsyncStage(Stage):
    """Takes ``SPEECH_FRAME``s; emits ``MOUTH_PATCH``es (none for silent frames: the
    patch is absent). An avatar that cannot be loaded has its frames dropped and reported
    to the session (``avatar_unavailable``)."""

    kind = "lipsync"
    Config = LipsyncConfig
    accepts = SPEECH_FRAME
    emits = MOUTH_PATCH

    @classmethod
    def directory(cls, config: LipsyncConfig, replicas: int) -> ModelDirectory:
        return ModelDirectory(replicas, placement=config.placement, preferred=dict(config.preferred))

    @classmethod
    def catalog(cls, config: LipsyncConfig) -> AvatarCatalog:
        return AvatarCatalog(open_store(config.avatar_dir, config.build_default), config.default_avatar)

    def setup(self) -> None:
        config: LipsyncConfig = self.config
        self.device = self.context.device
        self.dtype = _DTYPES[config.precision] if self.device.type == "cuda" else torch.float32
        self.patch_dtype = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}[config.patch_dtype]
        self.store: AvatarStore = open_store(config.avatar_dir, config.build_default)
        configured = None if config.capacity_mb is None else config.capacity_mb * 2**20
        if configured is None and self.device.type != "cuda":
            configured = CPU_CAPACITY_MB * 2**20
        capacity = capacity_from_device(self.device, config.memory_fraction, configured)
        self.registry = ModelRegistry(capacity_bytes=capacity, policy=config.eviction,
                                      idle_timeout_s=config.idle_timeout_s, loader=self._load,
                                      retry_after_s=config.retry_after_s)
        self.features: SessionStates[_Features] = SessionStates(
            lambda now: _Features(), max_sessions=config.max_sessions, idle_s=60.0, log=self.log,
            what="audio features")
        self.log.info("lip-sync registry on %s: %.0f MB, %s eviction", self.device, capacity / 2**20, config.eviction)

    # -- the registry's loader ------------------------------------------------------

    def _load(self, avatar: str) -> tuple[LoadedAvatar, int]:
        manifest = self.store.manifest(avatar)
        rects = self.store.crop_rects(avatar)
        crops = np.stack([cut_crop(self.store.read_frame(avatar, k), rects[k]) for k in range(manifest.frame_count)])
        loaded = LoadedAvatar(manifest=manifest, crops_rgb=crops)
        model, encoder = self.store.model_file(avatar, "model"), self.store.model_file(avatar, "audio_encoder")
        if model is not None:
            if encoder is None and self.config.audio_encoder is None:
                raise ValueError(f"avatar {avatar!r} has a model but no audio encoder: give it one "
                                 "(prepare_avatar.py --audio-encoder) or set lipsync.audio_encoder")
            encoder = encoder or Path(self.config.audio_encoder)
            loaded.unet = load_unet(model, audio_mode=manifest.audio_mode, width=None).to(
                self.device, self.dtype).eval()
            loaded.encoder = load_audio_encoder(encoder).to(self.device).eval()
            loaded.crops_bgr = bgr_tensor(crops, self.device)
            loaded.crops_rgb = None  # the U-Net reads the device copy; do not hold (and count) both
        else:
            loaded.mouth = MouthSynth(manifest.mouth)
        self.log.info("loaded avatar %s (%s, %d frames, %.1f MB)", avatar, loaded.generator,
                      manifest.frame_count, loaded.nbytes() / 2**20)
        return loaded, loaded.nbytes()

    # -- frames ---------------------------------------------------------------------

    def process(self, batch: list[Message]) -> list[Message]:
        now = time.monotonic()
        self.registry.expire_idle()
        by_avatar: dict[str, list[Message]] = {}
        for msg in batch:
            by_avatar.setdefault(str(msg.meta.get("affinity")), []).append(msg)
        outputs: dict[int, Message] = {}
        neural: list[tuple[Message, LoadedAvatar, torch.Tensor]] = []
        held: list[str] = []
        try:
            for avatar, messages in by_avatar.items():
                try:
                    loaded = self.registry.acquire(avatar)
                except (LoadFailed, LookupError, ValueError) as e:
                    for msg in messages:
                        self.reject(msg, "avatar_unavailable", f"avatar {avatar!r} cannot be served: {e}")
                    continue
                held.append(avatar)
                neural += self._avatar_frames(avatar, loaded, messages, now, outputs)
            if neural:
                self._run_unet(neural, outputs)
        finally:
            for avatar in held:
                self.registry.release(avatar)
        self.features.evict_idle(now)
        return [outputs[id(msg)] for msg in batch if id(msg) in outputs]

    def _avatar_frames(self, avatar: str, loaded: LoadedAvatar, messages: list[Message], now: float,
                       outputs: dict[int, Message]) -> list[tuple[Message, LoadedAvatar, torch.Tensor]]:
        """Silent and non-neural frames straight into ``outputs``; the U-Net's rows returned."""
        n = loaded.manifest.frame_count
        windows = self._windows(loaded, messages, now) if loaded.unet is not None else {}
        neural = []
        for msg in messages:
            started = time.time()
            frame = pingpong(msg.frame_id, n)
            lipsync = {**msg.meta.get("lipsync", {}), "avatar": avatar, "avatar_frame": frame}
            if not lipsync.get("speech"):
                outputs[id(msg)] = self._out(msg, None, {**lipsync, "generator": "silence"}, started)
            elif loaded.unet is None:
                patch = loaded.mouth.render(loaded.crops_rgb[frame], self._opening(lipsync))
                bgr = torch.from_numpy(np.ascontiguousarray(patch[..., ::-1])).permute(2, 0, 1)
                outputs[id(msg)] = self._out(msg, self._patch(bgr), {**lipsync, "generator": "mouth-synth"}, started)
            else:
                msg.meta["lipsync"] = lipsync
                neural.append((msg, loaded, windows[id(msg)]))
        return neural

    def _windows(self, loaded: LoadedAvatar, messages: list[Message], now: float) -> dict[int, torch.Tensor]:
        """Encode the frames' new encoder inputs (one batch) and read each frame's window."""
        inputs = [msg.tensors[0] for msg in messages]
        with torch.inference_mode():
            encoded = loaded.encoder(torch.cat(inputs).to(self.device, torch.float32)).float()
        windows, offset = {}, 0
        for msg, chunk in zip(messages, inputs):
            history = self.features.get(msg.session, now)
            history.add(int(msg.meta.get("encoder_first", msg.frame_id)), encoded[offset:offset + len(chunk)])
            offset += len(chunk)
            windows[id(msg)] = history.window(msg.frame_id, encoded[0])
        return windows

    def _run_unet(self, rows: list[tuple[Message, LoadedAvatar, torch.Tensor]], outputs: dict[int, Message]) -> None:
        started = time.time()
        crops = torch.stack([loaded.crops_bgr[msg.meta["lipsync"]["avatar_frame"]] for msg, loaded, _ in rows])
        x = unet_inputs(crops).to(self.dtype)
        audio = torch.stack([window for _, _, window in rows]).to(self.device, self.dtype)
        with torch.inference_mode():
            predicted = batching.infer([loaded.unet for _, loaded, _ in rows], x, audio)
        patches = (predicted.float() * 255.0).round_().clamp_(0, 255).to(torch.uint8) \
            if self.patch_dtype == torch.uint8 else predicted.to(self.patch_dtype)
        for (msg, _, _), patch in zip(rows, patches):
            outputs[id(msg)] = self._out(msg, patch, {**msg.meta["lipsync"], "generator": "unet"}, started)

    def _opening(self, lipsync: dict[str, Any]) -> float:
        config: LipsyncConfig = self.config
        loudness = float(lipsync.get("loudness_db", -100.0))
        return float(np.clip((loudness - config.quiet_db) / (config.loud_db - config.quiet_db), 0.0, 1.0))

    def _patch(self, bgr_uint8: torch.Tensor) -> torch.Tensor:
        if self.patch_dtype == torch.uint8:
            return bgr_uint8.contiguous()
        return bgr_uint8.to(self.patch_dtype) / 255.0

    @staticmethod
    def _out(msg: Message, patch: torch.Tensor | None, lipsync: dict[str, Any], started: float) -> Message:
        meta = {key: value for key, value in msg.meta.items() if key not in ("encoder_first", "lipsync")}
        meta["lipsync"] = lipsync
        out = msg.derive(tensors=[] if patch is None else [patch], meta=meta)
        return out.stamp("lipsync.start", started).stamp("lipsync.end")

    # -- the server rank's view -----------------------------------------------------

    def report(self) -> dict[str, Any] | None:
        registry = getattr(self, "registry", None)
        if registry is None:
            return None
        return {"device": str(self.device), **registry.report()}

    def command(self, command: dict[str, Any]) -> None:
        action, key = command.get("action"), str(command.get("key"))
        if action == "load":
            # Loading reads and crops every frame (and a model): not on the control thread.
            threading.Thread(target=self._preload, args=(key,), name=f"load-{key}", daemon=True).start()
        elif action == "unload":
            self.registry.unload(key)
        else:
            raise ValueError(f"lip-sync stage: unknown action {action!r}; allowed: 'load', 'unload'")

    def _preload(self, key: str) -> None:
        try:
            self.registry.load(key)
        except Exception as e:  # the failure is remembered by the registry and shows in its report
            self.log.warning("loading avatar %s failed: %s", key, e)

    def teardown(self) -> None:
        registry = getattr(self, "registry", None)
        if registry is not None:
            for entry in registry.list():
                if entry.get("resident"):
                    registry.unload(entry["id"])
