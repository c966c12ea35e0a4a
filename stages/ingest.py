"""The ingest stage: camera JPEG bytes in, decoded RGB frames out.

Decoding is the first place a hostile or broken client can hurt the pipeline, so the
stage reads the JPEG header before decoding: a frame claiming more than ``max_pixels``
is refused without allocating it, and a frame much wider than ``max_width`` is decoded
straight at 1/2, 1/4 or 1/8 scale by libjpeg (far cheaper than decoding full size and
shrinking), then shrunk the rest of the way with area averaging.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from comms.message import Message
from core.config import check, check_range
from stages.base import Stage
from stages.jpeg_header import jpeg_size
from stages.payloads import IMAGE_RGB
from stages.registry import register_stage
from stages.server.hooks import CAMERA_JPEG

# SOF markers that carry the frame size: baseline, extended, progressive, lossless and
# their arithmetic-coded variants (0xC4 DHT, 0xC8 JPG and 0xCC DAC are not frames).
_REDUCED_FLAGS = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


@dataclass(kw_only=True, slots=True)
class IngestConfig:
    max_width: int = 1280
    """Frames wider than this are downscaled (aspect kept) right after decoding."""
    max_pixels: int = 16_000_000
    """Frames whose header claims more pixels than this are refused undecoded."""
    max_bytes: int = 8_000_000
    """Payloads larger than this are refused undecoded."""

    def __post_init__(self) -> None:
        check_range(self.max_width, "max_width", 16, 8192)
        check(self.max_pixels >= 256, "max_pixels", f"must be >= 256, got {self.max_pixels}")
        check(self.max_bytes >= 1024, "max_bytes", f"must be >= 1024, got {self.max_bytes}")


@register_stage
class IngestStage(Stage):
    """Takes camera JPEGs (``CAMERA_JPEG``); emits the decoded frames (``IMAGE_RGB``, a CPU
    tensor at most ``max_width`` wide) with the input meta plus their ``width``/``height``
    (and ``scaled_from`` [w, h] when downscaled). A payload that is not a decodable JPEG
    within the limits is dropped and reported to its session as a ``bad_jpeg`` (or
    ``frame_too_large``) event."""

    kind = "ingest"
    Config = IngestConfig
    accepts = CAMERA_JPEG
    emits = IMAGE_RGB

    def process(self, batch: list[Message]) -> list[Message]:
        outputs = []
        for msg in batch:
            started = time.time()
            decoded = self._decode(msg)
            if decoded is None:
                continue
            frame, source_size = decoded
            height, width = frame.shape[:2]
            meta = dict(msg.meta)
            meta.update(width=width, height=height)
            if (width, height) != source_size:
                meta["scaled_from"] = list(source_size)
            out = msg.derive(tensors=[torch.from_numpy(frame)], meta=meta)
            outputs.append(out.stamp("ingest.start", started).stamp("ingest.end"))
        return outputs

    def _decode(self, msg: Message) -> tuple[np.ndarray, tuple[int, int]] | None:
        """(RGB uint8 HWC contiguous array, (width, height) in the JPEG header), or None
        after reporting why."""
        payload = msg.tensors[0] if msg.tensors else None
        if payload is None or payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() == 0:
            return self.reject(msg, "bad_jpeg", "frame payload is not a byte array")
        if payload.numel() > self.config.max_bytes:
            return self.reject(msg, "frame_too_large",
                                f"frame of {payload.numel()} bytes exceeds {self.config.max_bytes}")
        data = payload.detach().cpu().numpy()
        try:
            width, height = jpeg_size(memoryview(data))
        except ValueError as e:
            return self.reject(msg, "bad_jpeg", f"frame is not a JPEG image: {e}")
        if width * height > self.config.max_pixels:
            return self.reject(msg, "frame_too_large",
                                f"frame of {width}x{height} exceeds {self.config.max_pixels} pixels")

        flags = cv2.IMREAD_COLOR
        for factor, reduced in _REDUCED_FLAGS:
            if width >= factor * self.config.max_width:
                flags = reduced
                break
        # Canvas-encoded frames carry no EXIF; ignoring it keeps header size == decoded size.
        bgr = cv2.imdecode(data, flags | cv2.IMREAD_IGNORE_ORIENTATION)
        if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3:
            return self.reject(msg, "bad_jpeg", "frame could not be decoded as JPEG")
        if bgr.shape[1] > self.config.max_width:
            new_w = self.config.max_width
            new_h = max(1, round(bgr.shape[0] * new_w / bgr.shape[1]))
            bgr = cv2.resize(bgr, (new_w, new_h), interpolation=cv2.INTER_AREA)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (width, height)
