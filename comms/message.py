"""The unit that travels between stages: a small header plus tensor payloads.

A ``Message`` is what every channel carries, in-process or across ranks. The header
(kind, frame id, session, config revision, client timestamp, trace, JSON metadata and,
for each tensor, its dtype and shape) is encoded by ``comms.header`` as plain bytes;
the tensors travel as payloads of any shape and dtype on the stage's device.

Trace entries are ``(name, unix_time_seconds)`` pairs appended by each stage and hop,
so one frame can be followed from the browser through every rank and back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch


class Kind(IntEnum):
    """What a message is. Values are part of the inter-rank header format."""

    CAMERA_JPEG = 1  # server -> ingest: encoded camera frame (uint8 JPEG bytes)
    FRAME = 2  # ingest -> vision: decoded RGB frame, uint8 HWC
    ANALYZED = 3  # vision -> generator: RGB frame + faces in meta
    PORTRAIT = 4  # generator -> display: RGB portrait uint8 HWC + faces in meta
    OUTPUT_JPEG = 5  # display -> server: encoded portrait + vision results in meta
    AUDIO = 6  # reserved for the lip-sync pipeline: PCM16 mono 16 kHz
    CONTROL = 10  # control plane: JSON command in meta (config update, stop)
    STATUS = 11  # control plane: heartbeat + metrics snapshot in meta
    EVENT = 12  # a stage's notice for a browser session (e.g. undecodable frame)
    END = 13  # the sender closes this link; nothing follows


@dataclass(slots=True)
class Message:
    kind: Kind
    session: str = ""
    frame_id: int = 0
    revision: int = 0
    client_ts: float = 0.0
    """Browser capture timestamp in ms, echoed back unchanged (wire protocol v1)."""
    trace: list[tuple[str, float]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    """JSON-serialisable metadata (faces, emotion, errors, control commands)."""
    tensors: list[torch.Tensor] = field(default_factory=list)

    def stamp(self, name: str, at: float | None = None) -> "Message":
        """Append a trace point; returns self so calls can be chained."""
        self.trace.append((name, time.time() if at is None else at))
        return self

    def derive(self, kind: Kind, tensors: list[torch.Tensor] | None = None,
               meta: dict[str, Any] | None = None) -> "Message":
        """A downstream message for the same frame: identity and trace carried over."""
        return Message(
            kind=kind,
            session=self.session,
            frame_id=self.frame_id,
            revision=self.revision,
            client_ts=self.client_ts,
            trace=list(self.trace),
            meta=dict(self.meta) if meta is None else meta,
            tensors=[] if tensors is None else tensors,
        )

    @property
    def payload_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)
