"""The receiving end of a socket link (``SocketReader``); the frames, the protocol and
the sending end are in ``comms.socket_link``.

``recv`` runs on the caller's thread: it waits in ``poll`` with its timeout, reads a
frame through a read buffer (a small frame in one system call, a payload straight into
its tensor), and writes the credit back.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time

import torch

from comms.channel import deadline_of, remaining
from comms.config import TransportConfig
from comms.endpoint import CrossRankReader
from comms.errors import ChannelClosed, ChannelTimeout, HeaderError, PeerFailure
from comms.header import decode_header, unpack_tensors
from comms.link_spec import LinkSpec
from comms.message import Message
from comms.shm import Segment, SegmentReader
from comms.socket_link import (ANNOUNCE, BACK, CLOSED, CREDIT, END, FRAME, MSG, SHM, SHM_NEW, make_poller, send_all,
                               wait_ready)

log = logging.getLogger(__name__)

READ_BUFFER = 1 << 16
"""Bytes read per system call when reading frames: a whole small frame in one call."""
DIRECT_MIN = 4096
"""An inline payload at least this large is read straight into its tensor."""
FOREVER = float("inf")


class SocketReader(CrossRankReader):
    """The receiving end of a socket link; ``recv`` runs on the caller's thread (one
    caller at a time), ``close`` from any thread. ``fd_sock`` as for ``SocketWriter``."""

    def __init__(self, spec: LinkSpec, sock: socket.socket, fd_sock: socket.socket | None,
                 config: TransportConfig) -> None:
        super().__init__(spec, config)
        sock.setblocking(False)  # see SocketWriter
        self._sock = sock
        if fd_sock is not None:
            fd_sock.settimeout(config.peer_timeout_s)
        self._fd_sock = fd_sock
        self._readable = make_poller((sock, select.POLLIN))
        self._writable = make_poller((sock, select.POLLOUT))
        self._rbuf = bytearray(READ_BUFFER)
        self._rview = memoryview(self._rbuf)
        self._rstart = self._rend = 0
        self._peer_timeout = config.peer_timeout_s
        self._lock = threading.Lock()
        """Held by the one ``recv`` reading the socket."""
        self._back_lock = threading.Lock()
        """Serialises CREDIT and CLOSED writes (``close`` may come from any thread)."""
        self._shm_in = SegmentReader()
        self._device = torch.device(spec.dst_device)


    def recv(self, timeout: float | None = None) -> Message:
        deadline = deadline_of(timeout)
        with self._lock:
            self._raise_if_unusable()
            if self._ended:
                raise self._ended_error()
            wait = remaining(deadline)
            prefix = self._read_exact(FRAME.size, first_wait=FOREVER if wait is None else wait)
            if prefix is None:
                raise ChannelTimeout(f"link {self.name!r}: nothing arrived within {timeout} s")
            kind, flags, chunk, header_len, total, sent_at = FRAME.unpack(prefix)
            if kind == END:
                with self._cond:
                    self._ended = True
                    self._cond.notify_all()
                self._shm_in.close()
                self._write_back(CLOSED, 0)
                raise self._ended_error()
            if kind != MSG:
                raise PeerFailure(self._fail(f"protocol error: frame kind {kind} from rank {self._peer}"))
            try:
                msg = self._read_message(flags, chunk, header_len, total)
            except (HeaderError, OSError) as e:  # OSError: an announced segment that cannot be opened
                raise PeerFailure(self._fail(f"bad frame from rank {self._peer}: {e}")) from None
            self._write_back(CREDIT, 1)
        self.stats.record_recv(total, (time.time() - sent_at) * 1000.0)
        return msg

    def _read_message(self, flags: int, chunk: int, header_len: int, total: int) -> Message:
        msg, specs = decode_header(self._read_exact(header_len))
        if flags & SHM:
            if self._fd_sock is None:
                raise HeaderError("a shared-memory payload on a link between hosts")
            if flags & SHM_NEW:
                chunk_bytes, chunks = ANNOUNCE.unpack(self._read_exact(ANNOUNCE.size))
                _, fds, _, _ = socket.recv_fds(self._fd_sock, 1, 1)  # sent before the frame
                if len(fds) != 1:
                    raise HeaderError("a new shared-memory segment was announced without its descriptor")
                self._shm_in.open(fds[0], Segment(chunk_bytes=chunk_bytes, chunks=chunks))
            flat = self._shm_in.take(chunk, total)
        else:
            flat = torch.empty(total, dtype=torch.uint8)
            if total:
                self._read_exact(total, into=memoryview(flat.numpy()).cast("B"))
        if flat.device != self._device:
            flat = flat.to(self._device)
        msg.tensors = unpack_tensors(flat, specs)
        return msg

    def _read_exact(self, n: int, *, into: memoryview | None = None, first_wait: float | None = None):
        """``n`` bytes from the socket (into ``into`` when given), through a read buffer
        so a small frame takes one system call. With ``first_wait`` (seconds; ``FOREVER``
        for no limit) this starts a frame: None comes back if no byte arrived in that
        time. Once a frame has started, its rest must follow within ``peer_timeout_s``,
        or the writer counts as stalled."""
        out = into if into is not None else memoryview(bytearray(n))
        got = 0
        while got < n:
            if self._rend > self._rstart:
                take = min(self._rend - self._rstart, n - got)
                out[got:got + take] = self._rview[self._rstart:self._rstart + take]
                self._rstart += take
                got += take
                continue
            starting = got == 0 and first_wait is not None
            # A payload of some size goes straight into its tensor: a copy less than through
            # the read buffer, which only pays off for the many small reads of a frame.
            direct = n - got >= (DIRECT_MIN if into is not None else READ_BUFFER)
            k = self._recv_into(out[got:] if direct else self._rview,
                                (None if first_wait is FOREVER else first_wait) if starting else self._peer_timeout)
            if k is None:
                if starting:
                    return None
                raise PeerFailure(self._fail(f"rank {self._peer} stalled mid-message "
                                             f"({got} of {n} bytes in {self._peer_timeout} s)"))
            if k == 0:
                if self._closed:
                    raise ChannelClosed(f"link {self.name!r} is closed")
                raise PeerFailure(self._fail(f"rank {self._peer} closed the connection without END (died?)"))
            if direct:
                got += k
            else:
                self._rstart, self._rend = 0, k
        return out

    def _recv_into(self, view: memoryview, wait: float | None) -> int | None:
        """Bytes read into ``view`` (0: the peer hung up), or None when nothing came
        within ``wait`` seconds (None: no limit)."""
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            try:
                return self._sock.recv_into(view)
            except BlockingIOError:
                pass
            except OSError as e:
                raise PeerFailure(self._fail(f"receive from rank {self._peer} failed: {e}")) from None
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0 or not wait_ready(self._readable, left):
                return None

    def _write_back(self, kind: int, count: int) -> None:
        """CREDIT or CLOSED to the writer; a writer already gone is noticed by the next read."""
        record = BACK.pack(kind, count)
        with self._back_lock:
            try:
                sent = self._sock.send(record)
                if sent < len(record):
                    send_all(self._sock, self._writable, [record[sent:]], self._peer_timeout, self._peer)
            except BlockingIOError:
                send_all(self._sock, self._writable, [record], self._peer_timeout, self._peer)
            except OSError as e:
                log.debug("link %r: back record to rank %d not sent: %s", self.name, self._peer, e)

    def _tell_writer_closed(self) -> None:
        self._write_back(CLOSED, 0)
        try:
            self._sock.shutdown(socket.SHUT_RD)  # a recv blocked in another thread reads the end
        except OSError:
            pass

    def join(self, timeout: float | None = None) -> bool:
        """True once this end is closed, has taken END, or failed, and no ``recv`` is
        running; frees the shared-memory mapping then."""
        deadline = deadline_of(timeout)
        with self._cond:
            if not self._cond.wait_for(lambda: self._closed or self._ended or self._failure is not None,
                                       remaining(deadline)):
                return False
        wait = remaining(deadline)
        if not self._lock.acquire(timeout=-1 if wait is None else wait):
            return False
        try:
            self._shm_in.close()
            return True
        finally:
            self._lock.release()
