"""Links between two ranks over a socket, with no background threads: a Unix socket and
shared memory on one host, a TCP connection between hosts. The frames, the sending end
(``SocketWriter``) and the socket helpers are here; the receiving end is
``comms.socket_reader``.

A gloo link runs a thread per group it receives on and hands every message from a gloo
wait to the consumer's thread: on a 2-core machine each hand-off costs tens of
microseconds, and the link threads compete for the GIL with the stage they serve. A
socket does the job with the caller's own thread: ``recv`` waits in ``poll`` with its
timeout (a gloo wait cannot time out without closing the connection), ``send`` writes
one frame. Both ends use it the same way on both kinds of socket:

* same host (``Transport.SAME_HOST``): payloads above ``TransportConfig.inline_max_bytes``
  go through the writer's shared-memory segment (``comms.shm``), so the socket carries
  only small frames;
* between hosts (``Transport.TCP``): every payload follows its frame on the connection
  (Nagle off, so a frame leaves at once). The kernel's TCP stack moves the bytes as
  gloo's would, without gloo's loop thread and the hand-off after it.

Frames, writer -> reader: ``FRAME`` (kind, flags, shared-memory chunk, header length,
payload length, send time), the encoded header, then a segment announcement (flag
SHM_NEW: chunk size and count; the segment's file descriptor went just before, as
SCM_RIGHTS on the link's second socket, which only ever carries descriptors, so frames
are read with plain reads) or the payload itself (flag INLINE). Reader -> writer:
``BACK`` records, CREDIT n (``recv`` took n messages) or CLOSED (the reader closed or
took END). Back records never fill the socket (at most one per credit in flight), so
writing one does not wait.

Closing without waiting: ``writer.close`` writes what the socket takes of END now and
``join`` the rest; a send waiting for credit wakes through the writer's wake-up socket.
``reader.close`` writes CLOSED and shuts the socket's read side, which wakes a ``recv``
blocked in another thread.

Setup (``comms.links``, at the same point of link setup on the two ranks): the reader
listens and sends its address to the writer over the default process group; the writer
connects. On one host that is a fresh abstract Unix socket name (no file, vanishes with
the socket; per network namespace, which is why only ranks of one torchrun node use
these), between hosts a TCP port on the reader's address (``comms.node_address``).
"""

from __future__ import annotations

import logging
import math
import select
import socket
import struct
import threading
import time


from comms.channel import deadline_of, remaining
from comms.config import TransportConfig
from comms.endpoint import CrossRankWriter
from comms.errors import ChannelClosed, PeerFailure, TransportError
from comms.header import TensorSpec, pack_tensors
from comms.link_spec import LinkSpec
from comms.message import Message
from comms.shm import SegmentWriter

log = logging.getLogger(__name__)

FRAME = struct.Struct("<BBHIQd")  # kind, flags, chunk, header_len, payload_len, send time
ANNOUNCE = struct.Struct("<QH")  # chunk bytes, chunks; the descriptor comes on the second socket
BACK = struct.Struct("<BI")  # kind, count
MSG, END = 1, 2
INLINE, SHM, SHM_NEW = 1, 2, 4
CREDIT, CLOSED = 1, 2
_JOIN_LOOK_S = 0.05
"""A writer's ``join`` looks again at least this often: END may be posted meanwhile by a
send finishing in another thread."""



