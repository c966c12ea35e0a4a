"""Wire protocol v1, byte for byte: golden encodings, round trips and every refusal."""

from __future__ import annotations

import json
import struct

import pytest
from mm_client import FIXTURE_JPEG, sof_only_jpeg

from stages.server.protocol import (
    CLOSE_REASON_BYTES,
    HEADER_SIZE,
    SAMPLES_PER_VIDEO_FRAME,
    BinaryFrame,
    ErrorCode,
    JobState,
    Kind,
    ProtocolError,
    check_avatar_id,
    close_reason,
    decode_audio_chunk,
    decode_camera_frame,
    decode_client_message,
    decode_frame,
    encode_frame,
    encode_message,
    error_message,
    frame_samples,
    probe_jpeg,
    status_message,
    vision_message,
)

# kind 1, frame id 0x01020304, client_ts 1.5 ms, payload FF D8
GOLDEN_CAMERA = bytes.fromhex("4d4d4631" "01" "000000" "04030201" "000000000000f83f" "ffd8")
# kind 2, chunk 5, client_ts 1.5 ms, payload the PCM16 LE samples 1, -2
GOLDEN_AUDIO = bytes.fromhex("4d4d4631" "02" "000000" "05000000" "000000000000f83f" "0100" "feff")
# kind 3, frame id 7, client_ts 1700000000123.25 ms (an epoch-ms timestamp), payload "jpeg"
GOLDEN_OUTPUT = bytes.fromhex("4d4d4631" "03" "000000" "07000000" "00b48756febc7842") + b"jpeg"

LIMITS = {"max_width": 3840, "max_height": 3840, "max_pixels": 3840 * 2160}


def test_header_is_20_bytes():
    assert HEADER_SIZE == 20


@pytest.mark.parametrize("frame, golden", [
    (BinaryFrame(kind=Kind.CAMERA_FRAME, frame_id=0x01020304, client_ts=1.5, payload=b"\xff\xd8"), GOLDEN_CAMERA),
    (BinaryFrame(kind=Kind.OUTPUT_FRAME, frame_id=7, client_ts=1700000000123.25, payload=b"jpeg"), GOLDEN_OUTPUT),
    (BinaryFrame(kind=Kind.AUDIO_CHUNK, frame_id=5, client_ts=1.5, payload=struct.pack("<2h", 1, -2)), GOLDEN_AUDIO),
])
def test_binary_frame_golden_bytes_round_trip(frame, golden):
    assert encode_frame(frame) == golden
    assert decode_frame(golden) == frame
    assert encode_frame(decode_frame(golden)) == golden


def test_timestamp_is_echoed_bit_exact():
    ts = 1732345678901.123456  # not representable in fewer than 64 bits
    data = encode_frame(BinaryFrame(kind=Kind.CAMERA_FRAME, frame_id=1, client_ts=ts, payload=b""))
    assert data[12:20] == struct.pack("<d", ts)
    echoed = decode_frame(data)
    out = encode_frame(BinaryFrame(kind=Kind.OUTPUT_FRAME, frame_id=echoed.frame_id,
                                   client_ts=echoed.client_ts, payload=b""))
    assert out[8:20] == data[8:20]


def test_frame_id_limits():
    top = BinaryFrame(kind=Kind.CAMERA_FRAME, frame_id=0xFFFFFFFF, client_ts=0.0, payload=b"")
    assert decode_frame(encode_frame(top)).frame_id == 0xFFFFFFFF
    with pytest.raises(ValueError):
        encode_frame(BinaryFrame(kind=Kind.CAMERA_FRAME, frame_id=1 << 32, client_ts=0.0, payload=b""))


def test_decode_accepts_memoryview_and_copies_payload():
    buffer = bytearray(GOLDEN_CAMERA)
    frame = decode_frame(memoryview(buffer))
    buffer[-1] = 0
    assert frame.payload == b"\xff\xd8"


