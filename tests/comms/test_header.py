"""Header bytes and tensor packing: exact round trips, a golden encoding, and rejects."""

from __future__ import annotations

import struct

import pytest
import torch

from comms.errors import HeaderError
from comms.header import (ALIGN, DTYPE_CODES, TensorSpec, decode_header, encode_header, layout,
                          pack_tensors, unpack_tensors)
from comms.message import Kind, Message

ALL_DTYPES = list(DTYPE_CODES)


def golden_message() -> Message:
    return Message(kind=Kind.DATA, session="ab", frame_id=7, revision=3, capture_ts=1.5,
                   trace=[("g", 2.0)], meta={"k": [1]},
                   tensors=[torch.zeros(2, 3, dtype=torch.uint8), torch.zeros((), dtype=torch.float32)])


# Field by field: prefix (magic, version 2, kind 1, reserved, frame 7, revision 3, ts 1.5,
# 2 tensors, 1 trace entry, session 2 B, meta 9 B, payload 68 B); uint8 [2, 3] of 6 B at 0;
# float32 0-d of 4 B at 64; "ab"; trace "g" at 2.0; {"k":[1]}.
GOLDEN = bytes.fromhex(
    "4d4d4831" "02" "01" "0000" "0700000000000000" "03000000" "000000000000f83f"
    "0200" "0100" "02000000" "09000000" "4400000000000000"
    "01" "02" "0200000000000000" "0300000000000000" "0600000000000000" "0000000000000000"
    "08" "00" "0400000000000000" "4000000000000000"
    "6162"
    "0100" "67" "0000000000000040"
    "7b226b223a5b315d7d")


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel() * dtype.itemsize
    raw = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
    if dtype == torch.bool:
        raw &= 1  # any other byte is not a valid bool and copies would normalise it
    return raw.view(dtype).reshape(shape)


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_golden_encoding_is_byte_exact():
    assert encode_header(golden_message()) == GOLDEN


def test_golden_decodes_to_the_message_and_specs():
    msg, specs = decode_header(GOLDEN)
    expected = golden_message()
    assert (msg.kind, msg.session, msg.frame_id, msg.revision, msg.capture_ts, msg.trace, msg.meta) == (
        expected.kind, expected.session, expected.frame_id, expected.revision, expected.capture_ts,
        expected.trace, expected.meta)
    assert msg.tensors == []
    assert specs == [TensorSpec(dtype=torch.uint8, shape=(2, 3), nbytes=6, offset=0),
                     TensorSpec(dtype=torch.float32, shape=(), nbytes=4, offset=64)]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (3, 0, 2), (7,), (3, 5, 7), (2, 1, 1, 1, 3)], ids=str)
def test_every_dtype_and_shape_round_trips_exactly(dtype, shape):
    tensors = [random_tensor(dtype, shape, 1), random_tensor(torch.uint8, (5,), 2), random_tensor(dtype, shape, 3)]
    msg = Message(kind=Kind.DATA, session="séance ✓", frame_id=2**64 - 1, revision=2**32 - 1,
                  capture_ts=-0.0, trace=[("a", 1.25), ("ü", 1e9)], meta={"x": [1.5, None, "ö"]},
                  tensors=tensors)
    header = encode_header(msg)
    decoded, specs = decode_header(header)
    assert encode_header(decoded, specs) == header
    flat, packed_specs = pack_tensors(tensors)
    assert packed_specs == specs and all(s.offset % ALIGN == 0 for s in specs)
    out = unpack_tensors(flat, specs)
    for a, b in zip(tensors, out):
        assert a.dtype == b.dtype and a.shape == b.shape and as_bytes(a) == as_bytes(b)


def test_non_contiguous_tensors_are_packed_in_logical_order():
    base = torch.arange(24, dtype=torch.int16).reshape(4, 6)
    tensors = [base.t(), base[:, ::2], base[1]]
    flat, specs = pack_tensors(tensors)
    for a, b in zip(tensors, unpack_tensors(flat, specs)):
        assert torch.equal(a, b)


