"""Links between ranks over torch.distributed point-to-point sends.

Every directed link gets three two-rank process groups of its own, created by all
ranks in the same order (``comms.links.create_links``):

* ``meta`` (gloo): fixed-size header slots, writer -> reader;
* ``data`` (the link's backend: NCCL between two CUDA devices, else gloo): the packed
  payload;
* ``credit`` (gloo): credits and the CLOSED notice, reader -> writer.

Groups are never shared between links or directions, so the two links of a pair never
wait on each other inside one communicator (NCCL's opposite-send deadlock), and no
message is matched by tag (NCCL ignores tags). Within a group, messages between the
two ranks arrive in the order they were posted, which all backends guarantee.

A message travels as: slot [-> overflow header] [-> payload]. The slot carries a small
frame (kind, flags, lengths, send timestamp), the encoded header and, on gloo, payloads
of at most ``inline_max_bytes``. Credits make the receive queue bounded: the writer
starts with ``capacity`` credits, spends one per message, and the reader returns one
per ``recv``. Receives are posted ahead (``comms.posted``): no rendezvous round trip.

Waiting on an idle link: gloo closes the connection when a ``wait(timeout)`` expires
(measured: the next wait fails with "Application timeout caused pair closure"), so a
timed-out wait cannot be retried. Idle waits therefore use a ten-year timeout, and
background threads end through the protocol instead: the writer's END is answered by
the reader's CLOSED and vice versa, and a dead peer breaks the connection, which gloo
reports at once. Waits that follow a started transfer use ``peer_timeout_s``; when one
expires the peer counts as stalled and the link as failed. A writer's ``join`` waits
for its credit reader, which stops once CLOSED came back and END has gone out: gloo
reports a transfer complete only to a wait, and ``join`` must not cut the connection
when its own timeout runs out first.

Threads per link end: the writer has a credit reader; the reader has a slot reader
(which also receives payloads) and a credit writer. Exactly one thread sends on each
group direction at a time: sends and END serialise on one lock (END only once no send
runs, ``comms.endpoint``), and only the credit writer sends on the credit group.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections import deque
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from comms.channel import deadline_of, remaining
from comms.config import TransportConfig
from comms.endpoint import CrossRankReader, CrossRankWriter
from comms.errors import ChannelClosed, ChannelTimeout, HeaderError, PeerFailure, TransportError
from comms.header import TensorSpec, align_up, decode_header, pack_tensors, unpack_tensors
from comms.link_spec import LinkSpec
from comms.message import Message
from comms.posted import Peer, Posted, await_cuda, filler, next_prepost

log = logging.getLogger(__name__)

IDLE_WAIT = timedelta(days=3650)

_SLOT = struct.Struct("<4sBBHIQd")  # magic, slot kind, flags, reserved, header_len, payload_len, send time
_SLOT_MAGIC = b"MMS1"
_SLOT_MSG, _SLOT_END = 1, 2
_FLAG_INLINE, _FLAG_OVERFLOW, _FLAG_PAYLOAD, _FLAG_OVERSIZE = 1, 2, 4, 8
_CREDIT, _CLOSED = 1, 2


class _GroupsOfLink:
    """What both ends of a torch link hold: the peer on each of the link's three groups,
    and the size of the payload receive the reader keeps posted."""

    def _use_groups(self, spec: LinkSpec, meta, data, credit, config: TransportConfig) -> None:
        self._meta, self._data, self._credit = (Peer(g, self._peer) for g in (meta, data, credit))
        self._data_backend = spec.backend
        self._prepost = spec.backend == "gloo"
        """Gloo data links keep a payload receive posted (see the module docstring)."""
        self._posted_bytes = config.prepost_bytes
        """Size of the payload receive posted at the reader, tracked by both ends."""
        self._config = config
        self._peer_wait = timedelta(seconds=config.peer_timeout_s)


class TorchWriter(_GroupsOfLink, CrossRankWriter):
    """The sending end of a torch.distributed link. See the module docstring for the
    protocol and threads."""

    def __init__(self, spec: LinkSpec, *, meta, data, credit, config: TransportConfig) -> None:
        super().__init__(spec, config)
        self._use_groups(spec, meta, data, credit, config)
        self._send_lock = threading.Lock()
        self._slot = torch.zeros(config.slot_bytes, dtype=torch.uint8)
        self._end: list[tuple[object, torch.Tensor]] | None = None
        """END's transfers once posted, each with the buffer it must keep alive."""
        self.sent_by_path = {"inline": 0, "payload": 0, "overflow": 0, "oversize": 0, "empty": 0}
        """Messages sent per path: inline / payload / empty say where the payload went;
        overflow counts headers too big for the slot, oversize payloads too big for
        the posted receive (each costs one round trip more)."""
        self._credit_thread = _start_thread(self._credit_reader, self.name, "credits-in")

    def _deliver(self, msg: Message, header: bytes, specs: list[TensorSpec], total: int,
                 deadline: float | None, timeout: float | None) -> None:
        with self._cond:
            has_credit = self._cond.wait_for(
                lambda: self._credits > 0 or self._closed or self._peer_closed or self._failure is not None,
                remaining(deadline))
            self._raise_if_unusable()
            if not has_credit:
                raise self._no_credit(timeout)
            self._credits -= 1
        try:
            with self._send_lock:
                self._transmit(msg, header, specs, total)
        except RuntimeError as e:
            if isinstance(e, TransportError):
                raise
            raise PeerFailure(self._fail(f"send to rank {self._peer} failed: {e}")) from None

    def credits(self) -> int:
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
            post_end = self._claim_end()
        if post_end:
            self._post_end()
        self._await_end()

    def _await_end(self) -> None:
        """Wait until END has gone out: posted by this thread just now, by ``close``, or
        by a send still running (bounded by ``peer_timeout_s``) as it finishes. The
        reader, which has answered, takes it at once."""
        with self._cond:
            self._cond.wait_for(lambda: self._end is not None or self._failure is not None)
        try:
            for work, _ in self._end or []:
                work.wait(timeout=self._peer_wait)
        except Exception as e:
            self._fail(f"END to rank {self._peer} failed: {e}")

    def _end_wanted(self) -> bool:
        # The reader's slot reader stops only at END, so it gets one even when this
        # end never closes.
        return self._closed or self._peer_closed

    def _post_end(self) -> None:
        with self._send_lock:
            try:
                _SLOT.pack_into(self._slot.numpy(), 0, _SLOT_MAGIC, _SLOT_END, 0, 0, 0, 0, time.time())
                end_slot = self._slot[:_SLOT.size]
                end = [(self._meta.isend(end_slot), end_slot)]
                if self._prepost:  # completes the payload receive the reader has posted
                    end_filler = filler()
                    end.append((self._data.isend(end_filler), end_filler))
            except Exception as e:
                self._fail(f"END to rank {self._peer} failed: {e}")
                return
        with self._cond:
            self._end = end
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """True once no send is running and the credit reader has stopped: at the
        reader's CLOSED, with END gone out after it, or at a failure."""
        deadline = deadline_of(timeout)
        if not self._sends_finished(deadline):
            return False
        self._credit_thread.join(remaining(deadline))
        return not self._credit_thread.is_alive()

    def _closable_at_exit(self) -> bool:
        return dist.is_initialized()  # once the groups are destroyed, nothing can be sent on them


