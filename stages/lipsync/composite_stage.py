"""The composite stage: mouth patches in, the avatar's full frames as JPEG out (CPU ranks).

Compositing is CPU work (decode, resize, blend, encode) and scales out on cheap ranks,
so the GPU ranks ship only the 320 x 320 patch. Per frame: the background frame the
patch belongs to (``avatar_frame``, ping-pong order) comes from a byte-bounded LRU of
decoded frames (loaded lazily from the avatar folder), the patch goes into the frame's
328 crop, resized back and pasted (``compositing``, optionally with a feathered seam);
a silent frame has no patch and the background goes out untouched.
"""

from __future__ import annotations

import time

import cv2
import numpy as np
import torch

from comms.message import Message
from stages.base import Stage
from stages.lipsync.avatar import AvatarStore
from stages.lipsync.background_cache import BackgroundCache
from stages.lipsync.catalog import open_store
from stages.lipsync.compositing import compose_frame
from stages.lipsync.config import CompositeConfig
from stages.lipsync.crop import INNER, patches_rgb
from stages.lipsync.payloads import MOUTH_PATCH
from stages.registry import register_stage
from stages.server.hooks import OUTPUT_JPEG


def patch_rgb(patch: torch.Tensor) -> np.ndarray:
    """A ``MOUTH_PATCH`` tensor ([3, 320, 320] BGR, uint8 or float 0..1) as RGB uint8 HWC."""
    if patch.dim() != 3 or tuple(patch.shape) != (3, INNER, INNER):
        raise ValueError(f"mouth patch must be [3, {INNER}, {INNER}], got {tuple(patch.shape)}")
    if patch.is_floating_point():
        return patches_rgb(patch[None])[0]
    if patch.dtype != torch.uint8:
        raise ValueError(f"mouth patch must be uint8 or float, got {patch.dtype}")
    return np.ascontiguousarray(patch.cpu().permute(1, 2, 0).numpy()[..., ::-1])


@register_stage
class CompositeStage(Stage):
    """Takes ``MOUTH_PATCH``es; emits the avatar's frames as JPEG (``OUTPUT_JPEG``) with
    meta ``lipsync`` kept. A patch that does not fit (shape, dtype, unknown avatar) is
    dropped and reported (``bad_patch``)."""

    kind = "composite"
    Config = CompositeConfig
    accepts = MOUTH_PATCH
    emits = OUTPUT_JPEG

    def setup(self) -> None:
        config: CompositeConfig = self.config
        self.store: AvatarStore = open_store(config.avatar_dir, build_default=False)
        self.cache = BackgroundCache(self.store, config.cache_mb * 2**20)

    def process(self, batch: list[Message]) -> list[Message]:
        quality = self.config.jpeg_quality or int(self.context.runtime().settings.jpeg_quality)
        outputs = []
        for msg in batch:
            started = time.time()
            frame = self._frame(msg)
            if frame is None:
                continue
            ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
            if not ok:
                self.reject(msg, "encode_failed", "could not encode the composited frame as JPEG")
                continue
            out = msg.derive(tensors=[torch.from_numpy(jpeg.reshape(-1))])
            outputs.append(out.stamp("composite.start", started).stamp("composite.end"))
        return outputs

    def _frame(self, msg: Message) -> np.ndarray | None:
        lipsync = msg.meta.get("lipsync") or {}
        avatar, index = lipsync.get("avatar"), lipsync.get("avatar_frame")
        try:
            if not isinstance(avatar, str) or not isinstance(index, int):
                raise ValueError(f"meta lipsync needs 'avatar' and 'avatar_frame', got {lipsync!r}")
            background = self.cache.get(avatar, index)
            patch = patch_rgb(msg.tensors[0]) if msg.tensors else None
            rect = self.store.crop_rects(avatar)[index]
            return compose_frame(background, rect, patch, self.config.feather_px)
        except (LookupError, ValueError) as e:
            return self.reject(msg, "bad_patch", f"cannot composite frame {msg.frame_id}: {e}")

    def report(self) -> dict | None:
        cache = getattr(self, "cache", None)
        return None if cache is None else {"background_cache": cache.stats()}
