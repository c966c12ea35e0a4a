"""Payloads that several stage kinds share. A payload one pair of stages uses alone is
declared next to them; the two at the browser's ends are the server's
(``stages.server.hooks``)."""

from __future__ import annotations

import time

import torch

from comms.message import Message
from stages.base import Payload

IMAGE_RGB = Payload("image.rgb", (torch.uint8,))
"""tensors[0]: an RGB uint8 H x W x 3 image on any device. meta is free-form: vision adds
``faces``, the generator ``style``, and every stage keeps what it got."""


def rgb_image(msg: Message) -> torch.Tensor | None:
    """``msg``'s ``IMAGE_RGB`` tensor (H x W x 3 uint8, both sides >= 2), or None when it has
    none: the declared payload is a promise of the sender, not a guarantee of the wire."""
    image = msg.tensors[0] if msg.tensors else None
    if image is None or image.dim() != 3 or image.shape[2] != 3 or image.dtype != torch.uint8 \
            or image.shape[0] < 2 or image.shape[1] < 2:
        return None
    return image


def capture_seconds(msg: Message) -> float:
    """When ``msg``'s frame was captured, in seconds on the camera's clock: easing and
    animation follow it, so motion follows the camera and not queueing jitter. Frames
    without a capture time fall back to wall time."""
    return msg.capture_ts / 1000.0 if msg.capture_ts > 0 else time.time()


def describe_tensor(msg: Message) -> str:
    """What ``msg`` carries instead of an image, for a log line."""
    if not msg.tensors:
        return "no tensor"
    tensor = msg.tensors[0]
    return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"
