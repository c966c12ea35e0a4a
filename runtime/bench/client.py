"""A benchmark client: one browser session over a real WebSocket, speaking wire protocol v1.

It sends the same JPEG as camera frames and times what comes back, in one of two modes:

- **fixed rate** (``fps`` set): frame ``i`` goes out at ``t0 + i / fps`` on an absolute
  schedule, so a late wake-up is made up on the next frame and 20 fps in really is 20.0
  fps, whatever the pipeline does;
- **as fast as possible** (``fps`` None): ``window`` frames are kept in flight; the next
  one goes out as soon as an output returns or a frame is known lost. A frame is lost
  when an output with a later id arrives (a session's outputs come back in order, so an
  earlier frame can no longer come) or after ``lost_after_s``. The window must cover the
  pipeline's depth (about one frame per stage and hop) or stages idle waiting for input;
  much more only queues frames at the entrance, where the runtime drops the oldest: a
  client that floods measures that drop policy, not how fast the pipeline runs. For the
  same reason sends are at least ``min_gap_ms`` apart: slots free up in bursts (a batch
  of outputs, several frames found lost at once), and a burst of frames sent back to back
  overflows the entrance queue (2 frames per session) before ingest has decoded one.

The run is ``warmup_s`` of input (models warm up, queues fill; nothing recorded) then
``duration_s`` measured: output FPS counts outputs that arrive inside the measured window;
sent/received/dropped count frames sent inside it (received by the end of a short drain).
Latency is glass-to-glass as a page sees it: arrival minus the echoed ``client_ts``,
which this client sets from its monotonic clock in ms.

The server's ``stats`` text message (twice a second) is kept: the last one, and the
drop counters' growth over the measured window (they count since the job started).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from stages.server import protocol
from stages.server.protocol import BinaryFrame, Kind

MAX_ERRORS_KEPT = 5


@dataclass(kw_only=True, slots=True)
class ClientSettings:
    port: int
    jpeg: bytes
    """The camera frame every message carries."""
    duration_s: float
    """Seconds measured (after the warm-up)."""
    warmup_s: float = 1.0
    """Seconds of input before measuring; at least one stats interval, so the drop
    counters have a starting point."""
    fps: float | None = None
    """Input rate of the fixed-rate mode; None sends as fast as possible."""
    window: int = 4
    """As fast as possible: frames in flight (see the module docstring)."""
    min_gap_ms: float = 5.0
    """As fast as possible: least time between two sends (caps the input at 200 fps, far
    above what the pipelines measured here deliver; see the module docstring)."""
    lost_after_s: float = 2.0
    """A frame not back after this long counts as lost (frees its window slot)."""
    drain_s: float = 2.0
    """After the last frame, how long to wait for frames still in the pipeline."""
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        # Each check is written so that nan fails it; inf would never end the run.
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise ValueError(f"duration_s must be a finite number > 0, got {self.duration_s}")
        if not (math.isfinite(self.warmup_s) and self.warmup_s >= 0):
            raise ValueError(f"warmup_s must be a finite number >= 0, got {self.warmup_s}")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"fps must be a finite number > 0 or None (as fast as possible), got {self.fps}")
        if self.window < 1 or self.min_gap_ms < 0:
            raise ValueError(f"window must be >= 1 and min_gap_ms >= 0, got {self.window}, {self.min_gap_ms}")

    @property
    def input_label(self) -> str:
        return "max" if self.fps is None else f"{self.fps:g} fps"


@dataclass(kw_only=True, slots=True)
class ClientResult:
    input: str
    """'20 fps' or 'max' (as fast as possible)."""
    measured_s: float
    window_start: float
    """``time.monotonic()`` at the start of the measured window."""
    window_end: float
    sent: int
    """Frames sent inside the measured window."""
    received: int
    """Of those, frames whose output came back."""
    dropped: int
    """Of those, frames that never came back."""
    fps_in: float
    """Input rate achieved in the window."""
    fps: float
    """Outputs per second arriving in the window."""
    latencies_ms: list[float]
    """Glass-to-glass latency of each output arriving in the window."""
    ttff_ms: float
    """First frame sent to first output back (includes any first-frame warm-up)."""
    stats: dict[str, Any] | None
    """The last ``stats`` message's payload (after the window), None if none came."""
    drops: dict[str, int] = field(default_factory=dict)
    """How much each of the stats' drop counters grew during the window, plus the
    session's own ``out_queue`` drops (outputs pushed out of its send queue)."""
    errors: list[str] = field(default_factory=list)
    """The first few ``error`` messages the server sent."""
    error_count: int = 0


