"""Reading a JPEG's dimensions from its frame header, without decoding a pixel.

Used twice on purpose: the web server refuses absurd sizes before a frame enters the
pipeline (a tiny file may declare 60000x60000 and make a decoder allocate gigabytes),
and the ingest stage chooses a reduced-size decode for very wide frames.
"""

from __future__ import annotations

# Start-of-frame markers carry the image size. C4 (DHT), C8 (JPG) and CC (DAC) share the
# range but are not frames.
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0..7, SOI.
STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8), 0xD8})
MAX_SEGMENTS = 64
"""Camera and canvas JPEGs reach their frame header within ~10 segments (EXIF and ICC
included). The bound keeps a crafted file of a million empty segments from holding the
web server's event loop for hundreds of milliseconds."""
MAX_FILL = 32
"""Fill bytes allowed before one marker (the standard allows any number; encoders use few)."""


def jpeg_size(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """``(width, height)`` from the first SOF marker; ``ValueError`` saying what is wrong.

    Walks the marker segments after SOI up to the first SOF: a few dozen bytes for a
    camera frame, cheap enough for an event loop.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise ValueError("payload is not a JPEG (no SOI marker)")
    i = 2
    for _ in range(MAX_SEGMENTS):
        if i >= n:
            raise ValueError("JPEG ends before its frame header (SOF)")
        if data[i] != 0xFF:
            raise ValueError(f"expected a JPEG marker at byte {i}")
        fill_start = i
        while i < n and data[i] == 0xFF:
            i += 1
            if i - fill_start > MAX_FILL:
                raise ValueError(f"more than {MAX_FILL} fill bytes before a JPEG marker at byte {fill_start}")
        if i >= n:
            raise ValueError("JPEG ends inside a marker")
        marker = data[i]
        i += 1
        if marker in STANDALONE_MARKERS:
            continue
        if marker == 0x00 or marker in (0xD9, 0xDA):
            raise ValueError(f"JPEG marker 0x{marker:02X} before its frame header (SOF)")
        if i + 2 > n:
            raise ValueError("JPEG ends inside a segment length")
        length = (data[i] << 8) | data[i + 1]
        if length < 2:
            raise ValueError(f"JPEG segment 0x{marker:02X} has length {length}")
        if marker in SOF_MARKERS:
            # length(2) precision(1) height(2) width(2), all big-endian
            if length < 8 or i + 7 > n:
                raise ValueError("JPEG frame header (SOF) is truncated")
            height = (data[i + 3] << 8) | data[i + 4]
            width = (data[i + 5] << 8) | data[i + 6]
            return width, height
        i += length
    raise ValueError(f"no frame header (SOF) in the first {MAX_SEGMENTS} JPEG segments")
