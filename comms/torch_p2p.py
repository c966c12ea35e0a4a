"""Channels between ranks over torch.distributed point-to-point sends.

Every directed link gets three two-rank process groups of its own, created by all
ranks in the same order (``comms.links.create_links``):

* ``meta`` (gloo): fixed-size header slots, sender -> receiver;
* ``data`` (NCCL when both ends are CUDA devices, else gloo): the packed payload;
* ``credit`` (gloo): credits and the CLOSED notice, receiver -> sender.

Groups are never shared between links or directions, so the two links of a pair never
wait on each other inside one communicator (NCCL's opposite-send deadlock), and no
message is matched by tag (NCCL ignores tags). Within a group, messages between the
two ranks arrive in the order they were posted, which all backends guarantee.

A message travels as: slot [-> overflow header] [-> payload]. The slot carries a small
frame (kind, flags, lengths, send timestamp), the encoded header and, on gloo, payloads
of at most ``inline_max_bytes``. Credits make the receive queue bounded: the sender
starts with ``capacity`` credits, spends one per message, and the receiver returns one
per ``recv``. Receives are posted ahead (``comms.posted``): no rendezvous round trip.

Waiting on an idle link: gloo closes the connection when a ``wait(timeout)`` expires
(measured: the next wait fails with "Application timeout caused pair closure"), so a
timed-out wait cannot be retried. Idle waits therefore use a ten-year timeout, and
background threads end through the protocol instead: the sender's END is answered by
the receiver's CLOSED and vice versa, and a dead peer breaks the connection, which gloo
reports at once. Waits that follow a started transfer use ``peer_timeout_s``; when one
expires the peer counts as stalled and the link as failed. An ``atexit`` hook closes
the live channels and joins their threads, because a process that exits while a
thread is still inside a gloo wait on a broken connection can abort in C++.

Threads per link end: the sender has a credit reader; the receiver has a slot reader
(which also receives payloads) and a credit writer. Exactly one thread sends on each
group direction at a time: ``send``, ``close`` and the credit reader's END serialise on
one lock, and only the credit writer sends on the credit group.
"""

from __future__ import annotations

import atexit
import logging
import struct
import threading
import time
import weakref
from typing import TYPE_CHECKING
from collections import deque
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from comms.channel import Channel, LinkStats
from comms.config import TransportConfig
from comms.errors import ChannelClosed, ChannelTimeout, HeaderError, PeerFailure, TransportError
from comms.header import TensorSpec, align_up, decode_header, encode_for_send, pack_tensors, unpack_tensors
from comms.inprocess import deadline_of, remaining
from comms.message import Message
from comms.posted import Peer, Posted, await_cuda, concise_error, filler, next_prepost

if TYPE_CHECKING:
    from comms.links import LinkSpec

log = logging.getLogger(__name__)

IDLE_WAIT = timedelta(days=3650)
CLOSE_TIMEOUT_S = 2.0
"""Longest ``close`` waits for its END to go out (bounded further by peer_timeout_s)."""

_SLOT = struct.Struct("<4sBBHIQd")  # magic, slot kind, flags, reserved, header_len, payload_len, send time
_SLOT_MAGIC = b"MMS1"
_SLOT_MSG, _SLOT_END = 1, 2
_FLAG_INLINE, _FLAG_OVERFLOW, _FLAG_PAYLOAD, _FLAG_OVERSIZE = 1, 2, 4, 8
_CREDIT, _CLOSED = 1, 2

_live: "weakref.WeakSet[TorchChannel]" = weakref.WeakSet()


