"""Point-to-point operations on a two-rank process group: the peer, receives posted
ahead of the messages they will hold, bounded waits for NCCL transfers.

Posted ahead: gloo hands a sender's bytes over only once the receiver has posted the
matching receive (a rendezvous), and a receive may be larger than what is sent. So the
receiver always keeps the next slot receive posted (``slot_bytes``; only the used part
travels), and on gloo data links also the next payload receive, ``prepost_bytes`` large.
A message then costs no round trip beyond the bytes themselves. Both ends compute the
posted payload size the same way (``next_prepost``) from the payload sizes they have
seen, so the sender knows when a payload would not fit: it marks the slot OVERSIZE,
sends one filler byte into the posted receive, and the payload follows into a receive
of its exact size; the posted size then grows to fit. END carries a filler too, so no
receive is left posted when a link ends. NCCL payloads keep the exact-size receive
posted after the slot arrives (NCCL needs matching sizes and stream-ordered buffers).
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist

PREPOST_MAX = 64 * 2**20
"""The posted payload receive never grows beyond this; larger payloads always go the
OVERSIZE way (one round trip more)."""
_PREPOST_STEP = 2**20


def next_prepost(posted: int, payload: int) -> int:
    """The payload receive size to post after a ``payload``-byte payload arrived into (or
    next to) a receive of ``posted`` bytes. Both ends of a gloo link call this with the
    same sizes in the same order, so the sender always knows what the receiver posted."""
    if payload <= posted or payload > PREPOST_MAX:
        return posted
    return min(PREPOST_MAX, -(-payload // _PREPOST_STEP) * _PREPOST_STEP)


class Peer:
    """The other rank of a two-rank group. Calls the group's own send/recv, which is what
    ``torch.distributed.isend``/``irecv`` end in, without their per-call argument checks
    and rank translation: a message makes several of these calls."""

    __slots__ = ("group", "rank")

    def __init__(self, group, global_rank: int) -> None:
        self.group = group
        self.rank = dist.get_group_rank(group, global_rank)

    def isend(self, tensor: torch.Tensor):
        return self.group.send([tensor], self.rank, 0)

    def irecv(self, tensor: torch.Tensor):
        return self.group.recv([tensor], self.rank, 0)


class Posted:
    """A receive posted ahead of the message it will hold."""

    __slots__ = ("buffer", "work")

    def __init__(self, nbytes: int, peer: Peer) -> None:
        self.buffer = torch.empty(nbytes, dtype=torch.uint8)
        self.work = peer.irecv(self.buffer)

    def wait(self, timeout: timedelta) -> torch.Tensor:
        self.work.wait(timeout=timeout)
        return self.buffer


def filler() -> torch.Tensor:
    """One byte sent into a posted payload receive that its message does not use."""
    return torch.zeros(1, dtype=torch.uint8)


def await_cuda(device: torch.device, what: str, timeout_s: float) -> None:
    """Wait for the NCCL transfer just queued on ``device``'s stream, at most ``timeout_s``:
    a peer that died mid-transfer must surface as a failed link, not block the caller
    until NCCL's watchdog kills the process. (NCCL's own wait only orders the stream.)"""
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    deadline = time.monotonic() + timeout_s
    while not done.query():
        if time.monotonic() > deadline:
            raise RuntimeError(f"NCCL {what} did not complete in {timeout_s} s")
        time.sleep(0.0002)