class TorchReader(_GroupsOfLink, CrossRankReader):
    """The receiving end of a torch.distributed link. See the module docstring for the
    protocol and threads."""

    def __init__(self, spec: LinkSpec, *, meta, data, credit, config: TransportConfig) -> None:
        super().__init__(spec, config)
        self._use_groups(spec, meta, data, credit, config)
        self._queue: deque[Message] = deque()
        self._pending_credits = 0
        self._device = torch.device(spec.dst_device)
        self._posted_data: Posted | None = None
        self._threads = [_start_thread(self._slot_reader, self.name, "slots-in"),
                         _start_thread(self._credit_writer, self.name, "credits-out")]

    def recv(self, timeout: float | None = None) -> Message:
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
                raise self._ended_error()
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

    def _tell_writer_closed(self) -> None:
        # The credit writer, woken by close, sends CLOSED; the slot reader runs on until
        # the writer's END, dropping what arrives.
        with self._cond:
            self._queue.clear()

    def join(self, timeout: float | None = None) -> bool:
        """True once both threads have stopped: the writer's END arrived (or the link
        failed) and CLOSED went back."""
        deadline = deadline_of(timeout)
        for thread in self._threads:
            thread.join(remaining(deadline))
        return not any(thread.is_alive() for thread in self._threads)

    def _closable_at_exit(self) -> bool:
        return dist.is_initialized()  # once the groups are destroyed, nothing can be sent on them


def _start_thread(target, link: str, role: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=f"link-{link}-{role}", daemon=True)
    thread.start()
    return thread
