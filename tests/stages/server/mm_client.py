"""A small synchronous test client for the web server: frames out, typed messages in."""

from __future__ import annotations

import contextlib
import json
import struct
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

from stages.server.protocol import BinaryFrame, Kind, decode_frame, encode_frame

FIXTURE_JPEG = (Path(__file__).parents[2] / "fixtures" / "astronaut_640x480.jpg").read_bytes()


def camera_frame(frame_id: int, client_ts: float, jpeg: bytes = FIXTURE_JPEG) -> bytes:
    return encode_frame(BinaryFrame(kind=Kind.CAMERA_FRAME, frame_id=frame_id, client_ts=client_ts, payload=jpeg))


def audio_chunk(chunk_id: int, client_ts: float, pcm: bytes) -> bytes:
    return encode_frame(BinaryFrame(kind=Kind.AUDIO_CHUNK, frame_id=chunk_id, client_ts=client_ts, payload=pcm))


def sof_only_jpeg(width: int, height: int) -> bytes:
    """A JPEG header that declares ``width`` x ``height`` and holds no image data."""
    sof = struct.pack(">HBHHB", 17, 8, height, width, 3) + bytes.fromhex("011100021101031101")
    return b"\xff\xd8" + b"\xff\xc0" + sof + b"\xff\xd9"


class Client:
    """Wraps a connection; keeps messages it was not asked for yet, in arrival order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.texts: deque[dict[str, Any]] = deque()
        self.binaries: deque[BinaryFrame] = deque()

    @classmethod
    @contextlib.contextmanager
    def open(cls, server: Any, path: str = "ws", **kwargs: Any) -> Iterator[Client]:
        url = server.url.replace("http://", "ws://") + path
        with connect(url, compression=None, open_timeout=5, close_timeout=1, **kwargs) as ws:
            yield cls(ws)

    def send(self, message: bytes | str | dict[str, Any]) -> None:
        self.ws.send(json.dumps(message) if isinstance(message, dict) else message)

    def text(self, kind: str, timeout: float = 3.0) -> dict[str, Any]:
        """Payload of the next ``kind`` message; others stay queued."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self.texts:
                if message["type"] == kind:
                    self.texts.remove(message)
                    return message["payload"]
            self._pump(deadline, f"a {kind!r} message")

    def binary(self, timeout: float = 3.0) -> BinaryFrame:
        deadline = time.monotonic() + timeout
        while not self.binaries:
            self._pump(deadline, "a binary frame")
        return self.binaries.popleft()

    def drop(self, kind: str) -> None:
        """Forget queued messages of one type (e.g. periodic stats)."""
        self.texts = deque(m for m in self.texts if m["type"] != kind)

    def _pump(self, deadline: float, wanted: str) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no {wanted} in time; have texts {[m['type'] for m in self.texts]}")
        try:
            message = self.ws.recv(timeout=remaining)
        except TimeoutError:
            raise AssertionError(f"no {wanted} in time; have texts {[m['type'] for m in self.texts]}") from None
        if isinstance(message, str):
            self.texts.append(json.loads(message))
        else:
            self.binaries.append(decode_frame(message))

    def roundtrip(self, frame_id: int, client_ts: float = 1234.5) -> tuple[dict[str, Any], BinaryFrame]:
        """Send one camera frame; return its ``vision`` payload and output frame."""
        self.send(camera_frame(frame_id, client_ts))
        vision = self.text("vision")
        frame = self.binary()
        assert (vision["frame_id"], frame.frame_id, frame.client_ts) == (frame_id, frame_id, client_ts)
        return vision, frame