@pytest.mark.parametrize("data, code", [
    (b"", ErrorCode.SHORT_HEADER),
    (GOLDEN_CAMERA[:19], ErrorCode.SHORT_HEADER),
    (b"MMF2" + GOLDEN_CAMERA[4:], ErrorCode.BAD_MAGIC),
    (b"\x89PNG" + GOLDEN_CAMERA[4:], ErrorCode.BAD_MAGIC),
    (GOLDEN_CAMERA[:4] + b"\x00" + GOLDEN_CAMERA[5:], ErrorCode.BAD_KIND),
    (GOLDEN_CAMERA[:4] + b"\x07" + GOLDEN_CAMERA[5:], ErrorCode.BAD_KIND),
    (GOLDEN_CAMERA[:6] + b"\x01" + GOLDEN_CAMERA[7:], ErrorCode.RESERVED_BYTES),
    (GOLDEN_CAMERA[:12] + struct.pack("<d", float("nan")) + b"", ErrorCode.BAD_TIMESTAMP),
    (GOLDEN_CAMERA[:12] + struct.pack("<d", float("-inf")) + b"", ErrorCode.BAD_TIMESTAMP),
])
def test_decode_frame_refusals(data, code):
    with pytest.raises(ProtocolError) as info:
        decode_frame(data)
    assert info.value.code == code
    assert info.value.message


def test_camera_direction_only():
    assert decode_camera_frame(GOLDEN_CAMERA).kind is Kind.CAMERA_FRAME
    audio = GOLDEN_CAMERA[:4] + b"\x02" + GOLDEN_CAMERA[5:]
    with pytest.raises(ProtocolError) as info:
        decode_camera_frame(audio)
    assert info.value.code == ErrorCode.UNSUPPORTED_KIND
    with pytest.raises(ProtocolError) as info:
        decode_camera_frame(GOLDEN_OUTPUT)
    assert info.value.code == ErrorCode.BAD_KIND


def test_camera_frame_refusal_of_audio_names_the_chunk():
    with pytest.raises(ProtocolError) as info:
        decode_camera_frame(GOLDEN_AUDIO)
    assert (info.value.code, info.value.chunk_id) == (ErrorCode.UNSUPPORTED_KIND, 5)
    assert "camera frames (kind 1)" in info.value.message


# --- audio chunks ---

def test_audio_chunk_decodes():
    chunk = decode_audio_chunk(GOLDEN_AUDIO, max_bytes=32000)
    assert (chunk.kind, chunk.frame_id, chunk.client_ts) == (Kind.AUDIO_CHUNK, 5, 1.5)
    assert struct.unpack("<2h", chunk.payload) == (1, -2)


def audio(payload: bytes, chunk_id: int = 9) -> bytes:
    return encode_frame(BinaryFrame(kind=Kind.AUDIO_CHUNK, frame_id=chunk_id, client_ts=0.0, payload=payload))


def test_audio_chunk_size_limit_is_inclusive():
    assert len(decode_audio_chunk(audio(bytes(32000)), max_bytes=32000).payload) == 32000
    assert len(decode_audio_chunk(audio(bytes(2)), max_bytes=32000).payload) == 2


@pytest.mark.parametrize("data, code, chunk_id", [
    (audio(b""), ErrorCode.BAD_AUDIO, 9),
    (audio(b"\x01"), ErrorCode.BAD_AUDIO, 9),
    (audio(bytes(641)), ErrorCode.BAD_AUDIO, 9),
    (audio(bytes(32002)), ErrorCode.AUDIO_TOO_LARGE, 9),
    (audio(bytes(32001)), ErrorCode.BAD_AUDIO, 9),       # odd is the first thing wrong
    (GOLDEN_CAMERA, ErrorCode.UNSUPPORTED_KIND, None),   # a camera frame to a pipeline that takes audio
    (GOLDEN_OUTPUT, ErrorCode.BAD_KIND, None),
    (GOLDEN_AUDIO[:19], ErrorCode.SHORT_HEADER, None),
    (b"MMF2" + GOLDEN_AUDIO[4:], ErrorCode.BAD_MAGIC, None),
])
def test_audio_chunk_refusals(data, code, chunk_id):
    with pytest.raises(ProtocolError) as info:
        decode_audio_chunk(data, max_bytes=32000)
    assert (info.value.code, info.value.chunk_id) == (code, chunk_id)
    assert info.value.message


