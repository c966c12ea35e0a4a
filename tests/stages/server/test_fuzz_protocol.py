"""Property tests of the wire protocol's pure functions (``hypothesis``): whatever bytes or
JSON a peer sends, each decoder returns a value or raises ``ProtocolError``, never another
exception, and what it accepts round-trips byte for byte."""

from __future__ import annotations

import json
import math
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stages.server.protocol import (
    HEADER,
    MAGIC,
    BinaryFrame,
    ErrorCode,
    Kind,
    ProtocolError,
    check_avatar_id,
    decode_audio_chunk,
    decode_camera_frame,
    decode_client_message,
    decode_frame,
    encode_frame,
    encode_message,
    probe_jpeg,
)

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
LIMITS = {"max_width": 3840, "max_height": 3840, "max_pixels": 3840 * 2160}
CODES = set(ErrorCode)


def refused_or(fn, *args, **kwargs):
    """``fn``'s value, or the ``ProtocolError`` it raised (with a known code and a message)."""
    try:
        return fn(*args, **kwargs)
    except ProtocolError as e:
        assert e.code in CODES and e.message
        return e


# Bytes that reach past the first checks: a real header, mostly with valid fields, so
# the later checks (kind, reserved bytes, timestamp, payload) are reached too.
headers = st.builds(lambda kind, reserved, frame_id, ts, payload: HEADER.pack(MAGIC, kind, reserved, frame_id, ts)
                    + payload,
                    st.sampled_from([1, 2, 3]) | st.integers(0, 255),
                    st.just(b"\0\0\0") | st.sampled_from([b"\0\0\1", b"\xff\xff\xff"]),
                    st.integers(0, 2**32 - 1), st.floats(allow_nan=False, allow_infinity=False) | st.floats(),
                    st.binary(max_size=64))
jpeg_like = st.builds(lambda body: b"\xff\xd8" + body, st.binary(max_size=96)) | st.builds(
    lambda segments: b"\xff\xd8" + b"".join(segments),
    st.lists(st.builds(lambda marker, length, body: bytes([0xFF, marker]) + struct.pack(">H", length) + body,
                       st.integers(0, 255), st.integers(0, 40), st.binary(max_size=12)), max_size=8))
sof_jpegs = st.builds(  # a frame header declaring any size, after a few other segments
    lambda segments, sof, width, height: b"\xff\xd8" + b"".join(segments) + bytes([0xFF, sof])
    + struct.pack(">HBHHB", 17, 8, height, width, 3) + bytes(9),
    st.lists(st.builds(lambda marker, body: bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body,
                       st.sampled_from([0xE0, 0xE1, 0xDB, 0xC4, 0xFE]), st.binary(max_size=20)), max_size=3),
    st.sampled_from([0xC0, 0xC2]), st.integers(0, 65535), st.integers(0, 65535))
jpeg_like = jpeg_like | sof_jpegs
binary_messages = st.binary(max_size=128) | headers | st.builds(
    lambda header, jpeg: header[:20] + jpeg, headers, jpeg_like) | st.builds(
    lambda frame_id, jpeg: HEADER.pack(MAGIC, 1, b"\0\0\0", frame_id, 0.0) + jpeg, st.integers(0, 9), jpeg_like)


@FUZZ
@given(binary_messages)
def test_binary_decoders_refuse_with_protocol_errors_only(data):
    frame = refused_or(decode_frame, data)
    if isinstance(frame, BinaryFrame):
        assert encode_frame(frame) == bytes(data)  # what is accepted is exactly what was sent
        assert math.isfinite(frame.client_ts)
    camera = refused_or(decode_camera_frame, data)
    if isinstance(camera, BinaryFrame):
        assert camera.kind is Kind.CAMERA_FRAME
        size = refused_or(probe_jpeg, camera.payload, **LIMITS)
        event(f"camera frame: {size.code if isinstance(size, ProtocolError) else 'accepted'}")
    else:
        event(f"refused: {camera.code}")
    audio = refused_or(decode_audio_chunk, data, max_bytes=640)
    if isinstance(audio, BinaryFrame):
        assert audio.kind is Kind.AUDIO_CHUNK and 0 < len(audio.payload) <= 640 and len(audio.payload) % 2 == 0
    for view in (bytearray(data), memoryview(data)):
        assert type(refused_or(decode_frame, view)) is type(frame)


