"""What every pipeline stage is: one class with its config, setup, process and teardown,
declaring the payload it accepts and the payload it emits.

The runtime builds a stage with its config section and a ``StageContext``, calls
``setup()`` once (load models, warm up), then ``process(batch)`` for each micro-batch of
messages taken from upstream, and ``teardown()`` once at the end (idempotent). A stage
never touches transport, routing or sockets: it turns messages into messages.

``accepts`` and ``emits`` name what travels on the stage's input and output edges
(``Payload``: a type name and, where useful, the dtypes of its tensors). The runtime
checks at startup that every stage emits what the next one accepts, so a pipeline
wired wrong fails with both stage names before any frame moves. ``accepts = None``
makes a *source* (``process([])`` is called again and again; it paces itself and
returns what it produced), ``emits = None`` a *sink* (its outputs go nowhere).

``process`` may return fewer messages than it got (a frame dropped) or none. Each output
must keep the identity of the frame it came from (``Message.derive`` does that).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol

import torch

from comms.message import Kind, Message
from core.settings import RuntimeView


@dataclass(frozen=True, slots=True)
class Payload:
    """What travels on one edge of a pipeline: a name both ends agree on and, when it
    helps to check, the dtypes of the message's tensors in order."""

    name: str
    dtypes: tuple[torch.dtype, ...] | None = None

    def describe(self) -> str:
        if self.dtypes is None:
            return self.name
        return f"{self.name} [{', '.join(str(d).removeprefix('torch.') for d in self.dtypes)}]"

    def fits(self, accepted: "Payload") -> bool:
        """Whether a stage accepting ``accepted`` can take this payload."""
        if accepted is ANY:
            return True
        if self.name != accepted.name:
            return False
        return self.dtypes is None or accepted.dtypes is None or self.dtypes == accepted.dtypes


ANY = Payload("any")
"""``accepts``: whatever the previous stage emits."""
SAME = Payload("same as input")
"""``emits``: exactly what came in (a pass-through stage)."""


class Directory(Protocol):
    """Which replica of a stage holds which key (``Stage.directory``)."""

    def route(self, key: str, credits: list[int] | None = None) -> int:
        """The replica for ``key``: the one holding it, else one chosen to load it."""

    def update(self, replica: int, report: dict[str, Any]) -> None:
        """A replica's latest ``report``."""

    def placement_for_load(self, key: str) -> int:
        """The replica an explicit load of ``key`` should go to."""

    def snapshot(self) -> dict[str, Any]:
        """Every replica and key, for the server's HTTP and the page."""


class Catalog(Protocol):
    """What a session may select by name (``Stage.catalog``)."""

    default: str
    """Selected for a session that picked nothing."""

    def ids(self) -> list[str]:
        """Everything there is, sorted."""

    def check(self, key: str) -> None:
        """Raises ``LookupError`` (naming what there is) when ``key`` cannot be selected."""


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
    """Send a Kind.EVENT message towards the session named in ``msg.session``."""


class Stage(ABC):
    """Base class of all stages. Subclasses set ``kind``, ``Config``, ``accepts`` and
    ``emits``, and register themselves with ``stages.registry.register_stage``."""

    kind: ClassVar[str]
    Config: ClassVar[type]
    accepts: ClassVar[Payload | None]
    """The payload this stage takes; None for a source."""
    emits: ClassVar[Payload | None]
    """The payload this stage produces; None for a sink."""

    def __init__(self, config: Any, context: StageContext) -> None:
        self.config = config
        self.context = context
        self.log = context.logger

    def setup(self) -> None:
        """Load models and warm up; called once before the first batch."""

    @abstractmethod
    def process(self, batch: list[Message]) -> list[Message]:
        """Turn one micro-batch of inputs into outputs (same order, maybe fewer)."""

    def unavailable(self) -> str | None:
        """Why this stage cannot serve right now (e.g. 'diffusion: no model configured'),
        or None when it can. Read after ``setup`` and after every batch; while it says
        why, the stage before it sends its frames to this stage's fallback, if the
        pipeline names one (``StageSpec.fallback``)."""
        return None

    def report(self) -> dict[str, Any] | None:
        """What this replica tells the server rank about itself (JSON-safe), e.g. which
        models it holds: sent with every heartbeat, read on the heartbeat thread, so it
        must be cheap and thread-safe. None: nothing to tell."""
        return None

    def command(self, command: dict[str, Any]) -> None:
        """An instruction the server rank addressed to this replica (e.g. load or unload
        a model), called on a control thread: thread-safe, and quick (start long work,
        do not wait for it; its outcome shows in ``report``). Raises ``ValueError`` for a
        command it does not take."""
        raise ValueError(f"stage kind {self.kind!r} takes no commands, got {command!r}")

    @classmethod
    def directory(cls, config: Any, replicas: int) -> "Directory | None":
        """For a stage that others reach with ``routing: affinity``: the server rank's
        map of which replica holds (or should load) which key, fed by the replicas'
        ``report``s. None: this kind cannot be routed to by affinity."""
        return None

    @classmethod
    def catalog(cls, config: Any) -> "Catalog | None":
        """For a stage whose sessions pick something by name (an avatar): what there is to
        pick, for the server's ``avatar.select``. None: nothing to pick."""
        return None

    def reject(self, msg: Message, code: str, message: str) -> None:
        """Drop ``msg``: log it and tell its session why (an ``error`` on the page).
        Returns None so a helper can ``return self.reject(...)``."""
        self.log.warning("session %s frame %d dropped: %s", msg.session, msg.frame_id, message)
        self.context.publish_event(Message(kind=Kind.EVENT, session=msg.session, frame_id=msg.frame_id,
                                           capture_ts=msg.capture_ts, meta={"code": code, "message": message}))
        return None

    def teardown(self) -> None:
        """Release resources; safe to call more than once."""
