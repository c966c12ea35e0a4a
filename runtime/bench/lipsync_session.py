"""A talking session, the page's stand-in, and what its record says.

``talk`` opens one WebSocket per session, selects each session's avatar, and sends the
speech as the page sends a microphone: 20 ms PCM16 chunks (binary kind 2) at real-time
pace, each sent when its last sample would have been captured, stamped with the page clock
at its first sample. It records every chunk's send time, every frame's arrival, and the
``vision``, ``stats``, ``error`` and ``config.current`` messages (``SessionRecord``).

From a record (pure, tested without a pipeline): the frames a session should get
(``expected_frames``: every frame whose look-ahead its audio covers), latency as the page
sees it (arrival - the frame's timestamp, look-ahead included) and after the audio
(arrival - the moment the chunk completing the frame's look-ahead was sent), FPS,
generators (``session_figures``); and the bytes per frame on each hop, the growth of the
``stats`` message's per-link counters over a run (``hop_bytes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect

from runtime.bench.speech import RATE
from runtime.bench.stats import median
from stages.lipsync.audio_windows import SAMPLES_PER_VIDEO_FRAME, lookahead_samples, lookahead_seconds
from stages.server import protocol
from stages.server.protocol import BinaryFrame, Kind

CHUNK = 320
"""Samples per audio chunk (20 ms), what the page sends."""
LOOKAHEAD_MS = 1000.0 * lookahead_seconds()
"""The speech stage's look-ahead (452.5 ms): audio past a frame's first sample it must have."""
LOOKAHEAD_SAMPLES = round(lookahead_seconds() * RATE)
"""The same in samples (7240, the worst frame's): audio past a stretch's end that brings
out its last frames."""
AUDIO_WAIT_MS = 1000.0 * math.ceil(LOOKAHEAD_SAMPLES / CHUNK) * CHUNK / RATE
"""When the page sends 20 ms chunks as they fill, every frame's look-ahead is complete this
long (460 ms) after its first sample: the look-ahead rounded up to whole chunks."""
STAGGER_S = 0.01
"""Session s starts s x this after session 0 (real pages are not in step)."""
SETTLE_S = 3.0
"""After the last chunk, how long to wait for frames still missing."""
STATS_AFTER_S = 0.6
"""The figures of a run come from a stats message sent at least this long after its last
frame: the ranks' heartbeats (every 0.5 s) have reported everything by then."""


def expected_frames(samples: int) -> int:
    """Frames a session sending ``samples`` samples gets back: every frame i whose look-ahead
    the audio covers (``640 i + lookahead_samples(i) <= samples``); the last ~0.45 s of
    frames wait for audio that never comes."""
    count = 0
    while SAMPLES_PER_VIDEO_FRAME * count + lookahead_samples(count) <= samples:
        count += 1
    return count


def enabling_chunk(frame: int) -> int:
    """The chunk whose arrival completes frame ``frame``'s look-ahead."""
    return (SAMPLES_PER_VIDEO_FRAME * frame + lookahead_samples(frame) - 1) // CHUNK


# -- a talking session (the page's stand-in) ------------------------------------------------

@dataclass(kw_only=True)
class SessionRecord:
    """What one session sent and got back (monotonic seconds; page clock = monotonic ms)."""

    avatar: str
    chunk_sent: list[float] = field(default_factory=list)
    """When each chunk went out."""
    arrivals: list[tuple[int, float, float, int]] = field(default_factory=list)
    """(frame id, arrival s, client_ts ms, JPEG bytes) of each output frame, in arrival order."""
    visions: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Frame id -> the ``lipsync`` part of its ``vision`` message."""
    stats: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    configs: list[dict[str, Any]] = field(default_factory=list)


async def _read(ws: ClientConnection, record: SessionRecord) -> None:
    async for message in ws:
        now = time.monotonic()
        if isinstance(message, bytes):
            frame = protocol.decode_frame(message)
            if frame.kind is Kind.OUTPUT_FRAME:
                record.arrivals.append((frame.frame_id, now, frame.client_ts, len(frame.payload)))
            continue
        text = json.loads(message)
        kind, payload = text.get("type"), text.get("payload") or {}
        if kind == protocol.VISION:
            record.visions[int(payload.get("frame_id", -1))] = payload.get("lipsync") or {}
        elif kind == protocol.STATS:
            record.stats.append((now, payload))
        elif kind == protocol.ERROR:
            record.errors.append(f"{payload.get('code')}: {payload.get('message')}")
        elif kind == protocol.CONFIG_CURRENT:
            record.configs.append(payload)


async def _wait(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def _select(ws: ClientConnection, record: SessionRecord) -> None:
    """Choose the session's avatar; RuntimeError if the server refuses it."""
    await ws.send(protocol.encode_message(protocol.AVATAR_SELECT, {"id": record.avatar}))
    chosen = await _wait(lambda: record.errors or any(c.get("avatar") == record.avatar for c in record.configs), 15.0)
    if record.errors or not chosen:
        raise RuntimeError(f"avatar {record.avatar!r} was not selected: {record.errors or 'no answer in 15 s'}")


async def _send_audio(ws: ClientConnection, record: SessionRecord, pcm: np.ndarray, t0: float) -> None:
    """``pcm`` in 20 ms chunks, chunk k sent when its last sample would have been captured
    (t0 + its end), stamped with the page clock at its first sample."""
    for k, first in enumerate(range(0, len(pcm), CHUNK)):
        chunk = pcm[first:first + CHUNK]
        await asyncio.sleep(max(0.0, t0 + (first + len(chunk)) / RATE - time.monotonic()))
        await ws.send(protocol.encode_frame(BinaryFrame(kind=Kind.AUDIO_CHUNK, frame_id=k,
                                                        client_ts=1000.0 * (t0 + first / RATE),
                                                        payload=chunk.astype("<i2").tobytes())))
        record.chunk_sent.append(time.monotonic())


async def talk(port: int, pcm: np.ndarray, avatars: list[str], *, stagger_s: float = STAGGER_S,
               settle_s: float = SETTLE_S, stats_after_s: float = STATS_AFTER_S) -> tuple[list[SessionRecord], float]:
    """One session per entry of ``avatars`` (each its own WebSocket), all sending ``pcm``;
    returns the records and the time session 0 started. Waits for every expected frame
    (at most ``settle_s`` after the audio ends), then for a stats message sent at least
    ``stats_after_s`` after the last frame."""
    url = f"ws://127.0.0.1:{port}/ws"
    records = [SessionRecord(avatar=avatar) for avatar in avatars]
    expected = expected_frames(len(pcm))
    async with contextlib.AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(connect(url, compression=None, max_size=None, open_timeout=10))
                   for _ in records]
        readers = [asyncio.create_task(_read(ws, record)) for ws, record in zip(sockets, records)]
        try:
            for ws, record in zip(sockets, records):
                await _select(ws, record)
            await _wait(lambda: bool(records[0].stats), 3.0)  # the counters before the run
            start = time.monotonic() + 0.05
            await asyncio.gather(*(_send_audio(ws, record, pcm, start + s * stagger_s)
                                   for s, (ws, record) in enumerate(zip(sockets, records))))

            def complete() -> bool:
                return all(len({a[0] for a in r.arrivals}) >= expected for r in records)

            await _wait(complete, settle_s)
            last = max((a[1] for r in records for a in r.arrivals), default=time.monotonic())
            await _wait(lambda: records[0].stats and records[0].stats[-1][0] >= last + stats_after_s,
                        stats_after_s + 2.0)
        finally:
            for reader in readers:
                reader.cancel()
    for reader in readers:  # a reader that failed (a bad message) fails the run
        if reader.done() and not reader.cancelled() and reader.exception() is not None:
            raise reader.exception()
    return records, start