@FUZZ
@given(jpeg_like)
def test_jpeg_probe_reads_a_size_within_the_limits_or_refuses(data):
    size = refused_or(probe_jpeg, data, **LIMITS)
    if isinstance(size, ProtocolError):
        assert size.code in (ErrorCode.BAD_JPEG, ErrorCode.BAD_IMAGE_SIZE)
    else:
        width, height = size
        assert 16 <= width <= 3840 and 16 <= height <= 3840 and width * height <= 3840 * 2160


@FUZZ
@given(st.sampled_from(list(Kind)), st.integers(0, 2**32 - 1), st.floats(allow_nan=False, allow_infinity=False),
       st.binary(max_size=64))
def test_every_valid_frame_round_trips(kind, frame_id, ts, payload):
    frame = BinaryFrame(kind=kind, frame_id=frame_id, client_ts=ts, payload=payload)
    data = encode_frame(frame)
    decoded = decode_frame(data)
    assert decoded == frame or (math.isnan(ts) and math.isnan(decoded.client_ts))
    assert struct.pack("<d", decoded.client_ts) == struct.pack("<d", ts)  # bit for bit, -0.0 included


# JSON-ish values: what json.loads can produce, nested, plus the shapes the protocol knows.
scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
names = st.text(max_size=70) | st.from_regex(r"[a-z0-9][a-z0-9_-]{0,63}", fullmatch=True) | json_values
envelopes = st.fixed_dictionaries(
    {"type": st.one_of(*[st.sampled_from(["config.update", "preset.apply", "avatar.select"])] * 4,
                       st.text(max_size=12), json_values),
     "payload": st.fixed_dictionaries({"name": names}) | st.fixed_dictionaries({"id": names})
     | st.dictionaries(st.sampled_from(["style", "strength", "name", "id"]) | st.text(max_size=8), json_values,
                       max_size=3) | json_values})


def check_message(value) -> None:
    text = json.dumps(value)  # NaN and infinities go out as the bare words Python writes
    message = refused_or(decode_client_message, text)
    event(f"refused: {message.code}" if isinstance(message, ProtocolError) else f"accepted: {message.type}")
    if not isinstance(message, ProtocolError):
        assert message.type in ("config.update", "preset.apply", "avatar.select")
        assert isinstance(message.payload, dict)
        if message.type == "avatar.select":
            refused_or(check_avatar_id, message.payload["id"])


@FUZZ
@given(json_values)
def test_any_json_value_is_a_message_or_a_protocol_error(value):
    check_message(value)


@FUZZ
@given(envelopes)
def test_any_envelope_is_a_message_or_a_protocol_error(value):
    check_message(value)


@FUZZ
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_any_text_or_bytes_is_a_message_or_a_protocol_error(text):
    refused_or(decode_client_message, text)


@settings(max_examples=20, deadline=None, database=None)
@given(st.integers(1, 200_000))
def test_deep_nesting_is_refused_not_a_crash(depth):
    refused_or(decode_client_message, "[" * depth + "]" * depth)
    deep = '{"a":' * depth + "1" + "}" * depth
    refused_or(decode_client_message, '{"type": "config.update", "payload": ' + deep + "}")


@FUZZ
@given(json_values)
def test_server_messages_are_strict_json_whatever_a_stage_hands_over(value):
    text = encode_message("vision", {"x": value})
    decoded = json.loads(text, parse_constant=lambda word: pytest.fail(f"{word} is not JSON"))
    assert decoded["type"] == "vision"


def test_a_frame_refused_at_each_header_field_names_it():
    good = encode_frame(BinaryFrame(kind=Kind.CAMERA_FRAME, frame_id=1, client_ts=0.0, payload=b""))
    for data, code in [(good[:19], ErrorCode.SHORT_HEADER), (b"XXXX" + good[4:], ErrorCode.BAD_MAGIC),
                       (good[:4] + b"\x07" + good[5:], ErrorCode.BAD_KIND),
                       (good[:5] + b"\x01" + good[6:], ErrorCode.RESERVED_BYTES),
                       (good[:12] + struct.pack("<d", math.inf), ErrorCode.BAD_TIMESTAMP)]:
        assert refused_or(decode_frame, data).code is code