def test_audio_refusal_messages_say_what_is_allowed():
    with pytest.raises(ProtocolError) as info:
        decode_audio_chunk(audio(bytes(32002)), max_bytes=32000)
    assert info.value.message == "audio chunk has 32002 bytes (1.000 s); the limit is 32000 bytes (1.000 s)"
    with pytest.raises(ProtocolError) as info:
        decode_audio_chunk(audio(b"\x01\x02\x03"), max_bytes=32000)
    assert "must be even" in info.value.message
    with pytest.raises(ProtocolError) as info:
        decode_audio_chunk(GOLDEN_CAMERA, max_bytes=32000)
    assert "takes audio chunks (kind 2" in info.value.message


def test_output_frame_covers_640_samples():
    assert SAMPLES_PER_VIDEO_FRAME == 640
    assert [frame_samples(i) for i in (0, 1, 25)] == [(0, 640), (640, 1280), (16000, 16640)]
    with pytest.raises(ValueError):
        frame_samples(-1)


# --- JPEG probe ---

def test_probe_reads_fixture_size():
    assert probe_jpeg(FIXTURE_JPEG, **LIMITS) == (640, 480)


def test_probe_reads_crafted_header_and_skips_segments_and_fill_bytes():
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + bytes(9)
    dqt_with_fill = b"\xff\xff\xff\xdb" + struct.pack(">H", 4) + b"\x00\x01"
    jpeg = b"\xff\xd8" + app0 + dqt_with_fill + sof_only_jpeg(321, 123)[2:]
    assert probe_jpeg(jpeg, **LIMITS) == (321, 123)


def test_probe_reads_progressive_sof2():
    jpeg = sof_only_jpeg(100, 50).replace(b"\xff\xc0", b"\xff\xc2", 1)
    assert probe_jpeg(jpeg, **LIMITS) == (100, 50)


@pytest.mark.parametrize("data, code", [
    (b"", ErrorCode.BAD_JPEG),
    (b"hello world, not a jpeg", ErrorCode.BAD_JPEG),
    (b"\x89PNG\r\n\x1a\n" + bytes(32), ErrorCode.BAD_JPEG),
    (b"\xff\xd8\xff\xd9", ErrorCode.BAD_JPEG),                        # EOI before SOF
    (b"\xff\xd8\xff\xda\x00\x08" + bytes(6), ErrorCode.BAD_JPEG),     # scan before SOF
    (b"\xff\xd8\xff\xe0\x00", ErrorCode.BAD_JPEG),                    # truncated length
    (b"\xff\xd8\xff\xe0\x00\x01", ErrorCode.BAD_JPEG),                # length < 2
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", ErrorCode.BAD_JPEG),            # segment runs off the end
    (b"\xff\xd8\x00\x00", ErrorCode.BAD_JPEG),                        # no marker
    (sof_only_jpeg(640, 480)[:10], ErrorCode.BAD_JPEG),               # SOF truncated
    (sof_only_jpeg(0, 480), ErrorCode.BAD_IMAGE_SIZE),
    (sof_only_jpeg(640, 0), ErrorCode.BAD_IMAGE_SIZE),
    (sof_only_jpeg(1, 1), ErrorCode.BAD_IMAGE_SIZE),                  # no room for a face or a portrait
    (sof_only_jpeg(60000, 60000), ErrorCode.BAD_IMAGE_SIZE),
    (sof_only_jpeg(3841, 100), ErrorCode.BAD_IMAGE_SIZE),
    (sof_only_jpeg(3840, 3840), ErrorCode.BAD_IMAGE_SIZE),            # within each side, too many pixels
])
def test_probe_refusals(data, code):
    with pytest.raises(ProtocolError) as info:
        probe_jpeg(data, **LIMITS)
    assert info.value.code == code


