"""Links between ranks over torch.distributed point-to-point sends: the protocol, and
the sending end (``TorchWriter``; the receiving end is ``comms.torch_reader``).

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

A message travels as: slot [-> header continuation slots] [-> payload]. The slot
carries a small frame (kind, flags, lengths, send timestamp), the encoded header and,
on gloo, payloads of at most ``inline_max_bytes``; a header too long for one slot
continues in the next slots. Receives are posted ahead (``comms.posted``): no
rendezvous round trip, and the next message can travel while the reader hands the last
one over. Credits make the receive queue bounded: the writer starts with ``capacity``
credits, spends one per message, and the reader returns one per ``recv``.

Where the time goes, and why the work is split as it is: gloo reports a finished
receive only to a blocking ``wait``, so every group a rank receives on needs a thread
waiting on it; and every torch or gloo call releases the GIL, so each extra Python
thread that wakes per message makes the others wait for it (measured on 2 cores: a
credit thread per message cost more than the rest of the receive path together). So
per message exactly one background thread wakes on each side: the reader's arrival
thread, which only waits, records what arrived and posts the next receives, and the
writer's credit thread. Decoding the header happens in ``recv`` on the caller's thread,
and the caller sends the credit itself, without waiting for it to go out.

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

Exactly one thread sends on each group direction at a time: a writer's sends and END
serialise on one lock (END only once no send runs, ``comms.endpoint``); a reader's
credits and CLOSED on another.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from comms.channel import deadline_of, remaining
from comms.config import TransportConfig
from comms.endpoint import CrossRankWriter
from comms.errors import PeerFailure, TransportError
from comms.header import TensorSpec, align_up, pack_tensors
from comms.link_spec import LinkSpec
from comms.message import Message
from comms.posted import POSTED_AHEAD, Peer, PostedSizes, await_cuda, filler

log = logging.getLogger(__name__)

IDLE_WAIT = timedelta(days=3650)

SLOT = struct.Struct("<4sBBHIQd")  # magic, slot kind, flags, reserved, header_len, payload_len, send time
SLOT_MAGIC = b"MMS1"
SLOT_MSG, SLOT_END = 1, 2
FLAG_INLINE, FLAG_OVERFLOW, FLAG_PAYLOAD, FLAG_OVERSIZE = 1, 2, 4, 8
CREDIT, CLOSED = 1, 2
"""Codes of the credit group's messages, reader -> writer."""


# The slot frame and codes above, ``GroupsOfLink`` and ``start_thread`` are shared with
# the reading end, ``comms.torch_reader.TorchReader``.


class GroupsOfLink:
    """What both ends of a torch link hold: the peer on each of the link's three groups,
    and the payload receives the reader keeps posted, as both ends track them."""

    def _use_groups(self, spec: LinkSpec, meta, data, credit, config: TransportConfig) -> None:
        self._meta, self._data, self._credit = (Peer(g, self._peer) for g in (meta, data, credit))
        self._data_backend = spec.backend
        self._sizes = PostedSizes(config.prepost_bytes) if spec.backend == "gloo" else None
        """Gloo payload receives posted ahead (``comms.posted``); None on NCCL, whose
        payloads are received at their exact size."""
        self._config = config
        self._peer_wait = timedelta(seconds=config.peer_timeout_s)

    def _continuation_slots(self, header_len: int) -> int:
        """Slots after the first that a ``header_len``-byte header continues in."""
        rest = header_len - (self._config.slot_bytes - SLOT.size)
        return max(0, -(-rest // self._config.slot_bytes))


class TorchWriter(GroupsOfLink, CrossRankWriter):
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
        overflow counts headers that continued beyond their slot, oversize payloads that
        did not fit the receive posted for them and continued in the next ones."""
        self._credit_thread = start_thread(self._credit_reader, self.name, "credits-in")

    def _deliver(self, msg: Message, header: bytes, specs: list[TensorSpec], total: int,
                 deadline: float | None, timeout: float | None) -> None:
        with self._state:  # the common case, a credit at hand, without the condition's overhead
            has_credit = self._credits > 0 and not (self._closed or self._peer_closed or self._failure)
            if has_credit:
                self._credits -= 1
        if not has_credit:
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
        overflow = SLOT.size + len(header) > slot_bytes
        inline_at = align_up(SLOT.size + len(header))
        inline = (not overflow and 0 < total <= self._config.inline_max_bytes
                  and self._sizes is not None and inline_at + total <= slot_bytes)
        payload = total > 0 and not inline
        pieces = [piece for piece, _ in self._sizes.take(total)] if payload and self._sizes else [total]
        oversize = len(pieces) > 1
        flags = ((FLAG_OVERFLOW if overflow else 0) | (FLAG_INLINE if inline else 0)
                 | (FLAG_PAYLOAD if payload else 0) | (FLAG_OVERSIZE if oversize else 0))
        slot = self._slot.numpy()
        SLOT.pack_into(slot, 0, SLOT_MAGIC, SLOT_MSG, flags, 0, len(header), total, time.time())
        in_slot = min(len(header), slot_bytes - SLOT.size)
        slot[SLOT.size:SLOT.size + in_slot] = np.frombuffer(header, dtype=np.uint8, count=in_slot)
        used = SLOT.size + in_slot
        if inline:
            flat, _ = pack_tensors(msg.tensors, "cpu", specs)
            self._slot[inline_at:inline_at + total].copy_(flat)
            used = inline_at + total
        works = [self._meta.isend(self._slot[:used])]
        keep = []  # buffers that must outlive their transfers
        if overflow:
            rest = torch.frombuffer(bytearray(header[in_slot:]), dtype=torch.uint8)
            keep.append(rest)
            works += [self._meta.isend(rest[at:at + slot_bytes]) for at in range(0, rest.numel(), slot_bytes)]
        if payload:
            device = self.spec.src_device if self._data_backend == "nccl" else "cpu"
            flat, _ = pack_tensors(msg.tensors, device, specs)
            keep.append(flat)
            at = 0
            for piece in pieces:
                works.append(self._data.isend(flat[at:at + piece]))
                at += piece
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
                if code == CREDIT and 0 < count <= self.capacity:
                    with self._cond:
                        self._credits = min(self.capacity, self._credits + count)
                        self._cond.notify_all()
                elif code == CLOSED:
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
        # The reader's arrival thread stops only at END, so it gets one even when this
        # end never closes.
        return self._closed or self._peer_closed

    def _post_end(self) -> None:
        """END fills every slot receive the reader keeps posted (it stops at the first),
        and a filler every payload receive, so nothing is left posted on the groups."""
        with self._send_lock:
            try:
                end_slot = torch.zeros(SLOT.size, dtype=torch.uint8)
                SLOT.pack_into(end_slot.numpy(), 0, SLOT_MAGIC, SLOT_END, 0, 0, 0, 0, time.time())
                end = [(self._meta.isend(end_slot), end_slot) for _ in range(POSTED_AHEAD)]
                for _ in self._sizes.queue if self._sizes else ():
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


def start_thread(target, link: str, role: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=f"link-{link}-{role}", daemon=True)
    thread.start()
    return thread
