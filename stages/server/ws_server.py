"""``WebServer``: rank 0's WebSocket + HTTP server, on its own asyncio loop in a thread.

The runtime is threads (one per stage); the server is one event loop. They meet in two
directions, both non-blocking:

- page -> runtime: the loop validates each message (``protocol``) and calls
  ``PipelineHooks`` directly; the hooks only queue, so the loop never waits on a stage;
- runtime -> page: the runtime calls the ``SessionSink`` methods from any thread; they
  encode there (off the loop) and hand the bytes over with ``call_soon_threadsafe``, which
  keeps the order in which they were delivered.

A peer that breaks the protocol gets an ``error`` message and stays connected; nothing
it sends reaches the pipeline or another session. A hook that raises is logged and
reported to that one session as ``internal``. (Incoming messages are handled in
``page_messages``.)

Binary input goes where the pipeline says (``PipelineHooks.takes()``): camera frames to
``submit_frame``, or audio chunks, each checked for shape and held to the session's
``AudioRateLimit``, to ``submit_audio``. An avatar selection is per session: the server
keeps it and writes it into every ``config.current`` that session is sent.

Limits (``ServerConfig``): at most ``max_sessions`` sessions (one more is told
``too_many_sessions`` and closed 1013); inbound messages per session through a token
bucket (``limits``: the excess is dropped unread, counted, and reported now and then as
``rate_limited``); ``handshake_timeout_s`` for a connection's TLS and HTTP/WebSocket
handshake; and a page that stops reading, which TCP backpressure already keeps from
costing more than its bounded queues, is closed with 1008 once nothing could be sent to
it for ``slow_reader_close_s``. Who may connect is ``access``'s business (origins, token,
TLS).

When the job loses a rank the runtime sends every session a ``status`` (``deliver_status``),
and a session that connects later gets the last one too (``PipelineHooks.job_status``).
``stop(restart_reason=...)`` closes the sessions with 1012 (service restart) and that
reason, after their waiting ``status`` went out, instead of 1001: the job ended because of
a lost rank or a failure, and the page should reconnect to the restarted job.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import uuid
from collections.abc import Callable
from typing import Any, Self

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from stages.server import protocol
from stages.server.access import AccessPolicy, exposure_warnings, page_url, resolve_token, server_ssl_context
from stages.server.audio_rate import AudioRateLimit
from stages.server.config import ServerConfig
from stages.server.hooks import AUDIO, PipelineHooks, pipeline_takes
from stages.server.page_messages import PageMessages, config_text
from stages.server.http_routes import HttpRoutes
from stages.server.limits import LimitMetrics, MessageRateLimit
from stages.server.metrics import ServerMetrics
from stages.server.protocol import BinaryFrame, ErrorCode, Kind
from stages.server.session import Session
from stages.server.session_watch import SessionWatch

log = logging.getLogger(__name__)


class WebServer:
    """Serves the page and one WebSocket session per browser; implements ``SessionSink``.

    ``start()`` returns once the socket listens; ``stop()`` closes every session and
    returns within ``config.stop_timeout_s``. Usable as a context manager.
    """

    def __init__(self, config: ServerConfig, hooks: PipelineHooks) -> None:
        self.config = config
        self._hooks = hooks
        self._metrics = ServerMetrics()
        self._limits = LimitMetrics(self._metrics.registry)
        self._token = resolve_token(config.token)  # ConfigError for a bad MINDMIRROR_TOKEN
        self._ssl: ssl.SSLContext | None = (server_ssl_context(config.tls_cert, config.tls_key)
                                            if config.tls_cert and config.tls_key else None)
        access = AccessPolicy(token=self._token, allowed_origins=config.allowed_origins,
                              allow_cross_origin=config.allow_cross_origin)
        self._routes = HttpRoutes(hooks, self._metrics, access=access, refusals=self._limits,
                                  action_wait_s=config.model_action_wait_s)
        self._sessions: dict[str, Session] = {}  # event loop only
        self._session_count = 0  # a copy other threads may read
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._listening = threading.Event()
        self._startup_error: BaseException | None = None
        self._stop_requested: asyncio.Event | None = None
        self._stopping = False
        self._restart_reason: str | None = None
        self._port: int | None = None
        self._watch = SessionWatch(self._sessions, hooks, self._limits, close_timeout_s=config.close_timeout_s,
                                   stats_interval_s=config.stats_interval_s)
        self._inbound = PageMessages(config, hooks, self._metrics, self._limits, route_error=self._route_error,
                                     push_config_all=self._push_config_all)

    # --- lifecycle (any thread) ---

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("WebServer.start() called twice")
        self._thread = threading.Thread(target=self._run_loop, name="mm-web-server", daemon=True)
        self._thread.start()
        if not self._listening.wait(self.config.start_timeout_s):
            self.stop()
            raise TimeoutError(f"web server not listening after {self.config.start_timeout_s} s")
        if self._startup_error is not None:
            self._thread.join(self.config.stop_timeout_s)
            raise self._startup_error  # e.g. the port is taken

    def stop(self, restart_reason: str | None = None) -> None:
        """Close all sessions and the socket; idempotent. Sessions are closed with 1001
        (going away), or with 1012 (service restart) and ``restart_reason`` when given."""
        thread, loop = self._thread, self._loop
        if thread is None or self._stopping:
            return
        self._restart_reason = restart_reason
        self._stopping = True
        if loop is not None and self._stop_requested is not None:
            try:
                loop.call_soon_threadsafe(self._stop_requested.set)
            except RuntimeError:
                pass  # the loop already ended
        thread.join(self.config.stop_timeout_s)
        if thread.is_alive():
            log.warning("web server thread still running %.1f s after stop()", self.config.stop_timeout_s)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("WebServer is not listening; call start() first")
        return self._port

    @property
    def url(self) -> str:
        """The page's address, e.g. ``http://127.0.0.1:8765/`` (``https`` with TLS)."""
        import socket  # here, not at the top: this property is the only user

        host = self.config.host
        if host in ("0.0.0.0", "::"):
            # A wildcard bind is for browsers on other machines (e.g. a cluster's head node
            # serving a laptop): name this machine, which they can reach and loopback is not.
            host = socket.gethostname()
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self._ssl is not None else 'http'}://{host}:{self.port}/"

    @property
    def page_url(self) -> str:
        """``url`` with the token in its query when one is in force: the address to open."""
        return page_url(self.url, self._token)

    @property
    def token_required(self) -> bool:
        return self._token is not None

    @property
    def session_count(self) -> int:
        return self._session_count

    def session_stats(self, timeout: float = 2.0) -> list[dict[str, Any]]:
        """Every open session as its ``stats`` shows it, plus the bytes its socket's write
        buffer holds: what rank 0 keeps for each page (for soak runs and tests)."""
        loop = self._loop
        if loop is None or self._stopping or not loop.is_running():
            return []

        async def collect() -> list[dict[str, Any]]:
            return self._watch.describe()

        return asyncio.run_coroutine_threadsafe(collect(), loop).result(timeout)

    # --- SessionSink (any thread) ---

    def deliver_output(self, session: str, frame_id: int, client_ts: float, jpeg: bytes,
                       vision: dict[str, Any]) -> None:
        # Encode on the caller's thread: the copy of the JPEG into the message costs the
        # loop nothing, and a bad value from a stage fails here, where it is logged.
        try:
            text = protocol.vision_message(frame_id, vision)
            frame = protocol.encode_frame(BinaryFrame(kind=Kind.OUTPUT_FRAME, frame_id=frame_id,
                                                      client_ts=client_ts, payload=bytes(jpeg)))
        except (TypeError, ValueError):
            log.exception("cannot encode output frame %s of session %s", frame_id, session)
            return
        self._call_soon(self._route_frame, session, text, frame)

    def deliver_error(self, session: str, code: str, message: str) -> None:
        self._call_soon(self._route_error, session, code, protocol.error_message(code, message))

    def deliver_status(self, state: str, message: str, lost: list[dict[str, Any]]) -> None:
        try:
            text = protocol.status_message(state, message, lost)
        except (TypeError, ValueError, KeyError):
            log.exception("cannot encode a status message (%r)", state)
            return
        self._call_soon(self._watch.push_status_all, text)

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or self._stopping:
            return  # no sessions to deliver to
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop closed between the check and the call

    # --- event loop ---

    def _run_loop(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:
            if not self._listening.is_set():
                self._startup_error = e
            else:
                log.exception("web server loop failed")
        finally:
            self._listening.set()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        self._stop_requested = asyncio.Event()
        server: Server = await serve(
            self._handle, self.config.host, self.config.port,
            process_request=self._routes,
            # permessage-deflate would cost CPU on every frame to shrink JPEGs by nothing,
            # and caps binary throughput near 30 MB/s.
            compression=None,
            max_size=self.config.max_message_bytes,
            max_queue=self.config.max_queue,
            ping_interval=self.config.ping_interval_s,
            ping_timeout=self.config.ping_timeout_s,
            close_timeout=self.config.close_timeout_s,
            # Covers the HTTP request and the WebSocket handshake; the TLS handshake gets
            # the same bound (``ssl_handshake_timeout``), so a silent peer costs a socket
            # for this long at most.
            open_timeout=self.config.handshake_timeout_s,
            ssl=self._ssl,
        )
        self._port = server.sockets[0].getsockname()[1]
        tasks = [asyncio.create_task(self._watch.stats_loop(), name="mm-stats")]
        if self.config.slow_reader_close_s is not None:
            tasks.append(asyncio.create_task(self._watch.slow_reader_loop(self.config.slow_reader_close_s),
                                             name="mm-slow-readers"))
        log.info("web server listening on %s%s", self.url, " (token required)" if self._token else "")
        for warning in exposure_warnings(self.config.host, token=self._token is not None, tls=self._ssl is not None):
            log.warning("%s", warning)
        self._listening.set()  # after the warnings, so they precede whatever start()'s caller logs
        try:
            await self._stop_requested.wait()
        finally:
            for task in tasks:
                task.cancel()
            # Leave a margin of stop_timeout_s for the thread to cancel what is left.
            closed_by = asyncio.get_running_loop().time() + self.config.stop_timeout_s * 0.8
            if self._restart_reason is not None:
                await self._watch.close_for_restart(self._restart_reason, timeout_s=self.config.stop_timeout_s * 0.2)
            server.close(close_connections=True)
            try:
                await asyncio.wait_for(server.wait_closed(), max(0.1, closed_by - asyncio.get_running_loop().time()))
            except TimeoutError:
                log.warning("sessions did not close in time; abandoning them")
            log.info("web server stopped")

    async def _handle(self, connection: ServerConnection) -> None:
        if len(self._sessions) >= self.config.max_sessions:
            self._limits.sessions_refused.labels(reason="too_many_sessions").inc()
            await _refuse(connection, ErrorCode.TOO_MANY_SESSIONS,
                          f"the server takes {self.config.max_sessions} sessions at once",
                          CloseCode.TRY_AGAIN_LATER, "too many sessions")
            return
        session = Session(id=uuid.uuid4().hex[:12], connection=connection, metrics=self._metrics,
                          max_frames=self.config.session_out_queue, max_errors=self.config.session_error_queue,
                          message_limit=MessageRateLimit(rate=self.config.max_messages_per_s,
                                                         burst=self.config.message_burst))
        try:
            if pipeline_takes(self._hooks) == AUDIO:
                session.audio_limit = AudioRateLimit(max_chunks_per_s=self.config.max_audio_chunks_per_s,
                                                     burst_s=self.config.audio_burst_s)
            self._hooks.open_session(session.id)
            first_config = config_text(session, self._hooks.config_current())
        except Exception as e:
            log.exception("opening session %s failed", session.id)
            self._limits.sessions_refused.labels(reason="open_failed").inc()
            await _refuse(connection, ErrorCode.INTERNAL, protocol.describe_exception(e),
                          CloseCode.INTERNAL_ERROR, "session could not open")
            return
        self._sessions[session.id] = session
        self._session_count = len(self._sessions)
        self._metrics.sessions.set(self._session_count)
        self._metrics.sessions_opened.inc()
        log.info("session %s opened from %s", session.id, connection.remote_address)
        sender = asyncio.create_task(session.run_sender(), name=f"mm-send-{session.id}")
        session.push_config(first_config)
        self._watch.push_job_status(session)
        try:
            async for message in connection:
                if session.message_limit is None or session.message_limit.admit():
                    self._inbound.dispatch(session, message)
                else:
                    self._inbound.drop_over_rate(session)
        except ConnectionClosed:
            pass  # abnormal closes (e.g. 1009 for an oversize message) end the session too
        finally:
            session.close()
            del self._sessions[session.id]
            self._session_count = len(self._sessions)
            self._metrics.sessions.set(self._session_count)
            try:
                self._hooks.close_session(session.id)
            except Exception:
                log.exception("close_session(%s) failed", session.id)
            try:
                await asyncio.wait_for(sender, self.config.close_timeout_s)
            except (TimeoutError, asyncio.CancelledError):
                pass
            log.info("session %s closed (%s): %s", session.id, connection.close_code,
                     session.counters.as_dict(audio=session.audio_limit is not None))

    def _route_frame(self, session_id: str, text: str, frame: bytes) -> None:
        session = self._sessions.get(session_id)
        if session is not None:  # else the page left while its frame was in flight
            session.push_frame(text, frame)

    def _route_error(self, session_id: str, code: str, text: str) -> None:
        session = self._sessions.get(session_id)
        if session is not None:
            session.push_error(str(code), text)

    def _push_config_all(self, current: dict[str, Any]) -> None:
        for session in self._sessions.values():
            session.push_config(config_text(session, current))


async def _refuse(connection: ServerConnection, code: ErrorCode, message: str, close_code: CloseCode,
                  reason: str) -> None:
    """Tell the page why in an ``error`` (it cannot read a close reason as easily), then close."""
    try:
        await connection.send(protocol.error_message(code, message))
        await connection.close(close_code, reason)
    except ConnectionClosed:
        pass  # it left first