class SocketWriter(CrossRankWriter):
    """The sending end of a socket link; ``send`` runs on the caller's thread (one caller
    at a time). ``fd_sock``: the socket for shared-memory descriptors, on one host; None
    between hosts, where payloads always follow their frame."""

    def __init__(self, spec: LinkSpec, sock: socket.socket, fd_sock: socket.socket | None,
                 config: TransportConfig) -> None:
        super().__init__(spec, config)
        # Non-blocking with poll() waits: one recv/send system call per step, and no
        # per-call timeout switching (each settimeout is an fcntl).
        sock.setblocking(False)
        self._sock = sock
        if fd_sock is not None:
            fd_sock.settimeout(config.peer_timeout_s)  # a descriptor is sent before its frame: never far
        self._fd_sock = fd_sock
        self._wake_in, self._wake_out = socket.socketpair()
        """``close`` writes a byte into ``_wake_out`` to end a wait for credit."""
        self._wake_out.setblocking(False)
        self._credit_wait = make_poller((sock, select.POLLIN), (self._wake_in, select.POLLIN))
        self._readable = make_poller((sock, select.POLLIN))
        self._writable = make_poller((sock, select.POLLOUT))
        self._inline_max = config.inline_max_bytes
        self._peer_timeout = config.peer_timeout_s
        self._lock = threading.Lock()
        """Held by the one call using the socket (a send, ``credits``, END, ``join``)."""
        self._peer_gone = False
        self._back = bytearray()
        self._shm = SegmentWriter(spec.name, config.link_capacity) if fd_sock is not None else None
        self._sent = 0
        self._end_rest: memoryview | None = None
        """The part of END the socket has not taken yet."""
        self.sent_by_path = {"inline": 0, "shm": 0, "socket": 0, "empty": 0}
        """Where payloads went; 'socket': too big to inline, on the connection itself (between
        hosts, or on one host when shared memory was unavailable)."""

    def _deliver(self, msg: Message, header: bytes, specs: list[TensorSpec], total: int,
                 deadline: float | None, timeout: float | None) -> None:
        with self._lock:
            self._take_credit(deadline, timeout)
            try:
                self._write_frame(msg, header, specs, total)
            except OSError as e:
                self._read_back(0)  # a CLOSED already sent explains a broken pipe
                if self._peer_closed:
                    raise ChannelClosed(f"link {self.name!r}: the receiver (rank {self._peer}) closed it") from None
                raise PeerFailure(self._fail(f"send to rank {self._peer} failed: {e}")) from None

    def credits(self) -> int:
        if not self._lock.acquire(blocking=False):
            return 0
        try:
            self._read_back(0)
            usable = not (self._closed or self._peer_closed or self._failure)
            return self._credits if usable else 0
        except TransportError:
            return 0
        finally:
            self._lock.release()

    def _take_credit(self, deadline: float | None, timeout: float | None) -> None:
        # Credits are read only when none is left: a CLOSED waiting unread is still
        # found, by the write that fails once the receiver has shut its end.
        while True:
            self._raise_if_unusable()
            if self._credits > 0:
                self._credits -= 1
                return
            wait = remaining(deadline)
            if wait is not None and wait <= 0:
                raise self._no_credit(timeout)
            self._read_back(wait, self._credit_wait)

    def _read_back(self, wait: float | None, poller: select.poll | None = None) -> None:
        """Take CREDIT / CLOSED records the receiver sent, waiting on ``poller`` up to
        ``wait`` seconds (None: until one arrives) when none is there yet."""
        if self._peer_gone:
            return
        for attempt in (1, 2):
            try:
                data = self._sock.recv(4096)
                break
            except BlockingIOError:
                # Nothing yet: wait once; woken without data, the caller looks again.
                if attempt == 2 or wait is not None and wait <= 0 or not wait_ready(poller or self._readable, wait):
                    return
            except OSError as e:
                raise PeerFailure(self._fail(f"rank {self._peer} failed: {e}")) from None
        if not data:
            self._peer_gone = True
            if not self._peer_closed:
                raise PeerFailure(self._fail(f"rank {self._peer} closed the connection without CLOSED (died?)"))
            return
        self._back += data
        while len(self._back) >= BACK.size:
            kind, count = BACK.unpack_from(self._back, 0)
            del self._back[:BACK.size]
            if kind == CREDIT and 0 < count <= self.capacity:
                self._credits = min(self.capacity, self._credits + count)
            elif kind == CLOSED:
                self._peer_closed = True
            else:
                raise PeerFailure(self._fail(f"protocol error: back record {(kind, count)} from rank {self._peer}"))

    def _write_frame(self, msg: Message, header: bytes, specs: list[TensorSpec], total: int) -> None:
        flags, chunk, extra, payload = 0, 0, b"", None
        placed = self._shm.reserve(total) if self._shm is not None and total > self._inline_max else None
        if placed is not None:
            segment, new = placed
            chunk = self._sent % self.capacity
            flat, _ = pack_tensors(msg.tensors, "cpu", specs)
            self._shm.write(chunk, flat)
            flags = SHM | (SHM_NEW if new else 0)
            if new:
                extra = ANNOUNCE.pack(segment.chunk_bytes, segment.chunks)
                socket.send_fds(self._fd_sock, [b"S"], [self._shm.fd])
                self._shm.announced()
        elif total:
            flags = INLINE
            flat, _ = pack_tensors(msg.tensors, "cpu", specs)
            payload = memoryview(flat.numpy()).cast("B")
        prefix = FRAME.pack(MSG, flags, chunk, len(header), total, time.time())
        send_all(self._sock, self._writable, [prefix + header + extra] + ([payload] if payload is not None else []),
                  self._peer_timeout, self._peer)
        self._sent += 1
        path = "shm" if placed else ("inline" if total <= self._inline_max else "socket") if total else "empty"
        self.sent_by_path[path] += 1

    def _wake_credit_wait(self) -> None:
        try:
            self._wake_out.send(b"\0")
        except OSError:  # a wake-up byte is already waiting
            pass

    def _post_end(self) -> None:
        with self._lock:
            if not self._peer_gone:
                self._end_rest = memoryview(FRAME.pack(END, 0, 0, 0, 0, time.time()))
                self._write_end()

    def _write_end(self) -> None:
        """Write what the socket takes of END now, without waiting; ``join`` writes the rest."""
        if self._end_rest is None:
            return
        try:
            sent = self._sock.send(self._end_rest)
        except BlockingIOError:
            return
        except OSError as e:  # the receiver is gone: reading back tells whether it closed first
            log.debug("link %r: END not sent: %s", self.name, e)
            self._end_rest = None
            return
        self._end_rest = self._end_rest[sent:] if sent < len(self._end_rest) else None

    def join(self, timeout: float | None = None) -> bool:
        """True once the receiver has taken END (its CLOSED came back), closed, or is
        gone; writes what is left of END meanwhile. Frees the shared memory then, which
        until then may be named in a frame not yet read."""
        deadline = deadline_of(timeout)
        if not self._sends_finished(deadline):
            return False
        while True:
            wait = remaining(deadline)
            if not self._lock.acquire(timeout=-1 if wait is None else wait):
                return False
            try:
                self._write_end()
                try:
                    self._read_back(0)
                except TransportError:
                    pass  # failed: finished with
                if self._peer_closed or self._peer_gone or self._failure is not None:
                    if self._shm is not None:
                        self._shm.close()
                    return True
            finally:
                self._lock.release()
            wait = remaining(deadline)
            if wait is not None and wait <= 0:
                return False
            wait_ready(self._writable if self._end_rest is not None else self._readable,
                  _JOIN_LOOK_S if wait is None else min(wait, _JOIN_LOOK_S))


def make_poller(*registrations: tuple[socket.socket, int]) -> select.poll:
    poller = select.poll()
    for sock, events in registrations:
        poller.register(sock, events)
    return poller


def wait_ready(poller: select.poll, wait: float | None) -> bool:
    """Whether a registered socket became ready within ``wait`` seconds (None: no limit)."""
    return bool(poller.poll(None if wait is None else math.ceil(wait * 1000)))


def send_all(sock: socket.socket, writable: select.poll, buffers: list, peer_timeout: float, peer: int) -> None:
    """Write every byte of ``buffers`` (OSError if the socket breaks); the peer may be
    slow to read a large frame, but not slower than ``peer_timeout`` seconds."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        try:
            sent = sock.sendmsg(views)
        except BlockingIOError:
            if not wait_ready(writable, peer_timeout):
                raise OSError(f"rank {peer} took nothing for {peer_timeout} s") from None
            continue
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]
