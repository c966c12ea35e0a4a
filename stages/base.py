"""What every pipeline stage is: one class with its config, setup, process and teardown.

The runtime builds a stage with its config section and a ``StageContext``, calls
``setup()`` once (load models, warm up), then ``process(batch)`` for each micro-batch of
messages taken from upstream, and ``teardown()`` once at the end (idempotent). A stage
never touches transport, routing or sockets: it turns messages into messages.

``process`` may return fewer messages than it got (a frame dropped) or none. Each output
must keep the identity of the frame it came from (``Message.derive`` does that).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from comms.message import Kind, Message


@dataclass(kw_only=True, slots=True)
class RuntimeView:
    """The live runtime settings as a stage sees them: values plus their revision."""

    revision: int
    settings: Any  # runtime.live_config.RuntimeSettings


@dataclass(kw_only=True)
class StageContext:
    rank: int
    role: str
    replica: int
    device: torch.device
    logger: logging.Logger
    runtime: Callable[[], RuntimeView]
    """Current live settings; cheap to call once per batch."""
    publish_event: Callable[[Message], None] = field(default=lambda msg: None)
    """Send a Kind.EVENT message towards the browser session named in ``msg.session``."""


class Stage(ABC):
    """Base class of all stages. Subclasses set ``kind`` and ``Config``."""

    kind: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config: Any, context: StageContext) -> None:
        self.config = config
        self.context = context
        self.log = context.logger

    def setup(self) -> None:
        """Load models and warm up; called once before the first batch."""

    @abstractmethod
    def process(self, batch: list[Message]) -> list[Message]:
        """Turn one micro-batch of inputs into outputs (same order, maybe fewer)."""

    def reject(self, msg: Message, code: str, message: str) -> None:
        """Drop ``msg``: log it and tell its browser session why (an ``error`` on the page).
        Returns None so a helper can ``return self.reject(...)``."""
        self.log.warning("session %s frame %d dropped: %s", msg.session, msg.frame_id, message)
        self.context.publish_event(Message(kind=Kind.EVENT, session=msg.session, frame_id=msg.frame_id,
                                           client_ts=msg.client_ts, meta={"code": code, "message": message}))
        return None

    def on_revision(self, view: RuntimeView) -> None:
        """Called when the live runtime settings changed (before the next batch)."""

    def teardown(self) -> None:
        """Release resources; safe to call more than once."""