def test_single_contiguous_tensor_is_packed_without_copy():
    t = torch.arange(10, dtype=torch.float32)
    flat, _ = pack_tensors([t])
    assert flat.data_ptr() == t.data_ptr() and flat.numel() == 40


def test_unpacked_views_share_the_buffer():
    flat, specs = pack_tensors([torch.ones(3), torch.ones(2, dtype=torch.int64)])
    views = unpack_tensors(flat, specs)
    assert views[1].data_ptr() == flat.data_ptr() + specs[1].offset


def test_layout_of_nothing_is_empty():
    assert layout([]) == ([], 0)
    flat, specs = pack_tensors([])
    assert flat.numel() == 0 and specs == [] and unpack_tensors(flat, specs) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pack_and_unpack_on_cuda():
    tensors = [random_tensor(torch.float16, (3, 4), 1).cuda(), random_tensor(torch.uint8, (5,), 2)]
    flat, specs = pack_tensors(tensors, "cuda")
    assert flat.is_cuda
    out = unpack_tensors(flat, specs)
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(tensors, out))


# ------------------------------------------------------------------ rejects

def _patched(offset: int, fmt: str, value) -> bytes:
    data = bytearray(GOLDEN)
    struct.pack_into(fmt, data, offset, value)
    return bytes(data)


PREFIX = 4 + 1 + 1 + 2 + 8 + 4 + 8 + 2 + 2 + 4 + 4 + 8  # 48 bytes

MALFORMED = {
    "empty": b"",
    "bad magic": b"XXXX" + GOLDEN[4:],
    "bad version": _patched(4, "<B", 9),
    "unknown kind": _patched(5, "<B", 99),
    "truncated prefix": GOLDEN[:20],
    "truncated tensors": GOLDEN[:PREFIX + 10],
    "truncated meta": GOLDEN[:-1],
    "trailing bytes": GOLDEN + b"\0",
    "unknown dtype": _patched(PREFIX, "<B", 77),
    "nbytes disagrees with shape": _patched(PREFIX + 2 + 16, "<Q", 5),
    "misaligned offset": _patched(PREFIX + 2 + 16 + 8 + 2 + 8, "<Q", 65),
    "payload too small": _patched(40, "<Q", 60),
    "payload too large": _patched(40, "<Q", 200),
    "meta length too long": _patched(36, "<I", 10),
    "session length too long": _patched(32, "<I", 1000),
    "invalid JSON": GOLDEN[:-9] + b'{"k":[1}}',
    "JSON not an object": GOLDEN[:-9] + b"[1,2,3,4]",
    "invalid utf-8 session": GOLDEN[:PREFIX + 52] + b"\xff\xfe" + GOLDEN[PREFIX + 54:],
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_headers_raise_header_error(name):
    with pytest.raises(HeaderError):
        decode_header(MALFORMED[name])


def test_every_truncation_is_rejected():
    for n in range(len(GOLDEN)):
        with pytest.raises(HeaderError):
            decode_header(GOLDEN[:n])


@pytest.mark.parametrize("bad, match", [
    (dict(meta={"x": object()}), "meta"),
    (dict(meta=[1]), "meta"),
    (dict(frame_id=-1), "frame_id"),
    (dict(revision=2**32), "revision"),
    (dict(session=b"raw"), "session"),
    (dict(trace=[("a",)]), "trace"),
    (dict(capture_ts="now"), "capture_ts"),
    (dict(kind=99), "kind"),
    (dict(tensors=[torch.zeros(2, dtype=torch.complex64)]), "dtype"),
    (dict(tensors=[[1, 2]]), "tensors"),
])
def test_unencodable_messages_raise_header_error(bad, match):
    fields = dict(kind=Kind.DATA) | bad
    with pytest.raises(HeaderError, match=match):
        encode_header(Message(**fields))


def test_unpack_rejects_a_short_buffer():
    specs, _ = layout([torch.zeros(100)])
    with pytest.raises(HeaderError):
        unpack_tensors(torch.zeros(10, dtype=torch.uint8), specs)
