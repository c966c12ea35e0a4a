"""Wire protocol v1 between the page and rank 0, as pure code: bytes and text in, values out.

Nothing here touches a socket, a clock or a thread, so every rule of the protocol can be
tested byte for byte (the sans-I/O split the ``websockets`` library itself uses).

Binary messages, both directions, little-endian, 20-byte header then payload::

    0..3   magic  b"MMF1"
    4      kind   1 camera frame (client->server, JPEG)
                  2 audio chunk  (client->server, PCM16 LE mono 16 kHz)
                  3 output frame (server->client, JPEG)
    5..7   reserved, zero
    8..11  frame id, uint32
    12..19 client timestamp, float64 milliseconds, echoed back unchanged
    20..   payload

A pipeline takes one input kind: camera frames (the mirror) or audio chunks (lip-sync);
the other kind is refused with ``unsupported_kind``.

Audio chunks (kind 2). The payload is signed 16-bit little-endian PCM, one channel, 16 kHz,
non-empty, an even number of bytes, at most ``ServerConfig.max_audio_chunk_bytes`` (32000
= 1 s by default). The frame id is the chunk's sequence number in the session (0, 1, 2,
...); the timestamp is the page clock (ms) at the chunk's first sample. The samples of a
session's accepted chunks, in order, make one stream numbered from 0; a refused chunk is
not part of it (its ``error`` carries ``chunk_id`` so the page can renumber). A session
may send at most ``max_audio_chunks_per_s`` chunks in any second, and at most
``audio_burst_s`` seconds of audio ahead of real time (a token bucket of that many
seconds, full at the session's first chunk, refilled at 1x real time), so a file must be
streamed at real-time pace. The page sends 20 ms chunks (320 samples, 640 bytes).

Output frames of a lip-sync pipeline (kind 3): frame id ``i`` is the session's video frame
index at 25 fps; it shows the audio samples ``[640 i, 640 (i + 1))`` of the session's
stream (``frame_samples``). Its timestamp is the page clock at sample ``640 i`` (the
capture timestamp of the chunk holding it, plus the sample's offset in that chunk), so
paint time minus it is the end-to-end latency. The server sends no audio back: the page
plays the slice of what it sent when it paints the frame. Its ``vision`` message carries
``{"frame_id", "lipsync": {"avatar", "generator", "speech", "loudness_db", "avatar_frame"}}``.

Text messages are JSON objects ``{"type": ..., "payload": {...}}``. From the page:
``config.update`` (a partial config), ``preset.apply`` (``{"name": str}``) and
``avatar.select`` (``{"id": str}``: this session's avatar; answered with ``config.current``
to this session only, or an ``unknown_avatar`` error). From the server: ``config.current``
(to every session on each change; for a lip-sync pipeline it also holds ``avatars``, the
ids a session may select, ``avatar``, the one this session shows, and ``registry``),
``vision``, ``stats``, ``error`` (``{"code", "message"}``, plus ``chunk_id`` when an
audio chunk was refused; ``rate_limited`` says how many messages were dropped unread) and
``status`` (``{"state", "message", "lost"}``: the job lost a rank and goes on
``degraded``, or is ``restarting`` or ``stopping`` because of it; sent to every session
when it happens and to a session that connects while the job is degraded).

Close codes the server uses: 1001 (going away: the job stopped), 1008 (a page that stopped
reading), 1009 (a message too big), 1011 (internal error), 1012 (service restart: the job
ended after losing a rank or failing; the reason says why and the page should reconnect),
1013 (too many sessions; try again later).

Every rule broken by a peer raises ``ProtocolError`` with a stable ``code`` the page can
act on and a ``message`` a person can read.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

from stages.jpeg_header import jpeg_size

MAGIC = b"MMF1"
HEADER = struct.Struct("<4sB3sId")
"""magic, kind, reserved, frame id, client timestamp; '<' so there is no padding."""
HEADER_SIZE = HEADER.size  # 20
RESERVED = b"\x00\x00\x00"
MAX_FRAME_ID = 0xFFFF_FFFF

AUDIO_SAMPLE_RATE = 16_000
"""Samples per second of every audio chunk (PCM16 LE, mono)."""
VIDEO_FPS = 25
SAMPLES_PER_VIDEO_FRAME = AUDIO_SAMPLE_RATE // VIDEO_FPS  # 640
"""Audio samples one output frame of a lip-sync pipeline covers."""
AVATAR_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
"""What an avatar id looks like (``fullmatch``); ids name folders, so nothing else is one."""


class Kind(IntEnum):
    CAMERA_FRAME = 1
    AUDIO_CHUNK = 2
    OUTPUT_FRAME = 3


class ErrorCode(StrEnum):
    """The ``code`` of an ``error`` message; the page may branch on these, so they are stable."""

    BAD_MAGIC = "bad_magic"
    BAD_KIND = "bad_kind"
    SHORT_HEADER = "short_header"
    RESERVED_BYTES = "reserved_bytes"
    BAD_TIMESTAMP = "bad_timestamp"
    UNSUPPORTED_KIND = "unsupported_kind"
    BAD_JPEG = "bad_jpeg"
    BAD_IMAGE_SIZE = "bad_image_size"
    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    BAD_PAYLOAD = "bad_payload"
    BAD_CONFIG = "bad_config"
    BAD_AUDIO = "bad_audio"
    AUDIO_TOO_LARGE = "audio_too_large"
    AUDIO_RATE = "audio_rate"
    UNKNOWN_AVATAR = "unknown_avatar"
    TOO_MANY_SESSIONS = "too_many_sessions"
    RATE_LIMITED = "rate_limited"
    """Messages were dropped unread for going over the session's message rate; sent now
    and then during a flood, not once per message."""
    INTERNAL = "internal"


class ProtocolError(ValueError):
    """A message from a peer that breaks the protocol; ``code`` is an ``ErrorCode``."""

    def __init__(self, code: ErrorCode, message: str, *, chunk_id: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.chunk_id = chunk_id
        """The audio chunk refused, when the message was one (its ``error`` names it)."""


@dataclass(kw_only=True, slots=True, frozen=True)
class BinaryFrame:
    kind: Kind
    frame_id: int
    """Chosen by the page, per session; echoed on the output frame made from it."""
    client_ts: float
    """Page clock in milliseconds at capture; echoed unchanged so the page can time the round trip."""
    payload: bytes


def encode_frame(frame: BinaryFrame) -> bytes:
    if not 0 <= frame.frame_id <= MAX_FRAME_ID:
        raise ValueError(f"frame_id must fit in uint32, got {frame.frame_id}")
    return HEADER.pack(MAGIC, int(frame.kind), RESERVED, frame.frame_id, frame.client_ts) + frame.payload


def decode_frame(data: bytes | bytearray | memoryview) -> BinaryFrame:
    """Parse one binary message; checks the header only, not what the payload holds."""
    if len(data) < HEADER_SIZE:
        raise ProtocolError(ErrorCode.SHORT_HEADER,
                            f"binary message has {len(data)} bytes; the header alone is {HEADER_SIZE}")
    magic, kind, reserved, frame_id, client_ts = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(ErrorCode.BAD_MAGIC, f"expected magic {MAGIC!r}, got {bytes(magic)!r}")
    if kind not in Kind._value2member_map_:
        raise ProtocolError(ErrorCode.BAD_KIND, f"unknown kind {kind}; known: 1 camera, 2 audio, 3 output")
    if reserved != RESERVED:
        raise ProtocolError(ErrorCode.RESERVED_BYTES, f"bytes 5..7 must be zero, got {reserved.hex()}")
    # NaN or infinite timestamps would poison every latency percentile downstream.
    if not math.isfinite(client_ts):
        raise ProtocolError(ErrorCode.BAD_TIMESTAMP, f"client timestamp must be finite, got {client_ts}")
    return BinaryFrame(kind=Kind(kind), frame_id=frame_id, client_ts=client_ts, payload=bytes(data[HEADER_SIZE:]))


def decode_camera_frame(data: bytes | bytearray | memoryview) -> BinaryFrame:
    """A binary message the page may send to a pipeline that takes camera frames (the mirror)."""
    frame = decode_frame(data)
    if frame.kind is Kind.AUDIO_CHUNK:
        raise ProtocolError(ErrorCode.UNSUPPORTED_KIND,
                            "this pipeline takes camera frames (kind 1); audio chunks (kind 2) "
                            "go to a lip-sync pipeline", chunk_id=frame.frame_id)
    if frame.kind is not Kind.CAMERA_FRAME:
        raise ProtocolError(ErrorCode.BAD_KIND, f"kind {int(frame.kind)} flows server->client only")
    return frame


def decode_audio_chunk(data: bytes | bytearray | memoryview, *, max_bytes: int) -> BinaryFrame:
    """A binary message the page may send to a pipeline that takes audio (lip-sync): a
    non-empty PCM16 chunk of at most ``max_bytes``. The sample values are not judged: any
    16-bit pattern is a sample."""
    frame = decode_frame(data)
    if frame.kind is Kind.CAMERA_FRAME:
        raise ProtocolError(ErrorCode.UNSUPPORTED_KIND,
                            "this pipeline takes audio chunks (kind 2, PCM16 mono 16 kHz); "
                            "camera frames (kind 1) go to the mirror")
    if frame.kind is not Kind.AUDIO_CHUNK:
        raise ProtocolError(ErrorCode.BAD_KIND, f"kind {int(frame.kind)} flows server->client only")
    try:
        check_audio_payload(frame.payload, max_bytes=max_bytes)
    except ProtocolError as e:
        e.chunk_id = frame.frame_id
        raise
    return frame


def check_audio_payload(pcm: bytes, *, max_bytes: int) -> None:
    """Raise ``bad_audio`` or ``audio_too_large`` for a payload that is not a usable chunk."""
    if not pcm:
        raise ProtocolError(ErrorCode.BAD_AUDIO, "audio chunk is empty; send at least one sample")
    if len(pcm) % 2:
        raise ProtocolError(ErrorCode.BAD_AUDIO,
                            f"audio chunk has {len(pcm)} bytes; PCM16 samples are 2 bytes each, so it must be even")
    if len(pcm) > max_bytes:
        raise ProtocolError(ErrorCode.AUDIO_TOO_LARGE,
                            f"audio chunk has {len(pcm)} bytes ({len(pcm) / 2 / AUDIO_SAMPLE_RATE:.3f} s); "
                            f"the limit is {max_bytes} bytes ({max_bytes / 2 / AUDIO_SAMPLE_RATE:.3f} s)")


def frame_samples(frame_id: int) -> tuple[int, int]:
    """``[start, end)`` sample numbers of the session's audio stream that lip-sync output
    frame ``frame_id`` shows (25 fps, 16 kHz: 640 samples a frame)."""
    if frame_id < 0:
        raise ValueError(f"frame_id must be >= 0, got {frame_id}")
    return frame_id * SAMPLES_PER_VIDEO_FRAME, (frame_id + 1) * SAMPLES_PER_VIDEO_FRAME


# --- JPEG probe -------------------------------------------------------------------------


def probe_jpeg(data: bytes | bytearray | memoryview, *, max_width: int, max_height: int,
               max_pixels: int) -> tuple[int, int]:
    """``(width, height)`` of a camera frame from its JPEG header, within the limits.

    It stops a decompression bomb (a tiny file declaring 60000x60000) before any
    decoder allocates for it.
    """
    try:
        width, height = jpeg_size(data)
    except ValueError as e:
        raise ProtocolError(ErrorCode.BAD_JPEG, str(e)) from None
    _check_size(width, height, max_width, max_height, max_pixels)
    return width, height


MIN_FRAME_SIDE = 16
"""Smaller frames hold no face and no portrait; refuse them here with a clear reason."""


def _check_size(width: int, height: int, max_width: int, max_height: int, max_pixels: int) -> None:
    if width < MIN_FRAME_SIDE or height < MIN_FRAME_SIDE:
        raise ProtocolError(ErrorCode.BAD_IMAGE_SIZE,
                            f"JPEG is {width}x{height}; camera frames must be at least "
                            f"{MIN_FRAME_SIDE}x{MIN_FRAME_SIDE}")
    if width > max_width or height > max_height or width * height > max_pixels:
        raise ProtocolError(ErrorCode.BAD_IMAGE_SIZE,
                            f"JPEG is {width}x{height}; the limit is {max_width}x{max_height} "
                            f"and {max_pixels} pixels")


# --- Text messages ----------------------------------------------------------------------

CONFIG_UPDATE = "config.update"
PRESET_APPLY = "preset.apply"
AVATAR_SELECT = "avatar.select"
CLIENT_TYPES = (CONFIG_UPDATE, PRESET_APPLY, AVATAR_SELECT)

CONFIG_CURRENT = "config.current"
VISION = "vision"
STATS = "stats"
ERROR = "error"
STATUS = "status"
SERVER_TYPES = (CONFIG_CURRENT, VISION, STATS, ERROR, STATUS)


class JobState(StrEnum):
    """The ``state`` of a ``status`` message: what a lost rank means for the job."""

    DEGRADED = "degraded"
    """It goes on without the rank: other replicas, or a stage's fallback, serve its frames."""
    RESTARTING = "restarting"
    """It ends now and torchrun will restart it: the page should reconnect."""
    STOPPING = "stopping"
    """It ends now and nothing restarts it."""


