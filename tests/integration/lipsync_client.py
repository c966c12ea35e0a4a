"""Speech for the lip-sync tests and a page stand-in that talks it over a real WebSocket.

The speech itself comes from ``runtime.bench.speech`` (espeak-ng). ``talk`` streams
it in 20 ms chunks at real-time pace, as the page does with the microphone or a WAV file,
and records every frame and message that comes back.
"""

from __future__ import annotations

import asyncio
import time

import cv2
import numpy as np

from runtime.bench.speech import RATE, espeak_speech, have_espeak  # noqa: F401 (re-exported for the tests)
from stages.server.protocol import BinaryFrame, Kind, encode_frame
from tests.integration.mirror_client import MirrorClient, Received

CHUNK = 320  # 20 ms
FRAME_SAMPLES = 640  # one video frame at 25 fps


def frame_loudness_db(pcm: np.ndarray, frames: int) -> np.ndarray:
    """RMS dBFS of each video frame's 640 samples (-100 for digital silence)."""
    out = np.full(frames, -100.0)
    for i in range(frames):
        chunk = pcm[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES].astype(np.float64) / 32768.0
        if len(chunk):
            rms = float(np.sqrt(np.mean(chunk ** 2)))
            out[i] = max(-100.0, 20 * np.log10(rms)) if rms > 0 else -100.0
    return out


def audio_chunk(chunk_id: int, pcm: np.ndarray, ts: float) -> bytes:
    return encode_frame(BinaryFrame(kind=Kind.AUDIO_CHUNK, frame_id=chunk_id, client_ts=ts,
                                    payload=pcm.astype("<i2").tobytes()))


async def talk(port: int, pcm: np.ndarray, avatar: str | None = None, settle_s: float = 3.0) -> Received:
    """Stream ``pcm`` at real-time pace in 20 ms chunks; collect what comes back until
    ``settle_s`` after the last chunk."""
    async with MirrorClient(port) as client:
        if avatar is not None:
            await client.send_text("avatar.select", {"id": avatar})
            assert await client.wait_for(lambda got: got.of_type("config.current") or got.of_type("error"))
        start = time.monotonic()
        page_t0 = time.time() * 1000.0
        for chunk_id, first in enumerate(range(0, len(pcm), CHUNK)):
            await client.ws.send(audio_chunk(chunk_id, pcm[first:first + CHUNK], page_t0 + first * 1000.0 / RATE))
            await asyncio.sleep(max(0.0, start + (first + CHUNK) / RATE - time.monotonic()))
        await asyncio.sleep(settle_s)
        return client.got


def decode(frame: BinaryFrame) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(frame.payload, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, f"frame {frame.frame_id} is not a JPEG"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