# -- what a record says (pure) -----------------------------------------------------------------

def first_frame_ms(record: SessionRecord) -> float | None:
    """Latency of a session's first frame (a cold avatar pays its load here)."""
    if not record.arrivals:
        return None
    _, at, ts, _ = record.arrivals[0]
    return 1000.0 * at - ts


def session_figures(record: SessionRecord, expected: int) -> dict[str, Any]:
    """One session's figures: frames back / lost / out of order, FPS, latency samples as
    the page sees them and after the audio, generators, JPEG bytes."""
    ids = [a[0] for a in record.arrivals]
    unique = set(ids)
    latencies = [1000.0 * at - ts for _, at, ts, _ in record.arrivals]
    after_audio = []
    for frame, at, _, _ in record.arrivals:
        k = enabling_chunk(frame)
        if k < len(record.chunk_sent):
            after_audio.append(1000.0 * (at - record.chunk_sent[k]))
    times = [a[1] for a in record.arrivals]
    span = max(times) - min(times) if len(times) > 1 else 0.0
    generators = Counter(str(record.visions.get(i, {}).get("generator", "unknown")) for i in unique)
    return {"avatar": record.avatar, "received": len(unique), "expected": expected,
            "lost": max(0, expected - len(unique & set(range(expected)))),
            "out_of_order": sum(1 for a, b in itertools.pairwise(ids) if b <= a),
            "fps": (len(times) - 1) / span if span > 0 else math.nan,
            "latencies_ms": latencies, "after_audio_ms": after_audio, "generators": dict(generators),
            "avatars_shown": sorted({str(v.get("avatar")) for v in record.visions.values()}),
            "jpeg_bytes": median([float(a[3]) for a in record.arrivals]), "errors": list(record.errors)}


def link_pair(name: str) -> tuple[str, str] | None:
    """'speech#0->lipsync#1' -> ('speech', 'lipsync'); None for a name of another shape."""
    source, sep, target = name.partition("->")
    if not sep:
        return None
    return source.partition("#")[0], target.partition("#")[0]


def hop_bytes(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Per link of ``after['hops']``: messages and bytes sent between two stats messages
    (``before`` None: since the job started), bytes per message, hop p50; and per stage
    pair ('speech->lipsync', ...) the same summed over its links (replicas)."""
    start = (before or {}).get("hops", {})
    links, pairs = {}, {}
    for name, link in (after or {}).get("hops", {}).items():
        messages = link.get("messages_sent", 0) - start.get(name, {}).get("messages_sent", 0)
        sent = link.get("bytes_sent", 0) - start.get(name, {}).get("bytes_sent", 0)
        links[name] = {"messages": messages, "bytes": sent, "bytes_per_message": sent / messages if messages else None,
                       "hop_p50_ms": link.get("hop_ms", {}).get("p50")}
        pair = link_pair(name)
        if pair is not None and messages:
            total = pairs.setdefault(f"{pair[0]}->{pair[1]}", {"messages": 0, "bytes": 0, "links": 0})
            total["messages"] += messages
            total["bytes"] += sent
            total["links"] += 1
    for total in pairs.values():
        total["bytes_per_message"] = total["bytes"] / total["messages"]
    return {"links": links, "pairs": pairs}


def stats_around(record: SessionRecord, start: float) -> tuple[dict | None, dict | None]:
    """The last stats message before ``start`` and the last one received."""
    before = [payload for at, payload in record.stats if at < start]
    return (before[-1] if before else None), (record.stats[-1][1] if record.stats else None)
