"""Wire protocol v1 between the page and rank 0, as pure code: bytes and text in, values out.

Nothing here touches a socket, a clock or a thread, so every rule of the protocol can be
tested byte for byte (the sans-I/O split the ``websockets`` library itself uses).

Binary messages, both directions, little-endian, 20-byte header then payload::

    0..3   magic  b"MMF1"
    4      kind   1 camera frame (client->server, JPEG)
                  2 audio chunk (PCM16 mono 16 kHz, reserved for lip-sync)
                  3 output frame (server->client, JPEG)
    5..7   reserved, zero
    8..11  frame id, uint32
    12..19 client timestamp, float64 milliseconds, echoed back unchanged
    20..   payload

Text messages are JSON objects ``{"type": ..., "payload": {...}}``.

Every rule broken by a peer raises ``ProtocolError`` with a stable ``code`` the page can
act on and a ``message`` a person can read.
"""

from __future__ import annotations

import json
import math
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
    TOO_MANY_SESSIONS = "too_many_sessions"
    INTERNAL = "internal"


class ProtocolError(ValueError):
    """A message from a peer that breaks the protocol; ``code`` is an ``ErrorCode``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


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
    """A binary message the page may send to the mirror pipeline: camera frames only."""
    frame = decode_frame(data)
    if frame.kind is Kind.AUDIO_CHUNK:
        raise ProtocolError(ErrorCode.UNSUPPORTED_KIND,
                            "audio chunks (kind 2) are reserved for lip-sync; this pipeline takes camera frames")
    if frame.kind is not Kind.CAMERA_FRAME:
        raise ProtocolError(ErrorCode.BAD_KIND, f"kind {int(frame.kind)} flows server->client only")
    return frame


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
CLIENT_TYPES = (CONFIG_UPDATE, PRESET_APPLY)

CONFIG_CURRENT = "config.current"
VISION = "vision"
STATS = "stats"
ERROR = "error"
SERVER_TYPES = (CONFIG_CURRENT, VISION, STATS, ERROR)


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
        extra = sorted(set(payload) - {"name"})
        if extra:
            raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"unknown key {extra[0]!r} in preset.apply; allowed: 'name'")
        if not isinstance(payload.get("name"), str):
            raise ProtocolError(ErrorCode.BAD_PAYLOAD,
                                f"preset.apply needs a string 'name', got {payload.get('name')!r}")
    return TextMessage(type=kind, payload=payload)


def encode_message(kind: str, payload: dict[str, Any]) -> str:
    """One text message. Compact, and valid JSON for a browser: NaN and infinities become null
    (``JSON.parse`` rejects them) and numpy scalars or arrays become plain numbers and lists."""
    return json.dumps({"type": kind, "payload": json_safe(payload)}, separators=(",", ":"), allow_nan=False)


def error_message(code: ErrorCode | str, message: str) -> str:
    return encode_message(ERROR, {"code": str(code), "message": message})


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
