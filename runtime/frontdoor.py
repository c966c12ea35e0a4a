"""The server rank's bridge between the web server and the pipeline.

``FrontDoor`` implements the server's ``PipelineHooks``: camera frames (or, for a
pipeline that takes audio, audio chunks tagged with the session's avatar) go into the
``SessionQueue`` (the first stage's inlet), config changes go to ``LiveConfig`` and out
to every rank, model loads and unloads to the replicas through ``Affinity``.
``OutputSink`` is the last stage's outlet: it hands finished frames to the server,
keeping each session's frames in order. Either end is absent when the pipeline starts
with a source stage or ends in a sink. ``JobStatus`` is the job's word to the pages
when it loses a rank (``runtime.rank_loss``): a ``status`` to every session, kept for
the sessions that connect later.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

from comms.message import Message
from core.settings import STYLES, RuntimeSettings
from runtime.affinity import EVERY_REPLICA, Affinity
from runtime.aggregate import Aggregator
from runtime.live_config import LiveConfig, settings_to_dict
from runtime.live_view import LiveView
from runtime.session_queue import SessionQueue
from stages.base import Catalog
from stages.server.hooks import SessionSink
from stages.server.protocol import ErrorCode, ProtocolError

log = logging.getLogger(__name__)

AUDIO_SAMPLE_RATE = 16_000
"""What the page's audio chunks hold (protocol v1, binary kind 2): PCM16 mono at 16 kHz."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelService:
    """The models a stage's replicas hold and load on demand (``routing: affinity``)."""

    stage: str
    affinity: Affinity