class TorchChannel(Channel):
    """One end of a cross-rank link; ``send`` works on the source rank, ``recv`` on the
    destination rank. See the module docstring for the protocol and threads."""

    def __init__(self, spec: LinkSpec, *, rank: int, meta, data, credit, data_backend: str,
                 config: TransportConfig) -> None:
        self.name = spec.name
        self.capacity = config.link_capacity
        self.stats = LinkStats()
        self.spec = spec
        self.is_sender = rank == spec.src_rank
        self._peer = spec.dst_rank if self.is_sender else spec.src_rank
        self._meta, self._data, self._credit = (Peer(g, self._peer) for g in (meta, data, credit))
        self._data_backend = data_backend
        self._prepost = data_backend == "gloo"
        """Gloo data links keep a payload receive posted (see the module docstring)."""
        self._posted_bytes = config.prepost_bytes
        """Size of the payload receive posted at the receiver, tracked by both ends."""
        self._config = config
        self._peer_wait = timedelta(seconds=config.peer_timeout_s)
        self._cond = threading.Condition()
        self._closed = False
        self._failure: str | None = None
        self._threads: list[threading.Thread] = []
        if self.is_sender:
            self._credits = config.link_capacity
            self._peer_closed = False
            self._end_sent = False
            self._send_lock = threading.Lock()
            self._slot = torch.zeros(config.slot_bytes, dtype=torch.uint8)
            self.sent_by_path = {"inline": 0, "payload": 0, "overflow": 0, "oversize": 0, "empty": 0}
            """Messages sent per path: inline / payload / empty say where the payload went;
            overflow counts headers too big for the slot, oversize payloads too big for
            the posted receive (each costs one round trip more)."""
            self._start(self._credit_reader, "credits-in")
        else:
            self._queue: deque[Message] = deque()
            self._ended = False
            self._pending_credits = 0
            self._device = torch.device(spec.dst_device)
            self._posted_data: Posted | None = None
            self._start(self._slot_reader, "slots-in")
            self._start(self._credit_writer, "credits-out")
        _live.add(self)

    # ----------------------------------------------------------------- sender side

    def send(self, msg: Message, timeout: float | None = None) -> None:
        if not self.is_sender:
            raise TransportError(f"link {self.name!r}: rank {self.spec.dst_rank} is the receiving end")
        deadline = deadline_of(timeout)
        specs, total, header = encode_for_send(self.name, msg)
        started = time.monotonic()
        with self._cond:
            has_credit = self._cond.wait_for(
                lambda: self._credits > 0 or self._closed or self._peer_closed or self._failure is not None,
                remaining(deadline))
            self._raise_if_unusable()
            if not has_credit:
                raise ChannelTimeout(f"link {self.name!r}: no credit within {timeout} s "
                                     f"({self.capacity} messages in flight)")
            self._credits -= 1
        try:
            with self._send_lock:
                if self._end_sent:
                    raise ChannelClosed(f"link {self.name!r} is closed")
                self._transmit(msg, header, specs, total)
        except RuntimeError as e:
            if isinstance(e, TransportError):
                raise
            raise PeerFailure(self._fail(f"send to rank {self._peer} failed: {e}")) from None
        self.stats.record_send(msg.payload_bytes, time.monotonic() - started)

    def credits(self) -> int:
        """Free send credits on the sending end; always 0 on the receiving end."""
        if not self.is_sender:
            return 0
        with self._cond:
            if self._closed or self._peer_closed or self._failure is not None:
                return 0
            return self._credits

    def _transmit(self, msg: Message, header: bytes, specs: list[TensorSpec], total: int) -> None:
        slot_bytes = self._config.slot_bytes
        overflow = _SLOT.size + len(header) > slot_bytes
        inline_at = align_up(_SLOT.size + len(header))
        inline = (not overflow and 0 < total <= self._config.inline_max_bytes
                  and self._data_backend == "gloo" and inline_at + total <= slot_bytes)
        payload = total > 0 and not inline
        oversize = payload and self._prepost and total > self._posted_bytes
        flags = ((_FLAG_OVERFLOW if overflow else 0) | (_FLAG_INLINE if inline else 0)
                 | (_FLAG_PAYLOAD if payload else 0) | (_FLAG_OVERSIZE if oversize else 0))
        slot = self._slot.numpy()
        _SLOT.pack_into(slot, 0, _SLOT_MAGIC, _SLOT_MSG, flags, 0, len(header), total, time.time())
        used = _SLOT.size
        keep = []  # buffers that must outlive their transfers
        if overflow:
            keep.append(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        else:
            slot[_SLOT.size:_SLOT.size + len(header)] = np.frombuffer(header, dtype=np.uint8)
            used += len(header)
        if inline:
            flat, _ = pack_tensors(msg.tensors, "cpu", specs)
            self._slot[inline_at:inline_at + total].copy_(flat)
            used = inline_at + total
        works = [self._meta.isend(self._slot[:used])]
        if overflow:
            works.append(self._meta.isend(keep[0]))
        if payload:
            device = self.spec.src_device if self._data_backend == "nccl" else "cpu"
            flat, _ = pack_tensors(msg.tensors, device, specs)
            keep.append(flat)
            if oversize:
                works.append(self._data.isend(filler()))
            works.append(self._data.isend(flat))
            if self._prepost:
                self._posted_bytes = next_prepost(self._posted_bytes, total)
        self._wait_all(works, payload and self._data_backend == "nccl")
        self.sent_by_path["inline" if inline else "payload" if total else "empty"] += 1
        if overflow:
            self.sent_by_path["overflow"] += 1
        if oversize:
            self.sent_by_path["oversize"] += 1

    def _wait_all(self, works: list, last_is_nccl: bool) -> None:
        for i, work in enumerate(works):
            if last_is_nccl and i == len(works) - 1:
                # NCCL's wait only orders the current stream; the buffer must outlive
                # the transfer, so wait for the stream itself.
                work.wait()
                await_cuda(torch.device(self.spec.src_device), "send", self._config.peer_timeout_s)
            else:
                work.wait(timeout=self._peer_wait)

    def _credit_reader(self) -> None:
        buf = torch.zeros(2, dtype=torch.int64)
        try:
            while True:
                self._credit.irecv(buf).wait(timeout=IDLE_WAIT)
                code, count = buf.tolist()
                if code == _CREDIT and 0 < count <= self.capacity:
                    with self._cond:
                        self._credits = min(self.capacity, self._credits + count)
                        self._cond.notify_all()
                elif code == _CLOSED:
                    break
                else:
                    self._fail(f"protocol error: credit message {[code, count]} from rank {self._peer}")
                    return
        except Exception as e:  # RuntimeError from gloo; ValueError once the group is destroyed
            self._fail(f"rank {self._peer} failed (credit link): {e}")
            return
        with self._cond:
            self._peer_closed = True
            self._cond.notify_all()
        # The receiver's slot reader stops only at END, so it gets one even when this
        # side never closes.
        self._send_end(wait_s=self._config.peer_timeout_s)

    def _send_end(self, wait_s: float) -> None:
        if not self._send_lock.acquire(timeout=wait_s):
            log.warning("link %r: a send is still running after %.1f s; END not sent", self.name, wait_s)
            return
        try:
            if self._end_sent or self._failure is not None:
                return
            self._end_sent = True
            _SLOT.pack_into(self._slot.numpy(), 0, _SLOT_MAGIC, _SLOT_END, 0, 0, 0, 0, time.time())
            works = [self._meta.isend(self._slot[:_SLOT.size])]
            if self._prepost:  # completes the payload receive the receiver has posted
                works.append(self._data.isend(filler()))
            for work in works:
                work.wait(timeout=timedelta(seconds=wait_s))
        except Exception as e:
            self._fail(f"END to rank {self._peer} failed: {e}")
        finally:
            self._send_lock.release()

    # --------------------------------------------------------------- receiver side

    def recv(self, timeout: float | None = None) -> Message:
        if self.is_sender:
            raise TransportError(f"link {self.name!r}: rank {self.spec.src_rank} is the sending end")
        deadline = deadline_of(timeout)
        with self._cond:
            self._cond.wait_for(
                lambda: self._queue or self._closed or self._ended or self._failure is not None,
                remaining(deadline))
            if self._closed:
                raise ChannelClosed(f"link {self.name!r} is closed")
            if self._queue:
                msg = self._queue.popleft()
                if not self._ended:
                    self._pending_credits += 1
                    self._cond.notify_all()
                return msg
            if self._failure is not None:
                raise PeerFailure(self._failure)
            if self._ended:
                raise ChannelClosed(f"link {self.name!r}: rank {self._peer} sent END")
        raise ChannelTimeout(f"link {self.name!r}: nothing arrived within {timeout} s")

    def _slot_reader(self) -> None:
        try:
            slots = Posted(self._config.slot_bytes, self._meta)
            if self._prepost:
                self._posted_data = Posted(self._posted_bytes, self._data)
            while True:
                slot = slots.wait(IDLE_WAIT)
                magic, kind, flags, _, header_len, total, sent_at = _SLOT.unpack_from(slot.numpy(), 0)
                if magic != _SLOT_MAGIC or kind not in (_SLOT_MSG, _SLOT_END):
                    raise HeaderError(f"bad slot frame: magic {bytes(magic)!r}, kind {kind}")
                if kind == _SLOT_END:
                    self._take_end_filler()
                    break
                msg = self._assemble(slot, self._header(slot, flags, header_len), flags, header_len, total)
                hop_ms = (time.time() - sent_at) * 1000.0
                with self._cond:
                    if not self._closed:
                        self._queue.append(msg)
                        self._cond.notify_all()
                # The next receives are posted only now, with the message already on its
                # way to the consumer: posting is a call into gloo that would otherwise
                # delay every message. (An overflow header, too, had to come first: it
                # travels on the meta group, where a posted slot receive would take it.)
                slots = Posted(self._config.slot_bytes, self._meta)
                if self._prepost and self._posted_data is None:
                    self._posted_data = Posted(self._posted_bytes, self._data)
                self.stats.record_recv(total, hop_ms)
        except Exception as e:  # gloo errors, a bad header, or a group already destroyed
            self._fail(f"receive from rank {self._peer} failed: {e}")
            return
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def _header(self, slot: torch.Tensor, flags: int, header_len: int) -> memoryview:
        if flags & _FLAG_OVERFLOW:
            extra = torch.empty(header_len, dtype=torch.uint8)
            self._meta.irecv(extra).wait(timeout=self._peer_wait)
            return extra.numpy().data
        if _SLOT.size + header_len > slot.numel():
            raise HeaderError(f"slot claims a {header_len}-byte header without overflow")
        return slot.numpy()[_SLOT.size:_SLOT.size + header_len].data

    def _assemble(self, slot: torch.Tensor, header: memoryview, flags: int, header_len: int,
                  total: int) -> Message:
        """The message of an arrived slot, its payload received and its tensors unpacked."""
        msg, specs = decode_header(header)
        if flags & _FLAG_INLINE:
            inline_at = align_up(_SLOT.size + header_len)
            if inline_at + total > slot.numel():
                raise HeaderError(f"inline payload of {total} bytes does not fit the slot")
            flat = slot[inline_at:inline_at + total]
        elif flags & _FLAG_PAYLOAD:
            flat = self._receive_payload(total, bool(flags & _FLAG_OVERSIZE))
        else:
            flat = torch.empty(0, dtype=torch.uint8)
        if flat.device != self._device:
            flat = flat.to(self._device)
        msg.tensors = unpack_tensors(flat, specs)
        return msg

    def _receive_payload(self, total: int, oversize: bool) -> torch.Tensor:
        if self._data_backend == "nccl":
            flat = torch.empty(total, dtype=torch.uint8, device=self._device)
            self._data.irecv(flat).wait()
            await_cuda(self._device, "receive", self._config.peer_timeout_s)
            return flat
        if oversize != (total > self._posted_bytes):
            raise HeaderError(f"payload of {total} bytes {'marked' if oversize else 'not marked'} oversize, "
                              f"but {self._posted_bytes} bytes are posted")
        posted = self._posted_data.wait(self._peer_wait)
        if oversize:  # what arrived was the filler; the payload follows at its exact size
            flat = torch.empty(total, dtype=torch.uint8)
            self._data.irecv(flat).wait(timeout=self._peer_wait)
        else:
            flat = posted[:total]
        self._posted_bytes = next_prepost(self._posted_bytes, total)
        self._posted_data = None  # the slot reader posts the next one after handing over
        return flat

    def _take_end_filler(self) -> None:
        """END comes with a filler for the posted payload receive: take it, so no receive
        is left posted on the group."""
        if self._posted_data is not None:
            self._posted_data.wait(self._peer_wait)
            self._posted_data = None

    def _credit_writer(self) -> None:
        buf = torch.zeros(2, dtype=torch.int64)
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._pending_credits or self._closed or self._ended
                                        or self._failure is not None)
                    if self._failure is not None:
                        return
                    last = self._closed or self._ended
                    buf[0], buf[1] = (_CLOSED, 0) if last else (_CREDIT, self._pending_credits)
                    self._pending_credits = 0
                self._credit.isend(buf).wait(timeout=self._peer_wait)
                if last:
                    return
        except Exception as e:
            self._fail(f"credit to rank {self._peer} failed: {e}")

    # ------------------------------------------------------------------- both ends

    def close(self) -> None:
        """Close this end. Sender: END goes out (waiting at most ~2 s for a send still
        in progress); the receiver drains what it holds, then gets ChannelClosed.
        Receiver: queued messages are dropped and the sender learns through CLOSED."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            if not self.is_sender:
                self._queue.clear()
            self._cond.notify_all()
        if self.is_sender:
            self._send_end(wait_s=min(CLOSE_TIMEOUT_S, self._config.peer_timeout_s))

    def join(self, timeout: float | None = None) -> bool:
        """Wait for this end's background threads; True when all have stopped."""
        deadline = deadline_of(timeout)
        for thread in self._threads:
            thread.join(remaining(deadline))
        return not any(t.is_alive() for t in self._threads)

    def _raise_if_unusable(self) -> None:
        if self._failure is not None:
            raise PeerFailure(self._failure)
        if self._closed:
            raise ChannelClosed(f"link {self.name!r} is closed")
        if self._peer_closed:
            raise ChannelClosed(f"link {self.name!r}: the receiver (rank {self._peer}) closed it")

    def _fail(self, reason: str) -> str:
        """Mark the link failed (first reason wins) and wake every waiter."""
        with self._cond:
            if self._failure is None:
                self._failure = f"link {self.name!r}: {concise_error(reason)}"
                if self._closed:
                    log.debug("%s (after close)", self._failure)
                else:
                    log.error("%s", self._failure)
            self._cond.notify_all()
            return self._failure

    def _start(self, target, role: str) -> None:
        thread = threading.Thread(target=target, name=f"link-{self.name}-{role}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def __repr__(self) -> str:
        end = "send" if self.is_sender else "recv"
        return (f"TorchChannel({self.name!r}, {end} end, rank {self.spec.src_rank} -> {self.spec.dst_rank}, "
                f"data={self._data_backend}, capacity={self.capacity})")


@atexit.register
def _close_live_channels() -> None:
    if not dist.is_initialized():
        return  # the groups are gone (destroyed after a failure): nothing can be sent on them
    channels = list(_live)
    for channel in channels:
        channel.close()
    deadline = time.monotonic() + CLOSE_TIMEOUT_S
    for channel in channels:
        if not channel.join(max(0.0, deadline - time.monotonic())):
            log.debug("link %r: background threads still running at exit", channel.name)
