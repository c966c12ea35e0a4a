"""Payloads that several stage kinds share. A payload one pair of stages uses alone is
declared next to them; the two at the browser's ends are the server's
(``stages.server.hooks``)."""

from __future__ import annotations

import torch

from stages.base import Payload

IMAGE_RGB = Payload("image.rgb", (torch.uint8,))
"""tensors[0]: an RGB uint8 H x W x 3 image on any device. meta is free-form: vision adds
``faces``, the generator ``style``, and every stage keeps what it got."""