class FrontDoor:
    def __init__(self, *, pipeline: str, live_config: LiveConfig, live_view: LiveView, inbox: SessionQueue | None,
                 aggregator: Aggregator, publish_config: Callable[[int, RuntimeSettings], None],
                 health: Callable[[], dict[str, Any]], takes: str = "camera", catalog: Catalog | None = None,
                 models: ModelService | None = None) -> None:
        self.pipeline = pipeline
        self.page_input = takes
        """'camera' or 'audio': the binary kind the page sends this pipeline."""
        self.catalog = catalog
        """The avatars a session may select; None when the pipeline has none."""
        self.model_service = models
        self._selected: dict[str, str] = {}
        self._samples_in: dict[str, int] = {}
        """Per session, samples of the audio chunks accepted so far: where the next one starts."""
        self.live_config = live_config
        self.live_view = live_view
        self.inbox = inbox
        """None when the pipeline takes no camera frames (it starts with a source stage)."""
        self.aggregator = aggregator
        self._publish_config = publish_config
        self._health = health
        self._config_lock = threading.Lock()
        self._open: set[str] = set()
        self.session_closed: Callable[[str], None] = lambda session: None
        """Called when a browser leaves, so per-session state downstream is released."""
        self.status: Callable[[], dict[str, Any] | None] = lambda: None
        """The last ``status`` the pages were told (``JobStatus.current``)."""

    # -- sessions and frames ---------------------------------------------------------

    def open_session(self, session: str) -> None:
        self._open.add(session)
        log.info("session %s connected", session)

    def is_open(self, session: str) -> bool:
        return session in self._open

    def close_session(self, session: str) -> None:
        self._open.discard(session)
        self._selected.pop(session, None)
        self._samples_in.pop(session, None)
        if self.inbox is not None:
            self.inbox.drop_session(session)
        self.session_closed(session)
        log.info("session %s left", session)

    def takes(self) -> str:
        return self.page_input

    def submit_frame(self, session: str, frame_id: int, client_ts: float, jpeg: bytes,
                     width: int, height: int) -> None:
        if self.page_input != "camera":
            raise ProtocolError(ErrorCode.UNSUPPORTED_KIND,
                                f"pipeline {self.pipeline!r} takes audio chunks (kind 2), not camera frames")
        if self.inbox is None:
            raise ProtocolError(ErrorCode.UNSUPPORTED_KIND, f"pipeline {self.pipeline!r} takes no camera frames")
        data = torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)
        msg = Message(session=session, frame_id=frame_id, revision=self.live_view.get().revision,
                      capture_ts=client_ts, meta={"width": width, "height": height}, tensors=[data])
        self.inbox.put(msg.stamp("server.recv"))

    def submit_audio(self, session: str, chunk_id: int, client_ts: float, pcm: bytes) -> None:
        """Queue a validated audio chunk (PCM16 LE), tagged with the session's avatar and
        with where it starts in the session's stream (``first_sample``): the accepted
        chunks, in order, numbered as the page numbers them, so a chunk lost after this
        point (the entrance queue dropped it) is known downstream as a gap."""
        if self.page_input != "audio" or self.inbox is None:
            raise ProtocolError(ErrorCode.UNSUPPORTED_KIND,
                                f"pipeline {self.pipeline!r} takes camera frames (kind 1), not audio chunks")
        samples = torch.frombuffer(bytearray(pcm), dtype=torch.int16)
        first = self._samples_in.get(session, 0)
        self._samples_in[session] = first + samples.numel()
        meta = {"sample_rate": AUDIO_SAMPLE_RATE, "avatar": self.avatar_of(session), "first_sample": first}
        msg = Message(session=session, frame_id=chunk_id, revision=self.live_view.get().revision,
                      capture_ts=client_ts, meta=meta, tensors=[samples])
        self.inbox.put(msg.stamp("server.recv"))

    # -- avatars and models ----------------------------------------------------------

    def avatar_of(self, session: str) -> str | None:
        if self.catalog is None:
            return None
        return self._selected.get(session, self.catalog.default)

    def select_avatar(self, session: str, avatar: str) -> dict[str, Any]:
        """Make ``avatar`` the session's avatar from its next audio chunk on; raises
        ``LookupError`` for an avatar the catalog does not have."""
        if self.catalog is None:
            raise LookupError(f"pipeline {self.pipeline!r} has no avatars")
        self.catalog.check(avatar)
        self._selected[session] = avatar
        log.info("session %s selected avatar %s", session, avatar)
        return {**self.config_current(), "avatar": avatar}

    def models(self) -> dict[str, Any]:
        """Every replica's models and where each avatar is (``GET /models``); raises
        ``LookupError`` for a pipeline that serves none."""
        if self.model_service is None:
            raise LookupError(f"pipeline {self.pipeline!r} serves no models")
        return self.model_service.affinity.snapshot(self.model_service.stage)

    def model_action(self, avatar: str, action: str) -> dict[str, Any]:
        """Ask the replicas to load (on the replica the directory places it) or unload (on
        every replica) an avatar's model; it happens in the background and shows in
        ``models()``. Raises ``LookupError`` for an unknown avatar, ``ValueError`` for an
        action other than 'load' or 'unload'."""
        if action not in ("load", "unload"):
            raise ValueError(f"unknown model action {action!r}; allowed: 'load', 'unload'")
        if self.model_service is None:
            raise LookupError(f"pipeline {self.pipeline!r} serves no models")
        if self.catalog is not None:
            self.catalog.check(avatar)
        replica = self.model_service.affinity.command(self.model_service.stage, avatar, action)
        return {"avatar": avatar, "action": action, "accepted": True,
                "replica": None if replica == EVERY_REPLICA else replica}

    # -- live config -----------------------------------------------------------------

    def update_config(self, partial: dict[str, Any]) -> dict[str, Any]:
        with self._config_lock:  # one change at a time reaches every rank in order
            revision, settings = self.live_config.update(partial)
            self._adopt(revision, settings)
        return self.config_current()

    def apply_preset(self, name: str) -> dict[str, Any]:
        with self._config_lock:
            revision, settings = self.live_config.apply_preset(name)
            self._adopt(revision, settings)
        return self.config_current()

    def _adopt(self, revision: int, settings: RuntimeSettings) -> None:
        if not self.live_view.set(revision, settings):
            return  # nothing changed: no flush, no broadcast
        flushed = self.inbox.flush() if self.inbox is not None else 0
        self._publish_config(revision, settings)
        log.info("live config revision %d (%d queued frames flushed)", revision, flushed)

    def config_current(self) -> dict[str, Any]:
        revision, settings = self.live_config.current()
        stats = self.aggregator.stats()
        return {
            "config": settings_to_dict(settings),
            "revision": revision,
            "styles": list(STYLES),  # the page's style menu: it never offers a style the config refuses
            "presets": self.live_config.presets,
            "status": {"ranks": stats["ranks"], "fps": stats["fps"], "unavailable": stats["unavailable"]},
            **self._lipsync_status(),
        }

    def _lipsync_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {}
        if self.catalog is not None:
            status["avatars"] = self.catalog.ids()
            status["default_avatar"] = self.catalog.default
        if self.model_service is not None:
            status["registry"] = self.models()
        return status

    # -- observability ---------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._health()

    def job_status(self) -> dict[str, Any] | None:
        return self.status()

    def stats(self) -> dict[str, Any]:
        stats = self.aggregator.stats()
        if self.model_service is not None:
            stats["registry"] = self.models()
        return stats

    def metrics_text(self) -> bytes:
        return self.aggregator.prometheus_text()

    def trace(self, last: int = 50) -> dict[str, Any]:
        """The newest ``last`` (1..1000) delivered frames' traces as a Chrome trace JSON
        object (``GET /trace?last=N``; Perfetto opens it); raises ``ValueError`` otherwise."""
        return self.aggregator.trace(last)