# --- text messages ---

def test_server_message_golden_text():
    assert error_message(ErrorCode.BAD_MAGIC, "x") == '{"type":"error","payload":{"code":"bad_magic","message":"x"}}'
    assert vision_message(5, {"faces": [], "frame_id": 99}) == '{"type":"vision","payload":{"faces":[],"frame_id":5}}'


GOLDEN_STATUS = ('{"type":"status","payload":{"state":"degraded","message":"rank 3 (generator) died; its '
                 '\'generator\' frames go to rank 2","lost":[{"rank":3,"role":"generator","cause":"died"}]}}')


def test_status_golden_text_round_trip():
    lost = [{"rank": 3, "role": "generator", "cause": "died"}]
    text = status_message(JobState.DEGRADED, "rank 3 (generator) died; its 'generator' frames go to rank 2", lost)
    assert text == GOLDEN_STATUS
    payload = json.loads(GOLDEN_STATUS)["payload"]
    assert status_message(payload["state"], payload["message"], payload["lost"]) == GOLDEN_STATUS
    assert {s.value for s in JobState} == {"degraded", "restarting", "stopping"}


def test_status_keeps_only_the_documented_keys_and_states():
    lost = [{"rank": 2, "role": "generator", "cause": "stalled", "secret": "x"}]
    assert status_message("stopping", "m", lost) == (
        '{"type":"status","payload":{"state":"stopping","message":"m",'
        '"lost":[{"rank":2,"role":"generator","cause":"stalled"}]}}')
    with pytest.raises(ValueError):
        status_message("ok-ish", "m", [])


def test_a_close_reason_fits_a_close_frame_in_whole_characters():
    assert close_reason("short") == "short"
    exact = "x" * CLOSE_REASON_BYTES
    assert close_reason(exact) == exact
    cut = close_reason("é" * 100)  # 200 bytes of UTF-8
    assert len(cut.encode()) <= CLOSE_REASON_BYTES and cut.endswith("...") and cut[:-3] == "é" * 60


def test_error_naming_a_chunk_golden_text():
    assert error_message(ErrorCode.AUDIO_RATE, "slow down", chunk_id=17) == \
        '{"type":"error","payload":{"code":"audio_rate","message":"slow down","chunk_id":17}}'
    assert error_message("bad_audio", "x", chunk_id=None) == '{"type":"error","payload":{"code":"bad_audio","message":"x"}}'


def test_error_codes_are_stable():
    assert {c.value for c in ErrorCode} >= {"bad_audio", "audio_too_large", "audio_rate", "unknown_avatar",
                                             "unsupported_kind"}


def test_encode_message_is_strict_json():
    class Scalar:  # stands in for a numpy scalar
        def tolist(self):
            return 2.5

    text = encode_message("stats", {"a": float("nan"), "b": [float("inf"), 1], "c": Scalar(), "d": (1, 2), 3: True})
    assert text == '{"type":"stats","payload":{"a":null,"b":[null,1],"c":2.5,"d":[1,2],"3":true}}'
    assert json.loads(text)["payload"]["a"] is None


@pytest.mark.parametrize("text, kind, payload", [
    ('{"type":"config.update","payload":{"strength":0.5}}', "config.update", {"strength": 0.5}),
    ('{"type":"config.update","payload":{}}', "config.update", {}),
    ('{"payload":{"name":"calm"},"type":"preset.apply"}', "preset.apply", {"name": "calm"}),
    (b'{"type":"preset.apply","payload":{"name":"party"}}', "preset.apply", {"name": "party"}),
    ('{"type":"avatar.select","payload":{"id":"astronaut"}}', "avatar.select", {"id": "astronaut"}),
    ('{"type":"avatar.select","payload":{"id":"No Such Avatar!"}}', "avatar.select", {"id": "No Such Avatar!"}),
])
def test_decode_client_message(text, kind, payload):
    message = decode_client_message(text)
    assert (message.type, message.payload) == (kind, payload)


