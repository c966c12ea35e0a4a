"""The server rank's bridge between the web server and the pipeline.

``FrontDoor`` implements the server's ``PipelineHooks``: camera frames go into the
``SessionQueue`` (the first stage's inlet), config changes go to ``LiveConfig`` and out
to every rank. ``OutputSink`` is the last stage's outlet: it hands finished frames to
the server, keeping each session's frames in order. Either end is absent when the
pipeline starts with a source stage or ends in a sink.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import torch

from comms.message import Message
from core.settings import STYLES, RuntimeSettings
from runtime.aggregate import Aggregator
from runtime.live_config import LiveConfig, settings_to_dict
from runtime.live_view import LiveView
from runtime.session_queue import SessionQueue
from stages.server.hooks import SessionSink
from stages.server.protocol import ErrorCode, ProtocolError

log = logging.getLogger(__name__)


class FrontDoor:
    def __init__(self, *, pipeline: str, live_config: LiveConfig, live_view: LiveView, inbox: SessionQueue | None,
                 aggregator: Aggregator, publish_config: Callable[[int, RuntimeSettings], None],
                 health: Callable[[], dict[str, Any]]) -> None:
        self.pipeline = pipeline
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

    # -- sessions and frames ---------------------------------------------------------

    def open_session(self, session: str) -> None:
        self._open.add(session)
        log.info("session %s connected", session)

    def is_open(self, session: str) -> bool:
        return session in self._open

    def close_session(self, session: str) -> None:
        self._open.discard(session)
        if self.inbox is not None:
            self.inbox.drop_session(session)
        self.session_closed(session)
        log.info("session %s left", session)

    def submit_frame(self, session: str, frame_id: int, client_ts: float, jpeg: bytes,
                     width: int, height: int) -> None:
        if self.inbox is None:
            raise ProtocolError(ErrorCode.UNSUPPORTED_KIND, f"pipeline {self.pipeline!r} takes no camera frames")
        data = torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)
        msg = Message(session=session, frame_id=frame_id, revision=self.live_view.get().revision,
                      capture_ts=client_ts, meta={"width": width, "height": height}, tensors=[data])
        self.inbox.put(msg.stamp("server.recv"))

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
        }

    # -- observability ---------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._health()

    def stats(self) -> dict[str, Any]:
        return self.aggregator.stats()

    def metrics_text(self) -> bytes:
        return self.aggregator.prometheus_text()


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