CLOSE_REASON_BYTES = 123
"""A close frame's reason is at most 123 bytes of UTF-8 (RFC 6455, 5.5.1)."""


@dataclass(kw_only=True, slots=True, frozen=True)
class TextMessage:
    type: str
    payload: dict[str, Any]


def decode_client_message(text: str | bytes) -> TextMessage:
    """Parse and check the envelope and payload shape of a message from the page."""
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(ErrorCode.BAD_JSON, f"text message is not valid JSON: {e}") from None
    except RecursionError:  # e.g. '[' * 100000: valid-looking, too deep to parse
        raise ProtocolError(ErrorCode.BAD_JSON, "text message nests too deeply") from None
    if not isinstance(value, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE,
                            f'expected an object {{"type", "payload"}}, got {type(value).__name__}')
    extra = sorted(set(value) - {"type", "payload"})
    if extra:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"unknown key {extra[0]!r}; allowed: 'payload', 'type'")
    kind = value.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"'type' must be a string, got {kind!r}")
    if kind not in CLIENT_TYPES:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE,
                            f"unknown message type {kind!r}; allowed: {', '.join(CLIENT_TYPES)}")
    payload = value.get("payload")
    if not isinstance(payload, dict):
        raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"'payload' of {kind} must be an object, got {payload!r}")
    if kind == PRESET_APPLY:
        _one_string(kind, payload, "name")
    elif kind == AVATAR_SELECT:
        _one_string(kind, payload, "id")
    return TextMessage(type=kind, payload=payload)