class _Session:
    """What the reader task records while the sender runs."""

    def __init__(self) -> None:
        self.sent_at: dict[int, float] = {}
        """Send time of every frame."""
        self.in_flight: dict[int, float] = {}
        """Frames neither back nor known lost (id -> send time)."""
        self.arrivals: list[tuple[int, float, float]] = []
        """(frame id, arrival time, latency ms) per output."""
        self.stats: list[tuple[float, dict]] = []
        self.errors: list[str] = []
        self.error_count = 0
        self.freed = asyncio.Event()
        """Set whenever a window slot frees up."""

    def on_output(self, frame: BinaryFrame, now: float) -> None:
        self.arrivals.append((frame.frame_id, now, 1000.0 * now - frame.client_ts))
        self.in_flight.pop(frame.frame_id, None)
        # Outputs of one session arrive in frame order: an earlier frame still out is lost.
        for earlier in [i for i in self.in_flight if i < frame.frame_id]:
            del self.in_flight[earlier]
        self.freed.set()

    def expire(self, now: float, lost_after_s: float) -> None:
        for frame_id in [i for i, t in self.in_flight.items() if now - t > lost_after_s]:
            del self.in_flight[frame_id]
            self.freed.set()


async def run_client(settings: ClientSettings) -> ClientResult:
    """One session: warm-up, measured window, drain; see the module docstring."""
    url = f"ws://{settings.host}:{settings.port}/ws"
    async with connect(url, compression=None, max_size=None, open_timeout=10) as ws:
        session = _Session()
        reader = asyncio.create_task(_read(ws, session))
        try:
            t0 = time.monotonic()
            window_start, window_end = t0 + settings.warmup_s, t0 + settings.warmup_s + settings.duration_s
            if settings.fps is None:
                await _send_windowed(ws, session, settings, window_end)
            else:
                await _send_fixed(ws, session, settings, t0, window_end)
            await _drain(session, reader, settings, window_end)
        finally:
            reader.cancel()
    return _result(session, settings, window_start, window_end)


def _camera_frame(frame_id: int, jpeg: bytes, now: float) -> bytes:
    return protocol.encode_frame(BinaryFrame(kind=Kind.CAMERA_FRAME, frame_id=frame_id,
                                             client_ts=1000.0 * now, payload=jpeg))


async def _send(ws: ClientConnection, session: _Session, frame_id: int, jpeg: bytes) -> None:
    now = time.monotonic()
    session.sent_at[frame_id] = now
    session.in_flight[frame_id] = now
    await ws.send(_camera_frame(frame_id, jpeg, now))


async def _send_fixed(ws: ClientConnection, session: _Session, settings: ClientSettings, t0: float,
                      end: float) -> None:
    period = 1.0 / settings.fps
    frame_id = 0
    while (due := t0 + frame_id * period) < end:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        await _send(ws, session, frame_id, settings.jpeg)
        frame_id += 1


