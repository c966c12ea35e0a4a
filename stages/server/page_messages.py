"""What a page sends, handled: camera frames and audio chunks to the pipeline, config
changes and avatar choices, each checked first. Nothing a message contains may escape
its session: a bad one gets an ``error`` back (``protocol.ProtocolError``), a failing
hook an ``internal`` one. Runs on the web server's event loop (``ws_server.WebServer``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from core.config import ConfigError
from stages.server import protocol
from stages.server.config import ServerConfig
from stages.server.hooks import PipelineHooks, hook_or_none
from stages.server.limits import LimitMetrics
from stages.server.metrics import ServerMetrics
from stages.server.protocol import ErrorCode, ProtocolError
from stages.server.session import Session

log = logging.getLogger(__name__)


class PageMessages:
    """The server's handler of incoming messages; ``route_error(session_id, code, text)``
    and ``push_config_all(current)`` are the server's ways back to the pages."""

    def __init__(self, config: ServerConfig, hooks: PipelineHooks, metrics: ServerMetrics, limits: LimitMetrics, *,
                 route_error: Callable[[str, str, str], None],
                 push_config_all: Callable[[dict[str, Any]], None]) -> None:
        self.config = config
        self._hooks = hooks
        self._metrics = metrics
        self._limits = limits
        self._route_error = route_error
        self._push_config_all = push_config_all

    def drop_over_rate(self, session: Session) -> None:
        """Count a message dropped for the session's rate; tell the page now and then."""
        assert session.message_limit is not None
        session.counters.messages_dropped += 1
        self._limits.messages_dropped.labels(reason="rate").inc()
        dropped = session.message_limit.notice()
        if dropped is not None:
            log.warning("session %s sends too fast: %d message(s) dropped", session.id, dropped)
            self._route_error(session.id, ErrorCode.RATE_LIMITED,
                              protocol.error_message(ErrorCode.RATE_LIMITED, session.message_limit.describe(dropped)))

    def dispatch(self, session: Session, message: str | bytes) -> None:
        """Handle one message from the page; nothing it contains may escape this session."""
        try:
            if isinstance(message, str):
                self._on_text(session, message)
            elif session.audio_limit is not None:
                self._on_audio(session, message)
            else:
                self._on_binary(session, message)
        except ProtocolError as e:
            self._route_error(session.id, e.code, protocol.error_message(e.code, e.message, chunk_id=e.chunk_id))
        except ConfigError as e:
            self._route_error(session.id, ErrorCode.BAD_CONFIG, protocol.error_message(ErrorCode.BAD_CONFIG, str(e)))
        except Exception as e:
            log.exception("hooks failed on a message of session %s", session.id)
            self._route_error(session.id, ErrorCode.INTERNAL,
                              protocol.error_message(ErrorCode.INTERNAL, protocol.describe_exception(e)))

    def _on_binary(self, session: Session, data: bytes) -> None:
        self._metrics.bytes_in.inc(len(data))
        frame = protocol.decode_camera_frame(data)
        width, height = protocol.probe_jpeg(frame.payload, max_width=self.config.max_frame_width,
                                            max_height=self.config.max_frame_height,
                                            max_pixels=self.config.max_frame_pixels)
        self._hooks.submit_frame(session.id, frame.frame_id, frame.client_ts, frame.payload, width, height)
        session.counters.frames_in += 1
        self._metrics.frames_in.inc()

    def _on_audio(self, session: Session, data: bytes) -> None:
        assert session.audio_limit is not None
        self._metrics.bytes_in.inc(len(data))
        chunk = protocol.decode_audio_chunk(data, max_bytes=self.config.max_audio_chunk_bytes)
        samples = len(chunk.payload) // 2
        try:
            session.audio_limit.admit(samples)
        except ProtocolError as e:
            e.chunk_id = chunk.frame_id
            raise
        submit = hook_or_none(self._hooks, "submit_audio")
        if submit is None:  # takes() said audio, yet there is nowhere to put it
            raise ProtocolError(ErrorCode.UNSUPPORTED_KIND, "this pipeline accepts no audio chunks",
                                chunk_id=chunk.frame_id)
        try:
            submit(session.id, chunk.frame_id, chunk.client_ts, chunk.payload)
        except ProtocolError as e:  # the pipeline's own refusal of this chunk
            e.chunk_id = chunk.frame_id
            raise
        session.counters.audio_chunks_in += 1
        session.counters.audio_samples_in += samples
        self._metrics.audio_chunks_in.inc()
        self._metrics.audio_seconds_in.inc(samples / protocol.AUDIO_SAMPLE_RATE)

    def _on_text(self, session: Session, text: str) -> None:
        message = protocol.decode_client_message(text)
        if message.type == protocol.AVATAR_SELECT:
            self._select_avatar(session, message.payload["id"])
            return
        if message.type == protocol.CONFIG_UPDATE:
            current = self._hooks.update_config(message.payload)
        else:
            current = self._hooks.apply_preset(message.payload["name"])
        # Every page shows the live config, so every page hears of the change.
        self._push_config_all(current)

    def _select_avatar(self, session: Session, avatar: str) -> None:
        """An avatar is this session's choice alone: only its page hears the answer."""
        protocol.check_avatar_id(avatar)
        select = hook_or_none(self._hooks, "select_avatar")
        if select is None:
            raise ProtocolError(ErrorCode.UNKNOWN_AVATAR, "this pipeline shows no avatars (it takes camera frames)")
        try:
            current = select(session.id, avatar)
        except LookupError as e:
            reason = str(e.args[0]) if e.args else f"no avatar {avatar!r}"
            raise ProtocolError(ErrorCode.UNKNOWN_AVATAR, reason) from None
        session.avatar = avatar
        self._metrics.avatar_selects.inc()
        session.push_config(config_text(session, current))


def config_text(session: Session, current: dict[str, Any]) -> str:
    """``config.current`` as this session sees it: a pipeline with avatars says which one
    this session shows (its choice, else the pipeline's ``avatar`` or ``default_avatar``)."""
    avatar = session.avatar or current.get("avatar") or current.get("default_avatar")
    if avatar is not None:
        current = {**current, "avatar": avatar}
    return protocol.encode_message(protocol.CONFIG_CURRENT, current)
