"""Links between two ranks on one host: headers over a Unix socket, payloads through
shared memory, and no background threads.

A gloo link runs three threads per end and hands every message from a gloo wait to the
consumer's thread: on a 2-core machine each hand-off costs tens of microseconds, and
the link threads compete for the GIL with the stage they serve. Between two processes
on one host a Unix socket does the job with the caller's own thread: ``recv`` waits in
``poll`` with its timeout (a gloo wait cannot time out without closing the connection),
``send`` writes one frame. Payloads above ``INLINE_MAX`` go through the sender's
shared-memory segment (``comms.shm``), so the socket carries only small frames.

Frames, sender -> receiver: ``_FRAME`` (kind, flags, shared-memory chunk, header length,
payload length, send time), the encoded header, then a segment announcement (flag
SHM_NEW: chunk size and count; the segment's file descriptor went just before, as
SCM_RIGHTS on the link's second socket, which only ever carries descriptors, so frames
are read with plain reads) or the payload itself (flag INLINE). Receiver -> sender: ``_BACK``
records, CREDIT n (``recv`` took n messages) or CLOSED (the receiver closed or took END).

Setup (``comms.links.connect_local``, on both ends in link order):
the receiver listens on a fresh abstract socket name and sends the name to the sender
over the default process group; the sender connects. Abstract names need no file and
vanish with the socket; they are per network namespace, which is why only ranks of one
torchrun node (one host, one namespace) use these links.
"""

from __future__ import annotations

import atexit
import logging
import math
import select
import socket
import struct
import threading
import time
import weakref

import torch

from comms.channel import Channel, LinkStats
from comms.config import TransportConfig
from comms.errors import ChannelClosed, ChannelTimeout, HeaderError, PeerFailure, TransportError
from comms.header import decode_header, encode_for_send, pack_tensors, unpack_tensors
from comms.inprocess import deadline_of, remaining
from comms.message import Message
from comms.shm import Segment, SegmentReader, SegmentWriter

log = logging.getLogger(__name__)

INLINE_MAX = 16384
"""Payloads up to this many bytes ride in the frame; larger ones go through shared memory."""
CLOSE_TIMEOUT_S = 2.0
_FRAME = struct.Struct("<BBHIQd")  # kind, flags, chunk, header_len, payload_len, send time
_ANNOUNCE = struct.Struct("<QH")  # chunk bytes, chunks; the descriptor comes on the second socket
_BACK = struct.Struct("<BI")  # kind, count
_MSG, _END = 1, 2
_INLINE, _SHM, _SHM_NEW = 1, 2, 4
_CREDIT, _CLOSED = 1, 2
_READ_BUFFER = 1 << 16
"""Bytes read per system call when reading frames: a whole small frame in one call."""

FOREVER = float("inf")

_live: "weakref.WeakSet[SocketChannel]" = weakref.WeakSet()