@pytest.mark.parametrize("text, code", [
    ("{", ErrorCode.BAD_JSON),
    ("", ErrorCode.BAD_JSON),
    (b"\xff\xfe", ErrorCode.BAD_JSON),
    ("[" * 100000, ErrorCode.BAD_JSON),
    ("[1, 2]", ErrorCode.BAD_MESSAGE),
    ('"config.update"', ErrorCode.BAD_MESSAGE),
    ('{"payload":{}}', ErrorCode.BAD_MESSAGE),
    ('{"type":5,"payload":{}}', ErrorCode.BAD_MESSAGE),
    ('{"type":"config.update","payload":{},"extra":1}', ErrorCode.BAD_MESSAGE),
    ('{"type":"vision","payload":{}}', ErrorCode.UNKNOWN_TYPE),
    ('{"type":"hello","payload":{}}', ErrorCode.UNKNOWN_TYPE),
    ('{"type":"config.update"}', ErrorCode.BAD_PAYLOAD),
    ('{"type":"config.update","payload":[1]}', ErrorCode.BAD_PAYLOAD),
    ('{"type":"preset.apply","payload":{}}', ErrorCode.BAD_PAYLOAD),
    ('{"type":"preset.apply","payload":{"name":3}}', ErrorCode.BAD_PAYLOAD),
    ('{"type":"preset.apply","payload":{"name":"calm","x":1}}', ErrorCode.BAD_PAYLOAD),
    ('{"type":"avatar.select","payload":{}}', ErrorCode.BAD_PAYLOAD),
    ('{"type":"avatar.select","payload":{"id":7}}', ErrorCode.BAD_PAYLOAD),
    ('{"type":"avatar.select","payload":{"id":null}}', ErrorCode.BAD_PAYLOAD),
    ('{"type":"avatar.select","payload":{"id":"a","name":"b"}}', ErrorCode.BAD_PAYLOAD),
    ('{"type":"avatar.select","payload":"astronaut"}', ErrorCode.BAD_PAYLOAD),
    ('{"type":"avatar.select"}', ErrorCode.BAD_PAYLOAD),
])
def test_decode_client_message_refusals(text, code):
    with pytest.raises(ProtocolError) as info:
        decode_client_message(text)
    assert info.value.code == code


def test_avatar_select_payload_errors_name_the_key():
    with pytest.raises(ProtocolError) as info:
        decode_client_message('{"type":"avatar.select","payload":{"id":"a","name":"b"}}')
    assert info.value.message == "unknown key 'name' in avatar.select; allowed: 'id'"
    with pytest.raises(ProtocolError) as info:
        decode_client_message('{"type":"avatar.select","payload":{"id":["x"]}}')
    assert info.value.message == "avatar.select needs a string 'id', got ['x']"


@pytest.mark.parametrize("avatar", ["astronaut", "a", "0", "robot_2-b", "a" * 64])
def test_avatar_ids_that_may_exist(avatar):
    assert check_avatar_id(avatar) == avatar


@pytest.mark.parametrize("avatar", ["", "Astronaut", "-a", "_a", "a" * 65, "../etc", "a/b", "a.b", "a b", "ä"])
def test_avatar_ids_that_cannot_exist(avatar):
    with pytest.raises(ProtocolError) as info:
        check_avatar_id(avatar)
    assert info.value.code == ErrorCode.UNKNOWN_AVATAR
    assert "[a-z0-9][a-z0-9_-]{0,63}" in info.value.message
    assert len(info.value.message) < 200  # a long id is cut, never echoed whole