def _one_string(kind: str, payload: dict[str, Any], key: str) -> None:
    """A payload that is exactly ``{key: str}``."""
    extra = sorted(set(payload) - {key})
    if extra:
        raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"unknown key {extra[0]!r} in {kind}; allowed: {key!r}")
    if not isinstance(payload.get(key), str):
        raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"{kind} needs a string {key!r}, got {_short(payload.get(key))}")


def check_avatar_id(avatar: str) -> str:
    """``avatar`` if it has the shape of an avatar id, else ``unknown_avatar`` (no avatar can
    have another name, so the pipeline need not be asked)."""
    if not AVATAR_ID.fullmatch(avatar):
        raise ProtocolError(ErrorCode.UNKNOWN_AVATAR,
                            f"no avatar is called {_short(avatar)}: avatar ids match {AVATAR_ID.pattern}")
    return avatar


def _short(value: Any, limit: int = 70) -> str:
    """``repr`` of a peer's value, cut so an error never echoes a megabyte back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def encode_message(kind: str, payload: dict[str, Any]) -> str:
    """One text message. Compact, and valid JSON for a browser: NaN and infinities become null
    (``JSON.parse`` rejects them) and numpy scalars or arrays become plain numbers and lists."""
    return json.dumps({"type": kind, "payload": json_safe(payload)}, separators=(",", ":"), allow_nan=False)


def error_message(code: ErrorCode | str, message: str, *, chunk_id: int | None = None) -> str:
    """An ``error``; ``chunk_id`` names the audio chunk it refused, so the page can drop
    that chunk's samples from its copy of the stream."""
    payload: dict[str, Any] = {"code": str(code), "message": message}
    if chunk_id is not None:
        payload["chunk_id"] = chunk_id
    return encode_message(ERROR, payload)


