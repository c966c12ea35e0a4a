"""One browser-like session of the soak: paced like the page, reading everything it is sent.

``runtime.bench.client`` measures a pipeline (a fixed rate or a window in flight, a measured
window, a drain); the soak asks something else: can many pages stay connected for minutes
and each keep being served? So this session behaves like the page's own capture loop
(``stages/server/static/capture.js``) rather than a benchmark:

- a timer ticks at ``fps``, never catching up in a burst after a late tick (the next tick is
  due one interval after the later of the planned time and now);
- a tick sends nothing while ``max_in_flight`` frames are unanswered, so a pipeline shared by
  eight pages slows each page down instead of queueing in front of it; an output frame
  answers its own frame and every older one; a frame unanswered after
  ``in_flight_timeout_s`` is forgotten (the runtime drops frames, and a dropped frame is
  never answered);
- it follows the live ``target_fps`` of ``config.current`` when ``fps`` is None, as the page
  does;
- it sends the page's ``Origin`` (same-origin, as a browser on the served page would), and
  reads every message: output frames (latency = arrival - the echoed ``client_ts``, both on
  this process's monotonic clock in ms), ``vision``, ``stats``, ``config.current`` and
  ``error``.

Anything the server sends that a page would show as a problem is an error of the session:
an ``error`` message, a frame or text that does not decode, or the server closing the
connection before the soak did. The record keeps the first few texts and the count.
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from stages.server import protocol
from stages.server.protocol import BinaryFrame, Kind

MAX_ERRORS_KEPT = 5
PAGE_FPS = 20.0
"""The page's rate before the server's first ``config.current`` arrives (capture.js)."""


def socket_url(url: str, token: str | None = None) -> tuple[str, str]:
    """(the WebSocket URL, the page's origin) for a page or socket URL as ``launch/mirror.py``
    prints it: ``http://127.0.0.1:8765/`` -> ``ws://127.0.0.1:8765/ws``; https -> wss; a
    ``?token=`` already in it is kept, ``token`` replaces it."""
    parts = urlsplit(url)
    schemes = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"url: expected http(s)://HOST:PORT/ or ws(s)://HOST:PORT/ws, got {url!r}")
    scheme = schemes[parts.scheme]
    query = parts.query
    if token:
        query = urlencode({"token": token})
    origin = urlunsplit(("https" if scheme == "wss" else "http", parts.netloc, "", "", ""))
    return urlunsplit((scheme, parts.netloc, "/ws", query, "")), origin


@dataclass(kw_only=True, slots=True)
class SessionSettings:
    url: str
    """The WebSocket URL (``socket_url``)."""
    origin: str
    """The ``Origin`` header a browser on the served page sends."""
    jpeg: bytes
    """The camera frame every message carries."""
    fps: float | None = None
    """Tick rate; None follows the server's live ``target_fps`` (the page's behaviour)."""
    max_in_flight: int = 3
    """capture.js ``maxInFlight``."""
    in_flight_timeout_s: float = 2.0
    """capture.js ``inFlightTimeoutMs``."""
    open_timeout_s: float = 10.0
    verify_tls: bool = True
    """False accepts a self-signed certificate (``wss://`` to a server of one's own)."""

    def __post_init__(self) -> None:
        if self.fps is not None and not (math.isfinite(self.fps) and 0 < self.fps <= 60):
            raise ValueError(f"fps must be within 0..60 (exclusive of 0) or None, got {self.fps}")
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        if not (math.isfinite(self.in_flight_timeout_s) and self.in_flight_timeout_s > 0):
            raise ValueError(f"in_flight_timeout_s must be a finite number > 0, got {self.in_flight_timeout_s}")


@dataclass(kw_only=True, slots=True)
class SessionRecord:
    """What one session saw, from connecting to closing."""

    index: int
    sent_at: list[float] = field(default_factory=list)
    """``time.monotonic()`` of every camera frame sent."""
    arrivals: list[float] = field(default_factory=list)
    """``time.monotonic()`` of every output frame received."""
    latencies_ms: list[float] = field(default_factory=list)
    """Glass-to-glass latency of each output frame, in arrival order."""
    text_counts: dict[str, int] = field(default_factory=dict)
    """Text messages received, by ``type``."""
    bytes_in: int = 0
    errors: list[str] = field(default_factory=list)
    """The first ``MAX_ERRORS_KEPT`` problems, as text."""
    error_count: int = 0
    connected_at: float | None = None
    closed_by_server: str | None = None
    """How the server ended the connection, if it did before the soak closed it."""
    last_stats: dict | None = None
    """The payload of the last ``stats`` message (ranks with roles and liveness, drops)."""

    def error(self, text: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(text)


class _Pacing:
    """capture.js's in-flight bookkeeping."""

    def __init__(self, settings: SessionSettings) -> None:
        self.settings = settings
        self.fps = settings.fps or PAGE_FPS
        self.in_flight: dict[int, float] = {}
        self.next_id = 1

    def may_send(self, now: float) -> bool:
        for frame_id in [i for i, t in self.in_flight.items() if now - t > self.settings.in_flight_timeout_s]:
            del self.in_flight[frame_id]
        return len(self.in_flight) < self.settings.max_in_flight

    def ack(self, frame_id: int) -> None:
        for sent in [i for i in self.in_flight if i <= frame_id]:
            del self.in_flight[sent]

    def follow(self, config: dict) -> None:
        if self.settings.fps is None and isinstance(config.get("target_fps"), (int, float)):
            self.fps = float(config["target_fps"])


async def run_session(record: SessionRecord, settings: SessionSettings, stop: asyncio.Event,
                      start_delay_s: float = 0.0) -> SessionRecord:
    """Connect after ``start_delay_s``, stream until ``stop`` is set, close; fills ``record``
    as it goes (so a caller that has to cancel it still has what it saw). Never raises for
    what the server does: every problem lands in the record."""
    await asyncio.sleep(start_delay_s)
    ssl_context = None
    if settings.url.startswith("wss:") and not settings.verify_tls:
        ssl_context = ssl.create_default_context()
        ssl_context.check_hostname = False
        ssl_context.verify_mode = ssl.CERT_NONE
    try:
        async with connect(settings.url, origin=settings.origin, compression=None, max_size=None,
                           open_timeout=settings.open_timeout_s, ssl=ssl_context) as ws:
            record.connected_at = time.monotonic()
            pacing = _Pacing(settings)
            reader = asyncio.create_task(_read(ws, record, pacing))
            try:
                await _send_until(ws, record, pacing, stop, reader)
            except ConnectionClosed:
                pass  # the reader sees the same close and says how it came
            if stop.is_set() and not reader.done():  # the soak is over: this side closes
                reader.cancel()
                await ws.close()
            else:
                await asyncio.wait([reader], timeout=settings.open_timeout_s)
                _note_reader_end(reader, ws, record)
    except (OSError, TimeoutError, ConnectionClosed) as e:  # refused or timed out while connecting
        record.error(f"connection: {type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 -- a refused handshake (InvalidStatus 401/403), or a bug here
        record.error(f"session: {type(e).__name__}: {e}")
    return record


async def _send_until(ws: ClientConnection, record: SessionRecord, pacing: _Pacing, stop: asyncio.Event,
                      reader: asyncio.Task) -> None:
    due = time.monotonic()
    while not stop.is_set() and not reader.done():
        now = time.monotonic()
        if pacing.may_send(now):
            frame_id = pacing.next_id
            pacing.next_id = (frame_id + 1) & protocol.MAX_FRAME_ID
            pacing.in_flight[frame_id] = now
            record.sent_at.append(now)
            await ws.send(protocol.encode_frame(BinaryFrame(kind=Kind.CAMERA_FRAME, frame_id=frame_id,
                                                            client_ts=1000.0 * now, payload=pacing.settings.jpeg)))
        due = max(due + 1.0 / pacing.fps, time.monotonic())  # never catch up in a burst
        try:
            await asyncio.wait_for(stop.wait(), timeout=max(0.0, due - time.monotonic()))
        except TimeoutError:
            pass


def _note_reader_end(reader: asyncio.Task, ws: ClientConnection, record: SessionRecord) -> None:
    """The reader stopped before the soak did: the server closed, or a message broke it."""
    if not reader.done():
        reader.cancel()
        record.error("the connection stopped sending without closing")
        return
    error = None if reader.cancelled() else reader.exception()
    if error is not None and not isinstance(error, ConnectionClosed):
        record.error(f"reading: {type(error).__name__}: {error}")
        return
    record.closed_by_server = f"{ws.close_code} {ws.close_reason or ''}".strip()
    record.error(f"closed by the server: {record.closed_by_server}")


async def _read(ws: ClientConnection, record: SessionRecord, pacing: _Pacing) -> None:
    async for message in ws:
        now = time.monotonic()
        record.bytes_in += len(message)
        if isinstance(message, bytes):
            frame = protocol.decode_frame(message)
            if frame.kind is not Kind.OUTPUT_FRAME:
                raise protocol.ProtocolError(protocol.ErrorCode.BAD_KIND,
                                             f"server sent kind {int(frame.kind)}; expected output frames (3)")
            record.arrivals.append(now)
            record.latencies_ms.append(1000.0 * now - frame.client_ts)
            pacing.ack(frame.frame_id)
            continue
        text = json.loads(message)
        kind = text["type"]
        record.text_counts[kind] = record.text_counts.get(kind, 0) + 1
        if kind == protocol.ERROR:
            payload = text.get("payload", {})
            record.error(f"error message: {payload.get('code')}: {payload.get('message')}")
        elif kind == protocol.STATS:
            record.last_stats = text.get("payload")
        elif kind == protocol.CONFIG_CURRENT:
            pacing.follow(text.get("payload", {}).get("config", {}))