async def _send_windowed(ws: ClientConnection, session: _Session, settings: ClientSettings,
                         end: float) -> None:
    frame_id = 0
    gap = settings.min_gap_ms / 1000.0
    next_allowed = 0.0
    while time.monotonic() < end:
        await asyncio.sleep(max(0.0, next_allowed - time.monotonic()))
        while len(session.in_flight) >= settings.window:
            session.freed.clear()
            try:
                await asyncio.wait_for(session.freed.wait(), timeout=0.1)
            except TimeoutError:
                session.expire(time.monotonic(), settings.lost_after_s)
            if time.monotonic() >= end:
                return
        await _send(ws, session, frame_id, settings.jpeg)
        next_allowed = time.monotonic() + gap
        frame_id += 1


async def _drain(session: _Session, reader: asyncio.Task, settings: ClientSettings, window_end: float) -> None:
    """Wait for frames still in flight, then for a stats message sent after the window."""
    deadline = time.monotonic() + settings.drain_s
    while time.monotonic() < deadline and not reader.done():
        session.expire(time.monotonic(), settings.lost_after_s)
        if not session.in_flight and session.stats and session.stats[-1][0] > window_end:
            return
        await asyncio.sleep(0.02)
    if reader.done() and reader.exception() is not None:
        raise reader.exception()


async def _read(ws: ClientConnection, session: _Session) -> None:
    async for message in ws:
        now = time.monotonic()
        if isinstance(message, bytes):
            frame = protocol.decode_frame(message)
            if frame.kind is not Kind.OUTPUT_FRAME:
                raise protocol.ProtocolError(protocol.ErrorCode.BAD_KIND,
                                             f"server sent kind {int(frame.kind)}; expected output frames (3)")
            session.on_output(frame, now)
            continue
        text = json.loads(message)
        if text["type"] == protocol.STATS:
            session.stats.append((now, text["payload"]))
        elif text["type"] == protocol.ERROR:
            session.error_count += 1
            if len(session.errors) < MAX_ERRORS_KEPT:
                session.errors.append(f"{text['payload'].get('code')}: {text['payload'].get('message')}")


def _result(session: _Session, settings: ClientSettings, start: float, end: float) -> ClientResult:
    measured = end - start
    in_window = {i for i, t in session.sent_at.items() if start <= t <= end}
    came_back = {frame_id for frame_id, _, _ in session.arrivals}
    arrived = [(at, ms) for _, at, ms in session.arrivals if start <= at <= end]
    first_sent = min(session.sent_at.values(), default=math.nan)
    first_back = session.arrivals[0][1] if session.arrivals else math.nan
    before = [p for t, p in session.stats if t <= start]
    after = [p for t, p in session.stats if t > end]
    last = session.stats[-1][1] if session.stats else None
    return ClientResult(
        input=settings.input_label, measured_s=measured, window_start=start, window_end=end,
        sent=len(in_window), received=len(in_window & came_back), dropped=len(in_window - came_back),
        fps_in=len(in_window) / measured, fps=len(arrived) / measured,
        latencies_ms=[ms for _, ms in arrived], ttff_ms=1000.0 * (first_back - first_sent),
        stats=last, drops=drop_growth(before[-1] if before else None, after[-1] if after else last),
        errors=session.errors, error_count=session.error_count)


def drop_growth(before: dict | None, after: dict | None) -> dict[str, int]:
    """How much each drop counter of the ``stats`` message grew between two messages
    (``before`` None: from zero), plus this session's own send-queue drops."""
    if after is None:
        return {}
    start = (before or {}).get("drops", {})
    growth = {reason: n - start.get(reason, 0) for reason, n in after.get("drops", {}).items()}
    growth["out_queue"] = _session_drops(after) - _session_drops(before)
    return growth


def _session_drops(stats: dict | None) -> int:
    """Outputs pushed out of this session's send queue so far (the server's own count)."""
    return (stats or {}).get("server", {}).get("session", {}).get("frames_dropped", 0)


def run(settings: ClientSettings) -> ClientResult:
    """``run_client`` from synchronous code (a fresh event loop)."""
    return asyncio.run(run_client(settings))