def describe_exception(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an exception, cut to ``limit`` characters, for an ``internal`` error."""
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def status_message(state: JobState | str, message: str, lost: list[dict[str, Any]]) -> str:
    """A ``status``: the job's ``state`` (a ``JobState``), ``message`` for a person, and every
    rank lost so far as ``{"rank", "role", "cause"}`` (cause 'died', 'stalled' or 'failed')."""
    state = JobState(state)  # ValueError for a state the page would not know
    return encode_message(STATUS, {"state": str(state), "message": message,
                                   "lost": [{"rank": int(e["rank"]), "role": str(e["role"]), "cause": str(e["cause"])}
                                            for e in lost]})


def close_reason(text: str) -> str:
    """``text`` cut to what a close frame can carry (``CLOSE_REASON_BYTES`` of UTF-8, whole
    characters, an ellipsis where cut)."""
    data = text.encode()
    if len(data) <= CLOSE_REASON_BYTES:
        return text
    return data[:CLOSE_REASON_BYTES - 3].decode(errors="ignore") + "..."


def vision_message(frame_id: int, vision: dict[str, Any]) -> str:
    """The ``vision`` message for one output frame; ``frame_id`` names the frame it describes."""
    return encode_message(VISION, {**vision, "frame_id": frame_id})


def json_safe(value: Any) -> Any:
    """``value`` with only what strict JSON holds: non-finite floats as None, numpy as lists."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return json_safe(value.tolist())
    return str(value)
