"""The receiving end of a torch.distributed link (``TorchReader``); the protocol, its
threads and the sending end are in ``comms.torch_p2p``.

One thread per reader, the arrival thread, waits for each slot (and its continuation and
payload), records what arrived and keeps the receives posted; ``recv`` decodes on the
caller's thread and sends the credit from there, without waiting for it to go out.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from comms.channel import deadline_of, remaining
from comms.config import TransportConfig
from comms.endpoint import CrossRankReader
from comms.errors import ChannelClosed, ChannelTimeout, HeaderError, PeerFailure
from comms.header import align_up, decode_header, unpack_tensors
from comms.link_spec import LinkSpec
from comms.message import Message
from comms.posted import POSTED_AHEAD, Posted, await_cuda
from comms.torch_p2p import (CLOSED, CREDIT, FLAG_INLINE, FLAG_OVERFLOW, FLAG_OVERSIZE, FLAG_PAYLOAD, IDLE_WAIT,
                             SLOT, SLOT_END, SLOT_MAGIC, SLOT_MSG, GroupsOfLink, start_thread)

CREDIT_SENDS_AHEAD = 2
"""Credit sends a reader leaves unwaited: the oldest is waited for (long finished, as the
writer keeps a credit receive posted) only when one more goes out."""


class _Arrival(NamedTuple):
    """A message as the arrival thread leaves it for ``recv``: not decoded yet."""

    header: memoryview
    payload: torch.Tensor
    """The packed tensors (a view into the receive buffer where possible)."""
    total: int
    sent_at: float
    arrived_at: float


class TorchReader(GroupsOfLink, CrossRankReader):
    """The receiving end of a torch.distributed link. See the module docstring for the
    protocol and threads."""

    def __init__(self, spec: LinkSpec, *, meta, data, credit, config: TransportConfig) -> None:
        super().__init__(spec, config)
        self._use_groups(spec, meta, data, credit, config)
        self._queue: deque[_Arrival] = deque()
        self._device = torch.device(spec.dst_device)
        self._credit_lock = threading.Lock()
        self._credit_sends: deque[tuple[object, torch.Tensor]] = deque()
        """Credit (and CLOSED) sends not waited for yet, each with its buffer."""
        self._closed_sent = False
        self._thread = start_thread(self._arrivals, self.name, "arrivals")

    def recv(self, timeout: float | None = None) -> Message:
        deadline = deadline_of(timeout)
        with self._state:  # a message already waiting: no condition needed
            arrival = self._queue.popleft() if self._queue and not self._closed else None
        if arrival is None:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed or self._ended or self._failure is not None,
                                    remaining(deadline))
                if self._closed:
                    raise ChannelClosed(f"link {self.name!r} is closed")
                if self._queue:
                    arrival = self._queue.popleft()
                elif self._failure is not None:
                    raise PeerFailure(self._failure)
                elif self._ended:
                    raise self._ended_error()
                else:
                    raise ChannelTimeout(f"link {self.name!r}: nothing arrived within {timeout} s")
        msg = self._decode(arrival)
        self._send_credit(CREDIT, 1)  # after END, CLOSED has gone out instead, and this does nothing
        self.stats.record_recv(arrival.total, (arrival.arrived_at - arrival.sent_at) * 1000.0)
        return msg

    def _decode(self, arrival: _Arrival) -> Message:
        try:
            msg, specs = decode_header(arrival.header)
            payload = arrival.payload
            if payload.device != self._device:
                payload = payload.to(self._device)
            msg.tensors = unpack_tensors(payload, specs)
            return msg
        except HeaderError as e:
            raise PeerFailure(self._fail(f"bad message from rank {self._peer}: {e}")) from None

    def _send_credit(self, code: int, count: int) -> None:
        """Start a credit (or CLOSED, once) on its way from the caller's thread; the send
        before the previous one is waited for, bounded, to keep the buffers few."""
        stale = None
        with self._credit_lock:
            if self._closed_sent:
                return
            self._closed_sent = code == CLOSED
            buf = torch.tensor([code, count], dtype=torch.int64)
            try:
                self._credit_sends.append((self._credit.isend(buf), buf))
            except Exception as e:  # the group is broken or gone
                self._fail(f"credit to rank {self._peer} failed: {e}")
                return
            if len(self._credit_sends) > CREDIT_SENDS_AHEAD:
                stale = self._credit_sends.popleft()
        if stale is not None:
            try:
                stale[0].wait(timeout=self._peer_wait)
            except Exception as e:
                self._fail(f"credit to rank {self._peer} failed: {e}")

    def _arrivals(self) -> None:
        """Wait for each slot (and its continuation and payload), queue it for ``recv``,
        and keep the receives posted; until END or a failure."""
        try:
            slots = deque(Posted(self._config.slot_bytes, self._meta) for _ in range(POSTED_AHEAD))
            data = deque(Posted(size, self._data) for size in self._sizes.queue) if self._sizes else None
            while True:
                slot = slots.popleft().wait(IDLE_WAIT)
                magic, kind, flags, _, header_len, total, sent_at = SLOT.unpack_from(slot.numpy(), 0)
                if magic != SLOT_MAGIC or kind not in (SLOT_MSG, SLOT_END):
                    raise HeaderError(f"bad slot frame: magic {bytes(magic)!r}, kind {kind}")
                if kind == SLOT_END:
                    self._take_end(slots, data)
                    break
                header = self._header(slot, slots, flags, header_len)
                payload = self._payload(slot, data, flags, header_len, total)
                arrival = _Arrival(header, payload, total, sent_at, time.time())
                # Replaced before the hand-over, not after: woken, ``recv`` needs the GIL,
                # and this thread should then give it up at once, in its next wait.
                slots.append(Posted(self._config.slot_bytes, self._meta))
                with self._cond:
                    if not self._closed:
                        self._queue.append(arrival)
                        self._cond.notify()
        except Exception as e:  # gloo errors, a bad frame, or a group already destroyed
            self._fail(f"receive from rank {self._peer} failed: {e}")
            return
        with self._cond:
            self._ended = True
            self._cond.notify_all()
        self._send_credit(CLOSED, 0)
        # The writer takes every credit up to CLOSED, at once: wait for them here. Until a
        # send completes its buffer must live, and this end may be dropped unjoined.
        self._flush_credit_sends()

    def _header(self, slot: torch.Tensor, slots: deque[Posted], flags: int, header_len: int) -> memoryview:
        in_slot = min(header_len, slot.numel() - SLOT.size)
        first = slot.numpy()[SLOT.size:SLOT.size + in_slot]
        more = self._continuation_slots(header_len)
        if bool(flags & FLAG_OVERFLOW) != (more > 0):
            raise HeaderError(f"a {header_len}-byte header {'marked' if flags & FLAG_OVERFLOW else 'not marked'} "
                              f"as continuing beyond its slot")
        if not more:
            return first.data
        parts, left = [first], header_len - in_slot
        for _ in range(more):  # each continuation slot is replaced at once: the writer sends them together
            part = slots.popleft().wait(self._peer_wait)
            slots.append(Posted(self._config.slot_bytes, self._meta))
            parts.append(part.numpy()[:min(left, part.numel())])
            left -= parts[-1].size
        return np.concatenate(parts).data

    def _payload(self, slot: torch.Tensor, data: deque[Posted] | None, flags: int, header_len: int,
                 total: int) -> torch.Tensor:
        """The packed tensors of an arrived slot: inline, received into the posted payload
        receives (gloo), or received at their exact size (NCCL)."""
        if flags & FLAG_INLINE:
            inline_at = align_up(SLOT.size + header_len)
            if inline_at + total > slot.numel():
                raise HeaderError(f"inline payload of {total} bytes does not fit the slot")
            return slot[inline_at:inline_at + total]
        if not flags & FLAG_PAYLOAD:
            return torch.empty(0, dtype=torch.uint8)
        if data is None:  # NCCL
            flat = torch.empty(total, dtype=torch.uint8, device=self._device)
            self._data.irecv(flat).wait()
            await_cuda(self._device, "receive", self._config.peer_timeout_s)
            return flat
        pieces = self._sizes.take(total)
        if bool(flags & FLAG_OVERSIZE) != (len(pieces) > 1):
            raise HeaderError(f"payload of {total} bytes {'marked' if flags & FLAG_OVERSIZE else 'not marked'} "
                              f"oversize, but {pieces[0][0]} bytes of it fit the receive posted for it")
        parts = []
        for piece, next_size in pieces:
            parts.append(data.popleft().wait(self._peer_wait)[:piece])
            data.append(Posted(next_size, self._data))  # at once: the next message may be on its way
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _take_end(self, slots: deque[Posted], data: deque[Posted] | None) -> None:
        """END fills every receive still posted (``TorchWriter._post_end``): take them all,
        so none is left posted on the groups."""
        for posted in [*slots, *(data or ())]:
            posted.wait(self._peer_wait)

    def _tell_writer_closed(self) -> None:
        # The arrival thread runs on until the writer's END, dropping what arrives.
        with self._cond:
            self._queue.clear()
        self._send_credit(CLOSED, 0)

    def join(self, timeout: float | None = None) -> bool:
        """True once the arrival thread stopped (the writer's END arrived, or the link
        failed) and CLOSED, with every credit before it, went out."""
        deadline = deadline_of(timeout)
        self._thread.join(remaining(deadline))
        if self._thread.is_alive():
            return False
        self._flush_credit_sends()
        return True

    def _flush_credit_sends(self) -> None:
        """Wait for every credit (and CLOSED) send still unwaited: the writer takes them
        all, up to CLOSED, at once; a dead writer fails them at once."""
        with self._credit_lock:
            sends, self._credit_sends = list(self._credit_sends), deque()
        for work, _ in sends:
            try:
                work.wait(timeout=self._peer_wait)
            except Exception as e:
                self._fail(f"credit to rank {self._peer} failed: {e}")

    def _closable_at_exit(self) -> bool:
        return dist.is_initialized()  # once the groups are destroyed, nothing can be sent on them
