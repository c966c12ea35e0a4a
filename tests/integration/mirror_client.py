"""A small browser stand-in for tests: speaks wire protocol v1 over a real WebSocket."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect

from stages.server.protocol import BinaryFrame, Kind, decode_frame, encode_frame

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "astronaut_640x480.jpg"


def camera_frame(frame_id: int, jpeg: bytes, ts: float | None = None) -> bytes:
    ts = time.time() * 1000.0 if ts is None else ts
    return encode_frame(BinaryFrame(kind=Kind.CAMERA_FRAME, frame_id=frame_id, client_ts=ts, payload=jpeg))


@dataclass
class Received:
    outputs: list[BinaryFrame] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    texts: list[dict] = field(default_factory=list)

    def of_type(self, kind: str) -> list[dict]:
        return [m["payload"] for m in self.texts if m["type"] == kind]


class MirrorClient:
    """Connects to ``/ws`` and records everything the server sends, in arrival order."""

    def __init__(self, port: int) -> None:
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.got = Received()
        self.ws: ClientConnection | None = None
        self._reader: asyncio.Task | None = None
        self.closed = asyncio.Event()

    async def __aenter__(self) -> "MirrorClient":
        self.ws = await connect(self.url, compression=None, max_size=None, open_timeout=10)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()
        self._reader.cancel()

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    frame = decode_frame(message)
                    self.got.outputs.append(frame)
                    self.got.latencies_ms.append(time.time() * 1000.0 - frame.client_ts)
                else:
                    self.got.texts.append(json.loads(message))
        finally:
            self.closed.set()

    async def send_text(self, kind: str, payload: dict) -> None:
        await self.ws.send(json.dumps({"type": kind, "payload": payload}))

    async def stream(self, n: int, fps: float, jpeg: bytes | None = None, first_id: int = 0) -> None:
        jpeg = FIXTURE.read_bytes() if jpeg is None else jpeg
        for i in range(n):
            await self.ws.send(camera_frame(first_id + i, jpeg))
            await asyncio.sleep(1.0 / fps)

    async def wait_for(self, predicate, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.got):
                return True
            await asyncio.sleep(0.02)
        return False