class OutputSink:
    """The last stage's outlet: delivers encoded frames to browser sessions.

    Replicas can finish frames out of order; a frame older than one already shown to
    its session is dropped (counted as late): a mirror must never step backwards.
    Delivery never waits, so the sink always has a credit.
    """

    name = "front door"

    def __init__(self, sink: SessionSink, aggregator: Aggregator, is_open: Callable[[str], bool]) -> None:
        self._sink = sink
        self._aggregator = aggregator
        self._is_open = is_open
        self._last_frame: dict[str, int] = {}
        self._lock = threading.Lock()

    def send(self, msg: Message, timeout: float | None = None) -> None:
        jpeg = msg.tensors[0].cpu().numpy().tobytes()
        vision = dict(msg.meta.get("vision", {"frame_id": msg.frame_id, "faces": []}))
        vision["revision"] = msg.revision  # which live config made this frame
        # One lock from the open-check to the last per-session write: ``forget`` takes it
        # too, so a browser leaving mid-delivery cannot have its state re-created after.
        with self._lock:
            if not self._is_open(msg.session):
                return  # its browser left while the frame was in the pipeline
            if msg.frame_id <= self._last_frame.get(msg.session, -1):
                self._aggregator.on_late()
                return
            self._last_frame[msg.session] = msg.frame_id
            msg.stamp("server.send")
            self._sink.deliver_output(msg.session, msg.frame_id, msg.capture_ts, jpeg, vision)
            self._aggregator.on_delivered(msg)

    def credits(self) -> int:
        return 1

    def deliver_event(self, msg: Message) -> None:
        """A stage's notice for a session (an ``error`` on its page)."""
        code = str(msg.meta.get("code", "pipeline_error"))
        message = str(msg.meta.get("message", "the pipeline could not process a frame"))
        if msg.session:
            self._sink.deliver_error(msg.session, code, message)
        else:
            log.warning("pipeline event without a session: %s: %s", code, message)

    def forget(self, session: str) -> None:
        """Release a departed session's state (after ``is_open`` turned false for it)."""
        with self._lock:
            self._last_frame.pop(session, None)
            self._aggregator.forget_session(session)


class JobStatus:
    """What the pages were last told about the job's lost ranks; thread-safe."""

    def __init__(self, sink: SessionSink) -> None:
        self._sink = sink
        self._current: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def announce(self, state: str, message: str, lost: list[dict[str, Any]]) -> None:
        """Tell every session (``state``: 'degraded', 'restarting' or 'stopping')."""
        with self._lock:
            self._current = {"state": state, "message": message, "lost": [dict(e) for e in lost]}
        self._sink.deliver_status(state, message, lost)

    def current(self) -> dict[str, Any] | None:
        """The last announcement, for a session that connects now; None while nothing was lost."""
        with self._lock:
            return None if self._current is None else dict(self._current)
