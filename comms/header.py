"""The byte format of a message header, and the packed layout of its tensors.

Pure functions, no I/O: ``encode_header`` turns a ``Message`` into bytes and
``decode_header`` turns them back into a ``Message`` without tensors plus one
``TensorSpec`` per tensor. The tensors themselves travel separately as one flat uint8
buffer (``pack_tensors`` / ``unpack_tensors``) whose layout the specs describe.

Layout, all little-endian::

    prefix      magic b"MMH1", version u8, kind u8, reserved u16, frame_id u64,
                revision u32, capture_ts f64, n_tensors u16, n_trace u16,
                session_len u32, meta_len u32, payload_bytes u64
    tensors     n_tensors x (dtype u8, ndim u8, shape ndim x i64, nbytes u64, offset u64)
    session     session_len bytes of utf-8
    trace       n_trace x (name_len u16, name utf-8, unix time f64)
    meta        meta_len bytes of compact JSON, utf-8

Tensor offsets are 64-byte aligned inside the packed payload so every view taken from
the receive buffer is aligned for any dtype (and for vectorised kernels).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import torch

from comms.errors import HeaderError
from comms.message import Kind, Message

MAGIC = b"MMH1"
VERSION = 2
"""2: transport-only kinds (data, control, status, event); capture_ts where version 1 had the
browser's client_ts."""
ALIGN = 64
MAX_NDIM = 64

_PREFIX = struct.Struct("<4sBBHQIdHHIIQ")
_U8U8 = struct.Struct("<BB")
_U64U64 = struct.Struct("<QQ")
_U16 = struct.Struct("<H")
_F64 = struct.Struct("<d")
_SHAPES = [struct.Struct(f"<{n}q") for n in range(MAX_NDIM + 1)]
_EMPTY_META = b"{}"

# Codes are part of the wire format: append only, never renumber.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.uint8: 1,
    torch.int8: 2,
    torch.int16: 3,
    torch.int32: 4,
    torch.int64: 5,
    torch.float16: 6,
    torch.bfloat16: 7,
    torch.float32: 8,
    torch.float64: 9,
    torch.bool: 10,
}
_DTYPES_BY_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}
_KINDS = {int(k) for k in Kind}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Where one tensor lies in the packed payload, and what it is."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int