class SocketChannel(Channel):
    """One end of a same-host link; ``send`` on the source rank, ``recv`` on the
    destination rank, each on the caller's thread (one caller at a time per end)."""

    def __init__(self, spec, sock: socket.socket, fd_sock: socket.socket, *, is_sender: bool,
                 config: TransportConfig) -> None:
        self.name = spec.name
        self.capacity = config.link_capacity
        self.stats = LinkStats()
        self.spec = spec
        self.is_sender = is_sender
        self._peer = spec.dst_rank if is_sender else spec.src_rank
        # Non-blocking with poll() waits: one recv/send system call per step, and no
        # per-call timeout switching (each settimeout is an fcntl).
        sock.setblocking(False)
        self._sock = sock
        fd_sock.settimeout(config.peer_timeout_s)  # a descriptor is sent before its frame: never far
        self._fd_sock = fd_sock
        self._readable = select.poll()
        self._readable.register(sock, select.POLLIN)
        self._writable = select.poll()
        self._writable.register(sock, select.POLLOUT)
        self._rbuf = bytearray(_READ_BUFFER)
        self._rview = memoryview(self._rbuf)
        self._rstart = self._rend = 0
        self._peer_timeout = config.peer_timeout_s
        self._lock = threading.Lock()
        """Held by the one call using this end's socket direction (send or recv)."""
        self._back_lock = threading.Lock()
        """Receiver: serialises CREDIT and CLOSED writes (``close`` may come from any thread)."""
        self._closed = False
        self._failure: str | None = None
        if is_sender:
            self._credits = config.link_capacity
            self._peer_closed = False
            self._peer_gone = False
            self._back = bytearray()
            self._shm = SegmentWriter(spec.name, config.link_capacity)
            self._sent = 0
            self.sent_by_path = {"inline": 0, "shm": 0, "socket": 0, "empty": 0}
            """Where payloads went; 'socket': too big to inline but shared memory was unavailable."""
        else:
            self._ended = False
            self._shm_in = SegmentReader()
            self._device = torch.device(spec.dst_device)
        _live.add(self)

    # ----------------------------------------------------------------- sender side

    def send(self, msg: Message, timeout: float | None = None) -> None:
        if not self.is_sender:
            raise TransportError(f"link {self.name!r}: rank {self.spec.dst_rank} is the receiving end")
        deadline = deadline_of(timeout)
        specs, total, header = encode_for_send(self.name, msg)
        started = time.monotonic()
        with self._lock:
            self._take_credit(deadline, timeout)
            try:
                self._write_frame(msg, header, specs, total)
            except OSError as e:
                self._read_back(0)  # a CLOSED already sent explains a broken pipe
                if self._peer_closed:
                    raise ChannelClosed(f"link {self.name!r}: the receiver (rank {self._peer}) closed it") from None
                raise PeerFailure(self._fail(f"send to rank {self._peer} failed: {e}")) from None
        self.stats.record_send(msg.payload_bytes, time.monotonic() - started)

    def credits(self) -> int:
        if not self.is_sender or not self._lock.acquire(blocking=False):
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
                raise ChannelTimeout(f"link {self.name!r}: no credit within {timeout} s "
                                     f"({self.capacity} messages in flight)")
            self._read_back(wait)

    def _read_back(self, wait: float | None) -> None:
        """Take CREDIT / CLOSED records the receiver sent, waiting up to ``wait`` seconds
        (None: until one arrives) when none is there yet."""
        if self._peer_gone:
            return
        for attempt in (1, 2):
            try:
                data = self._sock.recv(4096)
                break
            except BlockingIOError:
                # Nothing yet: wait once; woken without data, the caller looks again.
                if attempt == 2 or wait is not None and wait <= 0 or not self._poll(self._readable, wait):
                    return
            except OSError as e:
                raise PeerFailure(self._fail(f"rank {self._peer} failed: {e}")) from None
        if not data:
            self._peer_gone = True
            if not self._peer_closed:
                raise PeerFailure(self._fail(f"rank {self._peer} closed the connection without CLOSED (died?)"))
            return
        self._back += data
        while len(self._back) >= _BACK.size:
            kind, count = _BACK.unpack_from(self._back, 0)
            del self._back[:_BACK.size]
            if kind == _CREDIT and 0 < count <= self.capacity:
                self._credits = min(self.capacity, self._credits + count)
            elif kind == _CLOSED:
                self._peer_closed = True
            else:
                raise PeerFailure(self._fail(f"protocol error: back record {(kind, count)} from rank {self._peer}"))

    def _write_frame(self, msg: Message, header: bytes, specs, total: int) -> None:
        flags, chunk, extra, payload = 0, 0, b"", None
        placed = self._shm.reserve(total) if total > INLINE_MAX else None
        if placed is not None:
            segment, new = placed
            chunk = self._sent % self.capacity
            flat, _ = pack_tensors(msg.tensors, "cpu", specs)
            self._shm.write(chunk, flat)
            flags = _SHM | (_SHM_NEW if new else 0)
            if new:
                extra = _ANNOUNCE.pack(segment.chunk_bytes, segment.chunks)
                socket.send_fds(self._fd_sock, [b"S"], [self._shm.fd])
                self._shm.announced()
        elif total:
            flags = _INLINE
            flat, _ = pack_tensors(msg.tensors, "cpu", specs)
            payload = memoryview(flat.numpy()).cast("B")
        prefix = _FRAME.pack(_MSG, flags, chunk, len(header), total, time.time())
        self._send_all([prefix + header + extra] + ([payload] if payload is not None else []))
        self._sent += 1
        path = "shm" if placed else ("inline" if total <= INLINE_MAX else "socket") if total else "empty"
        self.sent_by_path[path] += 1

    def _send_all(self, buffers: list) -> None:
        """Write every byte of ``buffers`` (OSError if the socket breaks); the receiver
        may be slow to read a large frame, but not slower than ``peer_timeout_s``."""
        views = [memoryview(b).cast("B") for b in buffers]
        while views:
            try:
                sent = self._sock.sendmsg(views)
            except BlockingIOError:
                if not self._poll(self._writable, self._peer_timeout):
                    raise OSError(f"rank {self._peer} took nothing for {self._peer_timeout} s") from None
                continue
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if views and sent:
                views[0] = views[0][sent:]

    # --------------------------------------------------------------- receiver side

    def recv(self, timeout: float | None = None) -> Message:
        if self.is_sender:
            raise TransportError(f"link {self.name!r}: rank {self.spec.src_rank} is the sending end")
        deadline = deadline_of(timeout)
        with self._lock:
            self._raise_if_unusable()
            if self._ended:
                raise ChannelClosed(f"link {self.name!r}: rank {self._peer} sent END")
            wait = remaining(deadline)
            prefix = self._read_exact(_FRAME.size, first_wait=FOREVER if wait is None else wait)
            if prefix is None:
                raise ChannelTimeout(f"link {self.name!r}: nothing arrived within {timeout} s")
            kind, flags, chunk, header_len, total, sent_at = _FRAME.unpack(prefix)
            if kind == _END:
                self._ended = True
                self._shm_in.close()
                self._write_back(_CLOSED, 0)
                raise ChannelClosed(f"link {self.name!r}: rank {self._peer} sent END")
            if kind != _MSG:
                raise PeerFailure(self._fail(f"protocol error: frame kind {kind} from rank {self._peer}"))
            try:
                msg = self._read_message(flags, chunk, header_len, total)
            except (HeaderError, OSError) as e:  # OSError: an announced segment that cannot be opened
                raise PeerFailure(self._fail(f"bad frame from rank {self._peer}: {e}")) from None
            self._write_back(_CREDIT, 1)
        self.stats.record_recv(total, (time.time() - sent_at) * 1000.0)
        return msg

    def _read_message(self, flags: int, chunk: int, header_len: int, total: int) -> Message:
        msg, specs = decode_header(self._read_exact(header_len))
        if flags & _SHM:
            if flags & _SHM_NEW:
                chunk_bytes, chunks = _ANNOUNCE.unpack(self._read_exact(_ANNOUNCE.size))
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
        or the sender counts as stalled."""
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
            direct = n - got >= _READ_BUFFER  # a large payload goes straight to its tensor
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
            if left is not None and left <= 0 or not self._poll(self._readable, left):
                return None

    def _poll(self, poller, wait: float | None) -> bool:
        """Whether the socket became ready within ``wait`` seconds (None: no limit)."""
        return bool(poller.poll(None if wait is None else math.ceil(wait * 1000)))

    def _write_back(self, kind: int, count: int) -> None:
        """CREDIT or CLOSED to the sender; a sender already gone is noticed by the next read."""
        record = _BACK.pack(kind, count)
        with self._back_lock:
            try:
                sent = self._sock.send(record)
                if sent < len(record):
                    self._send_all([record[sent:]])
            except BlockingIOError:
                self._send_all([record])
            except OSError as e:
                log.debug("link %r: back record to rank %d not sent: %s", self.name, self._peer, e)

    # ------------------------------------------------------------------- both ends

    def close(self) -> None:
        """Sender: END goes out after every message already sent (waiting at most ~2 s
        for a send in progress). Receiver: CLOSED tells the sender to stop; messages not
        yet taken are dropped, and a ``recv`` blocked in another thread returns."""
        if self._closed:
            return
        self._closed = True
        if not self.is_sender:
            self._write_back(_CLOSED, 0)
            _shutdown(self._sock, socket.SHUT_RD)
            return
        if not self._lock.acquire(timeout=min(CLOSE_TIMEOUT_S, self._peer_timeout)):
            log.warning("link %r: a send is still running; END not sent", self.name)
            return
        try:
            if self._failure is None and not self._peer_gone:
                self._send_all([_FRAME.pack(_END, 0, 0, 0, 0, time.time())])
        except OSError as e:
            log.debug("link %r: END not sent: %s", self.name, e)
        finally:
            self._lock.release()

    def join(self, timeout: float | None = None) -> bool:
        """No threads to wait for; True once this end is finished with. The sender is
        finished when the receiver has taken END or closed, or is gone; it waits for
        that at most ``timeout`` and then frees its shared memory, which until then may
        be named in a frame not yet read."""
        if not self.is_sender:
            return True
        deadline = deadline_of(timeout)
        if not self._lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            return False
        try:
            while not self._finished():
                wait = remaining(deadline)
                if wait is not None and wait <= 0:
                    return False
                try:
                    self._read_back(wait)
                except TransportError:
                    break
            self._shm.close()
            return True
        finally:
            self._lock.release()

    def _finished(self) -> bool:
        return self._peer_closed or self._peer_gone or self._failure is not None

    def _raise_if_unusable(self) -> None:
        if self._failure is not None:
            raise PeerFailure(self._failure)
        if self._closed:
            raise ChannelClosed(f"link {self.name!r} is closed")
        if self.is_sender and self._peer_closed:
            raise ChannelClosed(f"link {self.name!r}: the receiver (rank {self._peer}) closed it")

    def _fail(self, reason: str) -> str:
        if self._failure is None:
            self._failure = f"link {self.name!r}: {reason}"
            (log.debug if self._closed else log.error)("%s", self._failure)
        return self._failure

    def __repr__(self) -> str:
        end = "send" if self.is_sender else "recv"
        return (f"SocketChannel({self.name!r}, {end} end, rank {self.spec.src_rank} -> {self.spec.dst_rank}, "
                f"capacity={self.capacity})")


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


@atexit.register
def _close_live_channels() -> None:
    """Send END on links still open and free shared memory a crashed run would leave."""
    for channel in list(_live):
        channel.close()
        if channel.is_sender:
            channel.join(CLOSE_TIMEOUT_S / 4)
            channel._shm.close()
