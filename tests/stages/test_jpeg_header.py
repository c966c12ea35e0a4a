"""The JPEG frame-header reader: sizes, malformed headers, and bounded work."""

import struct
from pathlib import Path

import pytest

from stages.jpeg_header import MAX_SEGMENTS, jpeg_size

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "astronaut_640x480.jpg"


def sof(width: int, height: int) -> bytes:
    return b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + bytes.fromhex("011100021101031101")


def test_reads_the_size_of_a_real_jpeg_and_of_a_bare_header():
    assert jpeg_size(FIXTURE.read_bytes()) == (640, 480)
    assert jpeg_size(b"\xff\xd8" + b"\xff\xfe\x00\x04ab" + sof(60000, 7)) == (60000, 7)


@pytest.mark.parametrize("data, match", [
    (b"not a jpeg", "no SOI marker"),
    (b"\xff\xd8\xff\xff", "ends inside a marker"),
    (b"\xff\xd8\xff\xda\x00\x08", "marker 0xDA before its frame header"),
    (b"\xff\xd8\xff\xc0\x00\x05\x08", "frame header .SOF. is truncated"),
    (b"\xff\xd8\xff\xe0\x00\x01", "segment 0xE0 has length 1"),
    (b"\xff\xd8" + b"\xff" * 100 + b"\xc0", "more than 32 fill bytes"),
])
def test_malformed_headers_say_what_is_wrong(data, match):
    with pytest.raises(ValueError, match=match):
        jpeg_size(data)


def test_a_flood_of_empty_segments_is_refused_without_walking_it():
    # 4 MB of empty comments before a valid frame header: an unbounded walk would find the
    # header (after ~1M iterations on the event loop); the bound stops at segment 65.
    bomb = b"\xff\xd8" + b"\xff\xfe\x00\x02" * 1_000_000 + sof(640, 480)
    with pytest.raises(ValueError, match=f"first {MAX_SEGMENTS} JPEG segments"):
        jpeg_size(bomb)
