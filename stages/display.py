"""The display stage: portraits in, JPEG bytes and the vision results for the page out.

The last stage before the server: it encodes each portrait with OpenCV at the live
``jpeg_quality`` and packs what the page shows beside the picture (the frame's faces,
the generator and style that made it) into ``meta["vision"]``, so the server only forwards bytes and JSON.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from comms.message import Message
from core.config import check_range
from stages.base import Stage
from stages.payloads import IMAGE_RGB
from stages.registry import register_stage
from stages.server.hooks import OUTPUT_JPEG


@dataclass(kw_only=True, slots=True)
class DisplayConfig:
    quality_override: int | None = None
    """JPEG quality 30..95 used instead of the live ``jpeg_quality``; null follows the page."""
    optimize: bool = False
    """Optimised Huffman tables: a few % smaller files for noticeably more encode time."""
    chroma_full: bool = False
    """Encode colour at full resolution (4:4:4) instead of 4:2:0: crisper saturated edges
    of the stylized portraits, at about a third more bytes."""

    def __post_init__(self) -> None:
        if self.quality_override is not None:
            check_range(self.quality_override, "quality_override", 30, 95)


@register_stage
class DisplayStage(Stage):
    """Takes portraits (``IMAGE_RGB``, on any device); emits them as JPEG for the page
    (``OUTPUT_JPEG``, a CPU tensor) with the input meta plus ``meta["vision"]`` (see
    ``page_vision``): ``{"frame_id", "faces", "generator", "style"}``. A portrait that
    cannot be encoded is dropped and reported to its session as an ``encode_failed`` event."""

    kind = "display"
    Config = DisplayConfig
    accepts = IMAGE_RGB
    emits = OUTPUT_JPEG

    def process(self, batch: list[Message]) -> list[Message]:
        if not batch:
            return []
        started = time.time()
        quality = self.config.quality_override
        if quality is None:
            quality = int(self.context.runtime().settings.jpeg_quality)
        params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_OPTIMIZE, int(self.config.optimize)]
        if self.config.chroma_full:
            params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]

        outputs = []
        for msg in batch:
            jpeg = self._encode(msg, params)
            if jpeg is None:
                continue
            meta = dict(msg.meta)
            meta["vision"] = page_vision(msg)
            out = msg.derive(tensors=[torch.from_numpy(jpeg)], meta=meta)
            outputs.append(out.stamp("display.start", started).stamp("display.end"))
        return outputs

    def _encode(self, msg: Message, params: list[int]) -> np.ndarray | None:
        """1-D uint8 JPEG bytes of the portrait, or None after reporting why."""
        portrait = msg.tensors[0] if msg.tensors else None
        if portrait is None or portrait.dim() != 3 or portrait.shape[2] != 3 or portrait.dtype != torch.uint8:
            shape = None if portrait is None else (tuple(portrait.shape), str(portrait.dtype))
            return self.reject(msg, "encode_failed", f"not an RGB uint8 HWC portrait: {shape}")
        # A CUDA portrait comes over here; the copy is the only sync point of this stage.
        rgb = np.ascontiguousarray(portrait.detach().cpu().numpy())
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        ok, buf = cv2.imencode(".jpg", bgr, params)
        if not ok:
            return self.reject(msg, "encode_failed", "JPEG encoding failed")
        return buf.reshape(-1)


def page_vision(msg: Message) -> dict:
    """What the page shows beside the portrait: the faces (the primary one marked), which
    generator made the frame and in which style."""
    style = msg.meta.get("style") or {}
    primary = style.get("face_id")
    faces = [dict(face, primary=face.get("face_id") == primary) if primary is not None else face
             for face in faces_in_input_pixels(msg.meta)]
    vision = {"frame_id": msg.frame_id, "faces": faces}
    if style:
        vision["generator"] = style.get("generator")
        vision["style"] = {key: style.get(key) for key in ("name", "emotion", "confidence")}
    return vision


def faces_in_input_pixels(meta: dict) -> list[dict]:
    """The faces with boxes in the pixels of the frame the browser sent.

    Vision sees the frame ingest decoded; when ingest shrank a wide frame
    (``scaled_from`` = the sent size) the boxes are scaled back, because the page
    draws them over the frame it captured.
    """
    faces = meta.get("faces", [])
    sent = meta.get("scaled_from")
    if not sent or not faces:
        return faces
    sx, sy = sent[0] / meta["width"], sent[1] / meta["height"]
    scaled = []
    for face in faces:
        x, y, w, h = face["bbox"]
        face = dict(face, bbox=[round(x * sx), round(y * sy), round(w * sx), round(h * sy)])
        if face.get("landmarks"):
            face["landmarks"] = [[round(px * sx, 1), round(py * sy, 1)] for px, py in face["landmarks"]]
        scaled.append(face)
    return scaled

