"""Payloads through shared memory between two ranks on one host.

Over gloo, a payload between two processes on the same machine still crosses the
loopback TCP stack: copied into the kernel, then out again, by gloo's I/O threads,
with a rendezvous per message. Through a shared-memory segment it costs two plain
memory copies (sender in, receiver out), which on the development machine run at
~45 GB/s against gloo's ~2.5 GB/s.

One link's sender owns its segments: a file in /dev/shm of ``chunks`` equal chunks,
one per message that may be in flight (the link's credits), so the chunk of message
``n`` is ``n % chunks`` and is free again once the credit for message ``n`` returned:
the receiver copies a payload out before the message is queued for ``recv``, and
credits return only when ``recv`` takes it. A payload larger than the chunks gets a
new, larger segment, announced in the slot of the first message that uses it; the
receiver opens it by name and unlinks the name at once, so nothing is left in
/dev/shm even if either process dies later. A segment that cannot be created (no
/dev/shm, or it is full: ``posix_fallocate`` reports that instead of a SIGBUS on
first touch) turns shared memory off for the link, which then carries payloads over
gloo as it would between hosts.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
from dataclasses import dataclass

import torch

from comms.errors import HeaderError

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
MAX_CHUNK_BYTES = 64 * 2**20
"""Payloads beyond this go over gloo even on one host (a segment is chunks x this)."""
_CHUNK_STEP = 2**20
_PREFIX = "mindmirror-"
_NAME = re.compile(re.escape(_PREFIX) + r"[A-Za-z0-9_-]{1,200}")


@dataclass(frozen=True, slots=True)
class Segment:
    name: str
    """File name inside /dev/shm (no directory part)."""
    chunk_bytes: int
    chunks: int


class SegmentWriter:
    """The sending end: puts payloads into chunks of its current segment."""

    def __init__(self, link: str, chunks: int) -> None:
        self._tag = re.sub(r"[^A-Za-z0-9]+", "_", link)[:60]
        self._chunks = chunks
        self.segment: Segment | None = None
        self._map: mmap.mmap | None = None
        self._bytes: torch.Tensor | None = None
        """The whole mapping as one uint8 tensor (made once: ``torch.frombuffer`` per write costs more than a small copy)."""
        self._created: list[str] = []
        self.off_reason: str | None = None
        """Why this link stopped using shared memory (None while it uses it)."""

    def reserve(self, nbytes: int) -> tuple[Segment, bool] | None:
        """The segment a payload of ``nbytes`` goes into and whether it is new (its
        first message must announce it); None when shared memory cannot take it."""
        if self.off_reason is not None or nbytes > MAX_CHUNK_BYTES:
            return None
        if self.segment is not None and nbytes <= self.segment.chunk_bytes:
            return self.segment, False
        chunk_bytes = -(-nbytes // _CHUNK_STEP) * _CHUNK_STEP
        name = f"{_PREFIX}{os.getpid()}-{self._tag}-{secrets.token_hex(4)}"
        try:
            new_map = _create(name, chunk_bytes * self._chunks)
        except OSError as e:
            self.off_reason = f"cannot create a {chunk_bytes * self._chunks}-byte segment in {SHM_DIR}: {e}"
            log.warning("link %s: payloads go over gloo: %s", self._tag, self.off_reason)
            return None
        self._created.append(name)
        self._unmap()  # the receiver has its own mapping of the old one
        self._map = new_map
        self._bytes = torch.frombuffer(new_map, dtype=torch.uint8)
        self.segment = Segment(name=name, chunk_bytes=chunk_bytes, chunks=self._chunks)
        return self.segment, True

    def write(self, chunk: int, flat: torch.Tensor) -> None:
        """Copy ``flat`` (uint8, on the CPU) into ``chunk`` of the current segment."""
        start = chunk * self.segment.chunk_bytes
        self._bytes[start:start + flat.numel()].copy_(flat)

    def close(self) -> None:
        """Unmap, and remove the names the receiver has not already removed."""
        self._unmap()
        for name in self._created:
            _unlink_quietly(name)
        self._created.clear()


    def _unmap(self) -> None:
        self._bytes = None  # the tensor exports the mapping's buffer: it must go first
        if self._map is not None:
            self._map.close()
            self._map = None


class SegmentReader:
    """The receiving end: copies payloads out of the sender's current segment."""

    def __init__(self) -> None:
        self.segment: Segment | None = None
        self._map: mmap.mmap | None = None
        self._bytes: torch.Tensor | None = None

    def open(self, segment: Segment) -> None:
        if not _NAME.fullmatch(segment.name):
            raise HeaderError(f"shared-memory segment name {segment.name!r} is not one of ours")
        if segment.chunk_bytes <= 0 or segment.chunks <= 0:
            raise HeaderError(f"shared-memory segment {segment} has no room")
        path = os.path.join(SHM_DIR, segment.name)
        fd = os.open(path, os.O_RDWR)  # read-write only so torch can view it without a warning
        try:
            size = os.fstat(fd).st_size
            if size < segment.chunk_bytes * segment.chunks:
                raise HeaderError(f"shared-memory segment {segment.name} has {size} bytes, "
                                  f"announced {segment.chunks} x {segment.chunk_bytes}")
            new_map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
            _unlink_quietly(segment.name)  # mapped now: the name is not needed any more
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
        self._bytes = None  # exports the mapping's buffer: it must go before the mapping
        if self._map is not None:
            self._map.close()
            self._map = None
            self.segment = None


def _create(name: str, size: int) -> mmap.mmap:
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)  # ENOSPC now, not SIGBUS on first write
        return mmap.mmap(fd, size)
    except OSError:
        _unlink_quietly(name)
        raise
    finally:
        os.close(fd)


def _unlink_quietly(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass
    except OSError as e:
        log.debug("could not remove %s/%s: %s", SHM_DIR, name, e)
