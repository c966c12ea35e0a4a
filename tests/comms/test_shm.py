"""Shared-memory payload segments within one process: what one end writes the other
reads through the descriptor it was handed, segments grow, and bad announcements fail."""

from __future__ import annotations

import os

import pytest
import torch

from comms import shm
from comms.errors import HeaderError
from comms.shm import Segment, SegmentReader, SegmentWriter


@pytest.fixture
def pair():
    writer, reader = SegmentWriter("gen#0->display#0", chunks=2), SegmentReader()
    yield writer, reader
    writer.close()
    reader.close()


def hand_over(writer: SegmentWriter, reader: SegmentReader, segment: Segment) -> None:
    """What the link does: the descriptor travels with a frame; here it is duplicated."""
    reader.open(os.dup(writer.fd), segment)
    writer.announced()


def test_a_payload_written_into_a_chunk_is_read_back_as_a_private_copy(pair):
    writer, reader = pair
    segment, new = writer.reserve(1000)
    assert new and segment == Segment(chunk_bytes=2**20, chunks=2)
    payload = torch.arange(1000, dtype=torch.int64).to(torch.uint8)
    writer.write(1, payload)
    hand_over(writer, reader, segment)
    assert writer.fd is None  # announced: the writer no longer holds it
    got = reader.take(1, 1000)
    writer.write(1, torch.zeros(1000, dtype=torch.uint8))  # the chunk is reused...
    assert torch.equal(got, payload)  # ...but the message owns its bytes


def test_a_larger_payload_gets_a_new_larger_segment_and_smaller_ones_reuse_it(pair):
    writer, reader = pair
    first, _ = writer.reserve(10)
    writer.announced()
    assert writer.reserve(2**20) == (first, False)
    second, new = writer.reserve(2**20 + 1)
    assert new and second.chunk_bytes == 2 * 2**20
    writer.write(0, torch.full((2**20 + 1,), 7, dtype=torch.uint8))
    hand_over(writer, reader, second)
    assert reader.take(0, 2**20 + 1).eq(7).all()
    assert writer.reserve(5) == (second, False)


def test_payloads_beyond_the_largest_chunk_are_refused_so_they_go_in_the_socket(pair):
    writer, _ = pair
    assert writer.reserve(shm.MAX_CHUNK_BYTES + 1) is None
    assert writer.off_reason is None  # only that payload; the link keeps shared memory


def test_a_segment_that_cannot_be_created_turns_shared_memory_off(monkeypatch):
    def no_memory(name, size):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shm, "create_file", no_memory)
    writer = SegmentWriter("x", chunks=2)
    assert writer.reserve(10) is None
    assert "cannot create" in writer.off_reason and "No space" in writer.off_reason
    assert writer.reserve(10) is None


def test_the_reader_rejects_chunks_and_sizes_outside_the_announced_segment(pair):
    writer, reader = pair
    segment, _ = writer.reserve(100)
    hand_over(writer, reader, segment)
    with pytest.raises(HeaderError, match="does not fit"):
        reader.take(2, 10)
    with pytest.raises(HeaderError, match="does not fit"):
        reader.take(0, segment.chunk_bytes + 1)
    with pytest.raises(HeaderError, match="no segment"):
        SegmentReader().take(0, 1)


def test_a_segment_smaller_than_announced_is_rejected_and_its_descriptor_closed(pair):
    writer, reader = pair
    segment, _ = writer.reserve(100)
    fd = os.dup(writer.fd)
    with pytest.raises(HeaderError, match="announced"):
        reader.open(fd, Segment(chunk_bytes=segment.chunk_bytes, chunks=segment.chunks + 5))
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by open(), even on failure