def align_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def layout(tensors: list[torch.Tensor]) -> tuple[list[TensorSpec], int]:
    """Specs for ``tensors`` packed back to back at aligned offsets, and the total size."""
    specs, offset = [], 0
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise HeaderError(f"tensors[{i}]: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in DTYPE_CODES:
            raise HeaderError(f"tensors[{i}]: unsupported dtype {t.dtype}; "
                              f"allowed: {', '.join(str(d) for d in DTYPE_CODES)}")
        if t.dim() > MAX_NDIM:
            raise HeaderError(f"tensors[{i}]: {t.dim()} dimensions, at most {MAX_NDIM} supported")
        nbytes = t.numel() * t.element_size()
        offset = align_up(offset)
        specs.append(TensorSpec(dtype=t.dtype, shape=tuple(t.shape), nbytes=nbytes, offset=offset))
        offset += nbytes
    return specs, offset


def encode_header(msg: Message, specs: list[TensorSpec] | None = None) -> bytes:
    """The header bytes of ``msg``; ``specs`` defaults to ``layout(msg.tensors)``."""
    if specs is None:
        specs, payload_bytes = layout(msg.tensors)
    else:
        payload_bytes = max((s.offset + s.nbytes for s in specs), default=0)
    if not isinstance(msg.kind, Kind):
        try:
            kind = Kind(msg.kind)
        except ValueError:
            raise HeaderError(f"kind: {msg.kind!r} is not a Kind") from None
    else:
        kind = msg.kind
    _check_range(msg.frame_id, 0, 2**64 - 1, "frame_id")
    _check_range(msg.revision, 0, 2**32 - 1, "revision")
    if not isinstance(msg.capture_ts, (int, float)) or isinstance(msg.capture_ts, bool):
        raise HeaderError(f"capture_ts: expected a number, got {msg.capture_ts!r}")
    if not isinstance(msg.session, str):
        raise HeaderError(f"session: expected a string, got {type(msg.session).__name__}")
    session = msg.session.encode("utf-8")
    if not isinstance(msg.meta, dict):
        raise HeaderError(f"meta: expected a dict, got {type(msg.meta).__name__}")
    try:
        meta = json.dumps(msg.meta, separators=(",", ":"), ensure_ascii=False).encode("utf-8") if msg.meta else _EMPTY_META
    except (TypeError, ValueError) as e:
        raise HeaderError(f"meta: not JSON-serialisable: {e}") from None
    if len(specs) > 0xFFFF or len(msg.trace) > 0xFFFF:
        raise HeaderError(f"at most 65535 tensors and trace entries, got {len(specs)} and {len(msg.trace)}")

    parts = [_PREFIX.pack(MAGIC, VERSION, int(kind), 0, msg.frame_id, msg.revision, float(msg.capture_ts),
                          len(specs), len(msg.trace), len(session), len(meta), payload_bytes)]
    for s in specs:
        parts.append(_U8U8.pack(DTYPE_CODES[s.dtype], len(s.shape)))
        parts.append(_SHAPES[len(s.shape)].pack(*s.shape))
        parts.append(_U64U64.pack(s.nbytes, s.offset))
    parts.append(session)
    for i, entry in enumerate(msg.trace):
        try:
            name, at = entry
            name_b = name.encode("utf-8")
            at = float(at)
        except (TypeError, ValueError, AttributeError):
            raise HeaderError(f"trace[{i}]: expected (name, unix_time), got {entry!r}") from None
        if len(name_b) > 0xFFFF:
            raise HeaderError(f"trace[{i}]: name longer than 65535 bytes")
        parts.append(_U16.pack(len(name_b)))
        parts.append(name_b)
        parts.append(_F64.pack(at))
    parts.append(meta)
    return b"".join(parts)


def encode_for_send(link: str, msg: Message) -> tuple[list[TensorSpec], int, bytes]:
    """What a cross-rank ``send`` needs of ``msg``: its tensor layout, payload size and
    encoded header. Checks everything first, so a malformed message fails before the
    send takes a credit (``TypeError`` for a non-message, ``HeaderError`` otherwise)."""
    if not isinstance(msg, Message):
        raise TypeError(f"link {link!r}: send expects a Message, got {type(msg).__name__}")
    specs, total = layout(msg.tensors)
    return specs, total, encode_header(msg, specs)


def decode_header(data: bytes | bytearray | memoryview) -> tuple[Message, list[TensorSpec]]:
    """The message (without tensors) and tensor specs in ``data``; ``HeaderError`` if malformed."""
    buf = memoryview(data).cast("B")
    if len(buf) < _PREFIX.size:
        raise HeaderError(f"truncated: {len(buf)} bytes, the fixed prefix alone is {_PREFIX.size}")
    (magic, version, kind, _reserved, frame_id, revision, capture_ts,
     n_tensors, n_trace, session_len, meta_len, payload_bytes) = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise HeaderError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise HeaderError(f"unsupported header version {version}, this build reads {VERSION}")
    if kind not in _KINDS:
        raise HeaderError(f"unknown kind {kind}")
    pos = _PREFIX.size

    specs, end_of_previous = [], 0
    for i in range(n_tensors):
        code, ndim = _unpack(_U8U8, buf, pos, f"tensors[{i}]")
        pos += _U8U8.size
        if code not in _DTYPES_BY_CODE:
            raise HeaderError(f"tensors[{i}]: unknown dtype code {code}")
        if ndim > MAX_NDIM:
            raise HeaderError(f"tensors[{i}]: ndim {ndim} exceeds {MAX_NDIM}")
        shape_struct = _SHAPES[ndim]
        shape = _unpack(shape_struct, buf, pos, f"tensors[{i}].shape")
        pos += shape_struct.size
        nbytes, offset = _unpack(_U64U64, buf, pos, f"tensors[{i}]")
        pos += _U64U64.size
        dtype = _DTYPES_BY_CODE[code]
        if any(d < 0 for d in shape):
            raise HeaderError(f"tensors[{i}]: negative dimension in shape {shape}")
        expected = math.prod(shape) * dtype.itemsize
        if nbytes != expected:
            raise HeaderError(f"tensors[{i}]: nbytes {nbytes} but shape {shape} of {dtype} needs {expected}")
        if offset % ALIGN or offset < end_of_previous or offset + nbytes > payload_bytes:
            raise HeaderError(f"tensors[{i}]: offset {offset} (+{nbytes} bytes) does not fit the payload "
                              f"of {payload_bytes} bytes after the previous tensor ending at {end_of_previous}")
        end_of_previous = offset + nbytes
        specs.append(TensorSpec(dtype=dtype, shape=tuple(shape), nbytes=nbytes, offset=offset))
    if end_of_previous != payload_bytes:
        raise HeaderError(f"payload_bytes {payload_bytes} but the tensors end at {end_of_previous}")

    session = _utf8(_take(buf, pos, session_len, "session"), "session")
    pos += session_len
    trace = []
    for i in range(n_trace):
        (name_len,) = _unpack(_U16, buf, pos, f"trace[{i}]")
        pos += _U16.size
        name = _utf8(_take(buf, pos, name_len, f"trace[{i}].name"), f"trace[{i}].name")
        pos += name_len
        (at,) = _unpack(_F64, buf, pos, f"trace[{i}].time")
        pos += _F64.size
        trace.append((name, at))
    meta_raw = _utf8(_take(buf, pos, meta_len, "meta"), "meta")
    pos += meta_len
    if pos != len(buf):
        raise HeaderError(f"{len(buf) - pos} trailing bytes after the header's {pos}")
    try:
        meta = {} if meta_raw == "{}" else json.loads(meta_raw)
    except ValueError as e:
        raise HeaderError(f"meta: invalid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise HeaderError(f"meta: expected a JSON object, got {type(meta).__name__}")
    msg = Message(kind=Kind(kind), session=session, frame_id=frame_id, revision=revision,
                  capture_ts=capture_ts, trace=trace, meta=meta)
    return msg, specs


def pack_tensors(tensors: list[torch.Tensor], device: torch.device | str | None = None,
                 specs: list[TensorSpec] | None = None) -> tuple[torch.Tensor, list[TensorSpec]]:
    """One flat uint8 buffer holding ``tensors`` at aligned offsets, on ``device``.

    ``device`` defaults to the first tensor's device (CPU when there are none). A single
    contiguous tensor already on ``device`` is returned as a byte view, without a copy,
    so the sender must not modify it until the send completes (the channel contract, comms.channel).
    ``specs``: the ``layout(tensors)`` the caller already computed for the header.
    """
    if specs is None:
        specs, _ = layout(tensors)
    total = specs[-1].offset + specs[-1].nbytes if specs else 0
    if device is None:
        device = tensors[0].device if tensors else torch.device("cpu")
    device = torch.device(device)
    if len(tensors) == 1 and tensors[0].device == device and tensors[0].is_contiguous():
        return _as_bytes(tensors[0]), specs
    flat = torch.empty(total, dtype=torch.uint8, device=device)
    for t, s in zip(tensors, specs):
        if s.nbytes:
            # Copying into a typed view of the region handles strides and the device
            # move in one pass, with no intermediate contiguous copy.
            flat[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape).copy_(t)
    return flat, specs


def unpack_tensors(flat: torch.Tensor, specs: list[TensorSpec]) -> list[torch.Tensor]:
    """Views into ``flat`` (uint8, 1-D, any device) for each spec; no copies."""
    if flat.dtype != torch.uint8 or flat.dim() != 1:
        raise HeaderError(f"packed payload must be a 1-D uint8 tensor, got {flat.dtype} with {flat.dim()} dims")
    out = []
    for i, s in enumerate(specs):
        if s.offset + s.nbytes > flat.numel():
            raise HeaderError(f"tensors[{i}]: bytes {s.offset}..{s.offset + s.nbytes} lie beyond "
                              f"the {flat.numel()}-byte payload")
        region = flat[s.offset:s.offset + s.nbytes]
        out.append(region.view(s.dtype).reshape(s.shape))
    return out


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    # Only for contiguous tensors; a 0-d tensor becomes one element.
    return t.reshape(-1).view(torch.uint8)


def _check_range(value: object, low: int, high: int, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise HeaderError(f"{name}: expected an integer within {low}..{high}, got {value!r}")


def _unpack(st: struct.Struct, buf: memoryview, pos: int, what: str) -> tuple:
    if pos + st.size > len(buf):
        raise HeaderError(f"truncated in {what}: needs {pos + st.size} bytes, have {len(buf)}")
    return st.unpack_from(buf, pos)


def _take(buf: memoryview, pos: int, n: int, what: str) -> memoryview:
    if pos + n > len(buf):
        raise HeaderError(f"truncated in {what}: needs {pos + n} bytes, have {len(buf)}")
    return buf[pos:pos + n]


def _utf8(raw: memoryview, what: str) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderError(f"{what}: invalid utf-8: {e}") from None
