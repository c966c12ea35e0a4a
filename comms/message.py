"""The unit that travels between stages: an envelope, JSON metadata and tensor payloads.

A ``Message`` is what every channel carries, in-process or across ranks. The envelope
says what the message is to the transport and the runtime (``Kind``), which stream it
belongs to (``session``), which frame of that stream it is, the live-config revision it
was made under, when its media was captured, and its trace. What the tensors and the
metadata *mean* is the business of the stages that make and take them: each stage
declares the payload it accepts and emits (``stages.base.Payload``), and the transport
never looks inside.

Trace entries are ``(name, unix_time_seconds)`` pairs appended by each stage and hop,
so one frame can be followed from its source through every rank and back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch


class Kind(IntEnum):
    """What a message is to the transport and the runtime. Values are part of the
    inter-rank header format. (A link's end is not a message: each channel marks it in
    its own framing.)"""

    DATA = 1  # a payload from one stage to the next
    CONTROL = 2  # the server rank to a rank: a JSON command in meta (config update, stop)
    STATUS = 3  # a rank to the server rank: heartbeat with metrics, or why it leaves
    EVENT = 4  # a stage's notice for one session (e.g. an undecodable frame), for the front end


@dataclass(slots=True)
class Message:
    kind: Kind = Kind.DATA
    session: str = ""
    """The stream this message belongs to (a browser session on the mirror's page);
    routing may pin a session to one replica."""
    frame_id: int = 0
    """Position in the session's stream; outputs reach the sink in this order."""
    revision: int = 0
    """Live-config revision the message was made under; older ones are stale."""
    capture_ts: float = 0.0
    """When the media this message derives from was captured, in milliseconds of its
    source's own clock (for the page: the browser's, which it gets back with the output
    frame). Stages pace animation by it rather than by arrival time."""
    trace: list[tuple[str, float]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    """JSON-serialisable metadata (faces, errors, control commands)."""
    tensors: list[torch.Tensor] = field(default_factory=list)

    def stamp(self, name: str, at: float | None = None) -> "Message":
        """Append a trace point; returns self so calls can be chained."""
        self.trace.append((name, time.time() if at is None else at))
        return self

    def derive(self, tensors: list[torch.Tensor] | None = None, meta: dict[str, Any] | None = None) -> "Message":
        """A downstream message for the same frame: kind, identity and trace carried over."""
        return Message(
            kind=self.kind,
            session=self.session,
            frame_id=self.frame_id,
            revision=self.revision,
            capture_ts=self.capture_ts,
            trace=list(self.trace),
            meta=dict(self.meta) if meta is None else meta,
            tensors=[] if tensors is None else tensors,
        )

    @property
    def payload_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)
