"""A browser stand-in that keeps its session going the way the page does, for recovery tests.

It streams camera frames at a steady rate while a socket is open and, when the socket
closes or cannot be opened, reconnects with the page's backoff (``connection.js``:
0.5 s doubling to 8 s, ±25 %; after a 1012 close at most 1 s for the first 20 tries;
reset once ``config.current`` says a session is up). It records, on one monotonic clock, every
output frame's arrival, every text message and every close, so a test can measure how
long the stream stopped around a lost rank (``longest_gap``) and when frames came again
after it (``first_frame_after``).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from stages.server.protocol import Kind, decode_frame
from tests.integration.mirror_client import FIXTURE, camera_frame

BACKOFF_S = {"first": 0.5, "max": 8.0, "restarting": 1.0, "restarting_tries": 20}
"""The page's reconnect schedule (connection.js ``BACKOFF_MS``), in seconds."""
SERVICE_RESTART = 1012


def reconnect_delay(attempt: int, restarting: bool, rand: float) -> float:
    fast = restarting and attempt < BACKOFF_S["restarting_tries"]
    cap = BACKOFF_S["restarting"] if fast else BACKOFF_S["max"]
    return min(cap, BACKOFF_S["first"] * 2 ** attempt) * (0.75 + rand / 2)


@dataclass
class Session:
    """One socket's life, as the client saw it."""

    opened: float
    frames: list[tuple[float, int]] = field(default_factory=list)
    """(arrival, frame id) of every output frame."""
    texts: list[tuple[float, dict]] = field(default_factory=list)
    closed: float | None = None
    close_code: int | None = None
    close_reason: str = ""

    def of_type(self, kind: str) -> list[dict]:
        return [m["payload"] for _, m in self.texts if m["type"] == kind]


class ReconnectingClient:
    def __init__(self, port: int, fps: float = 10.0, jpeg: bytes | None = None, seed: int = 0) -> None:
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.fps = fps
        self.jpeg = FIXTURE.read_bytes() if jpeg is None else jpeg
        self.sessions: list[Session] = []
        self.failed_connects = 0
        self._random = random.Random(seed)
        self._task: asyncio.Task | None = None

    # -- what happened ---------------------------------------------------------------

    def frames(self) -> list[tuple[float, int]]:
        return [f for s in self.sessions for f in s.frames]

    def statuses(self) -> list[dict]:
        return [p for s in self.sessions for p in s.of_type("status")]

    def first_frame_after(self, t: float) -> float | None:
        return next((at for at, _ in self.frames() if at > t), None)

    def longest_gap(self, start: float, end: float) -> float:
        """Longest time without an output frame within [start, end] (its ends count as frames)."""
        times = [start, *(at for at, _ in self.frames() if start < at < end), end]
        return max(b - a for a, b in zip(times, times[1:]))

    # -- running ---------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def wait_for(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            await asyncio.sleep(0.02)
        return False

    async def _run(self) -> None:
        attempt, restarting = 0, False
        while True:
            try:
                session = await self._session()
            except (OSError, InvalidHandshake, InvalidURI, TimeoutError):
                self.failed_connects += 1  # the server is not there (yet)
            else:
                if session.of_type("config.current"):
                    attempt, restarting = 0, False
                restarting = restarting or session.close_code == SERVICE_RESTART
            await asyncio.sleep(reconnect_delay(attempt, restarting, self._random.random()))
            attempt += 1

    async def _session(self) -> Session:
        async with connect(self.url, compression=None, max_size=None, open_timeout=5) as ws:
            session = Session(opened=time.monotonic())
            self.sessions.append(session)
            sender = asyncio.create_task(self._stream(ws))
            try:
                async for message in ws:
                    now = time.monotonic()
                    if isinstance(message, bytes):
                        frame = decode_frame(message)
                        if frame.kind is Kind.OUTPUT_FRAME:
                            session.frames.append((now, frame.frame_id))
                    else:
                        session.texts.append((now, json.loads(message)))
            except ConnectionClosed:
                pass
            finally:
                sender.cancel()
                session.closed = time.monotonic()
                session.close_code = ws.close_code
                session.close_reason = ws.close_reason or ""
            return session

    async def _stream(self, ws) -> None:
        frame_id, period = 0, 1.0 / self.fps
        due = time.monotonic()
        try:
            while True:
                await ws.send(camera_frame(frame_id, self.jpeg))
                frame_id += 1
                due += period
                await asyncio.sleep(max(0.0, due - time.monotonic()))
        except ConnectionClosed:
            pass


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return {"runs": len(values), "median": round(median, 2), "min": round(ordered[0], 2), "max": round(ordered[-1], 2)}
