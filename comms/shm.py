"""Payloads through shared memory between two processes on one host.

Over gloo, a payload between two processes on the same machine still crosses the
loopback TCP stack: copied into the kernel, then out again, by gloo's I/O threads,
with a rendezvous per message. Through shared memory it costs two plain memory copies
(sender in, receiver out), which on the development machine run at ~45 GB/s against
gloo's ~2.5 GB/s.

One link's sender owns its segments: anonymous memory files (``memfd_create``) of
``chunks`` equal chunks, one per message that may be in flight (the link's credits), so
the chunk of message ``n`` is ``n % chunks`` and is free again once the credit for
message ``n`` returned: the receiver copies a payload out before it hands the message
over, and the credit goes back only then. A payload larger than the chunks gets a new,
larger segment. Its file descriptor travels to the receiver with the frame that first
uses it (``SCM_RIGHTS`` on the link's Unix socket), so segments have no name: nothing is
ever left in /dev/shm, and the kernel frees a segment once both processes have dropped
it, however they end. A segment that cannot be created (no ``memfd_create``, or not
enough memory: ``posix_fallocate`` reports that instead of a SIGBUS on first touch)
turns shared memory off for the link, whose payloads then travel in the socket itself.
"""

from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass

import torch

from comms.errors import HeaderError

log = logging.getLogger(__name__)

MAX_CHUNK_BYTES = 64 * 2**20
"""Payloads beyond this travel in the socket (a segment is chunks x this at most)."""
_CHUNK_STEP = 2**20


@dataclass(frozen=True, slots=True)
class Segment:
    chunk_bytes: int
    chunks: int

    @property
    def nbytes(self) -> int:
        return self.chunk_bytes * self.chunks


def create_file(name: str, size: int) -> int:
    """A file descriptor of ``size`` bytes of shared memory, all of them reserved now."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError:
        os.close(fd)
        raise
    return fd


class SegmentWriter:
    """The sending end: puts payloads into chunks of its current segment."""

    def __init__(self, link: str, chunks: int) -> None:
        self._link = link
        self._chunks = chunks
        self.segment: Segment | None = None
        self.fd: int | None = None
        """The current segment's descriptor until ``announced``: it must reach the receiver."""
        self._map: mmap.mmap | None = None
        self._bytes: torch.Tensor | None = None
        """The mapping as one uint8 tensor, made once: ``torch.frombuffer`` per write would
        cost more than copying a small payload."""
        self.off_reason: str | None = None
        """Why this link stopped using shared memory (None while it uses it)."""

    def reserve(self, nbytes: int) -> tuple[Segment, bool] | None:
        """The segment a payload of ``nbytes`` goes into and whether it is new (its first
        frame must carry ``fd``); None when shared memory cannot take it."""
        if self.off_reason is not None or nbytes > MAX_CHUNK_BYTES:
            return None
        if self.segment is not None and nbytes <= self.segment.chunk_bytes:
            return self.segment, False
        segment = Segment(chunk_bytes=-(-nbytes // _CHUNK_STEP) * _CHUNK_STEP, chunks=self._chunks)
        try:
            fd = create_file(f"mindmirror {self._link}", segment.nbytes)
            new_map = mmap.mmap(fd, segment.nbytes)
        except (OSError, AttributeError) as e:  # AttributeError: no memfd_create on this platform
            self.off_reason = f"cannot create {segment.nbytes} bytes of shared memory: {e}"
            log.warning("link %s: payloads go in the socket: %s", self._link, self.off_reason)
            return None
        self.close()  # the receiver keeps its own mapping of the old one while it needs it
        self.segment, self.fd, self._map = segment, fd, new_map
        self._bytes = torch.frombuffer(new_map, dtype=torch.uint8)
        return segment, True

    def announced(self) -> None:
        """The receiver has the descriptor now (it went out with a frame)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def write(self, chunk: int, flat: torch.Tensor) -> None:
        """Copy ``flat`` (uint8, on the CPU) into ``chunk`` of the current segment."""
        start = chunk * self.segment.chunk_bytes
        self._bytes[start:start + flat.numel()].copy_(flat)

    def close(self) -> None:
        self.announced()
        self._bytes = None  # exports the mapping's buffer: it must go before the mapping
        if self._map is not None:
            self._map.close()
            self._map = None
        self.segment = None


class SegmentReader:
    """The receiving end: copies payloads out of the sender's current segment."""

    def __init__(self) -> None:
        self.segment: Segment | None = None
        self._map: mmap.mmap | None = None
        self._bytes: torch.Tensor | None = None

    def open(self, fd: int, segment: Segment) -> None:
        """Map the segment behind ``fd`` (which this takes over and closes)."""
        try:
            if segment.chunk_bytes <= 0 or segment.chunks <= 0:
                raise HeaderError(f"shared-memory segment {segment} has no room")
            size = os.fstat(fd).st_size
            if size < segment.nbytes:
                raise HeaderError(f"shared-memory segment has {size} bytes, announced "
                                  f"{segment.chunks} x {segment.chunk_bytes}")
            new_map = mmap.mmap(fd, segment.nbytes)
        finally:
            os.close(fd)
        self.close()
        self._map, self.segment = new_map, segment
        self._bytes = torch.frombuffer(new_map, dtype=torch.uint8)

    def take(self, chunk: int, nbytes: int) -> torch.Tensor:
        """A private copy of the ``nbytes`` payload in ``chunk``."""
        if self.segment is None:
            raise HeaderError("payload in shared memory, but no segment was announced")
        if not 0 <= chunk < self.segment.chunks or nbytes > self.segment.chunk_bytes:
            raise HeaderError(f"shared-memory payload of {nbytes} bytes in chunk {chunk} does not fit "
                              f"{self.segment.chunks} x {self.segment.chunk_bytes}")
        start = chunk * self.segment.chunk_bytes
        return self._bytes[start:start + nbytes].clone()

    def close(self) -> None:
        self._bytes = None
        if self._map is not None:
            self._map.close()
            self._map = None
            self.segment = None
