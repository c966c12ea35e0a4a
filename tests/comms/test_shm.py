"""Shared-memory payload segments within one process: what one end writes the other
reads, segments grow, names are checked, and nothing is left in /dev/shm."""

from __future__ import annotations

import os

import pytest
import torch

from comms import shm
from comms.errors import HeaderError
from comms.shm import Segment, SegmentReader, SegmentWriter


def _ours() -> set[str]:
    return {n for n in os.listdir(shm.SHM_DIR) if n.startswith("mindmirror-")}


@pytest.fixture
def pair():
    before = _ours()
    writer, reader = SegmentWriter("gen#0->display#0", chunks=2), SegmentReader()
    yield writer, reader
    writer.close()
    reader.close()
    assert _ours() == before


def test_a_payload_written_into_a_chunk_is_read_back_as_a_private_copy(pair):
    writer, reader = pair
    segment, new = writer.reserve(1000)
    assert new and segment.chunk_bytes == 2**20 and segment.chunks == 2
    payload = torch.arange(1000, dtype=torch.int64).to(torch.uint8)
    writer.write(1, payload)
    reader.open(segment)
    assert not os.path.exists(os.path.join(shm.SHM_DIR, segment.name))  # unlinked once mapped
    got = reader.take(1, 1000)
    writer.write(1, torch.zeros(1000, dtype=torch.uint8))  # the chunk is reused...
    assert torch.equal(got, payload)  # ...but the message owns its bytes


def test_a_larger_payload_gets_a_new_larger_segment_and_smaller_ones_reuse_it(pair):
    writer, reader = pair
    first, _ = writer.reserve(10)
    assert writer.reserve(2**20) == (first, False)
    second, new = writer.reserve(2**20 + 1)
    assert new and second.name != first.name and second.chunk_bytes == 2 * 2**20
    writer.write(0, torch.full((2**20 + 1,), 7, dtype=torch.uint8))
    reader.open(second)
    assert reader.take(0, 2**20 + 1).eq(7).all()
    assert writer.reserve(5) == (second, False)


def test_payloads_beyond_the_largest_chunk_are_refused_so_they_go_over_gloo(pair):
    writer, _ = pair
    assert writer.reserve(shm.MAX_CHUNK_BYTES + 1) is None
    assert writer.off_reason is None  # only that payload; the link keeps shared memory


def test_a_segment_that_cannot_be_created_turns_shared_memory_off(monkeypatch, tmp_path):
    monkeypatch.setattr(shm, "SHM_DIR", str(tmp_path / "missing"))
    writer = SegmentWriter("x", chunks=2)
    assert writer.reserve(10) is None
    assert "cannot create" in writer.off_reason
    assert writer.reserve(10) is None


@pytest.mark.parametrize("name", ["../etc/passwd", "other-prefix", "mindmirror-a/b", ""])
def test_the_reader_opens_only_names_of_our_own_form(name):
    with pytest.raises(HeaderError, match="not one of ours"):
        SegmentReader().open(Segment(name=name, chunk_bytes=2**20, chunks=2))


def test_the_reader_rejects_chunks_and_sizes_outside_the_announced_segment(pair):
    writer, reader = pair
    segment, _ = writer.reserve(100)
    reader.open(segment)
    with pytest.raises(HeaderError, match="does not fit"):
        reader.take(2, 10)
    with pytest.raises(HeaderError, match="does not fit"):
        reader.take(0, segment.chunk_bytes + 1)
    with pytest.raises(HeaderError, match="no segment"):
        SegmentReader().take(0, 1)


def test_an_announced_segment_smaller_than_claimed_is_rejected(pair):
    writer, reader = pair
    segment, _ = writer.reserve(100)
    claimed = Segment(name=segment.name, chunk_bytes=segment.chunk_bytes, chunks=segment.chunks + 5)
    with pytest.raises(HeaderError, match="announced"):
        reader.open(claimed)
