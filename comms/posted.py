"""Point-to-point operations on a two-rank process group: the peer, receives posted
ahead of the messages they will hold, bounded waits for NCCL transfers.

Posted ahead: gloo hands a sender's bytes over only once the receiver has posted the
matching receive (a rendezvous), and a receive may be larger than what is sent. So the
receiver keeps ``POSTED_AHEAD`` slot receives posted (``slot_bytes`` each; only the used
part travels), and on gloo data links as many payload receives; a sender then never
waits a round trip for the next receive, and the wire stays busy while the receiver
hands the last message over. Receives of one group match sends in the order both were
posted, which is what ties a payload to its receive (never a tag: NCCL ignores tags).

The payload receives' sizes follow a rule both ends apply to the payload sizes they see
(``PostedSizes``), so the sender knows where each of its bytes lands: a payload larger
than the receive at the front of the queue fills it and continues in the next ones (its
pieces are joined by the receiver), and the receives posted from then on are large
enough for it. END carries a filler for every posted payload receive, so none is left
posted when a link ends. NCCL payloads are received at their exact size once their slot
arrived instead (NCCL needs matching sizes and stream-ordered buffers).
"""

from __future__ import annotations

import time
from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist

POSTED_AHEAD = 2
"""Receives a reader keeps posted per group it receives on (slots; payloads on gloo)."""
PREPOST_MAX = 64 * 2**20
"""The posted payload receives never grow beyond this; a larger payload always travels
in pieces of this size."""
_PREPOST_STEP = 2**20


def next_prepost(posted: int, payload: int) -> int:
    """The payload receive size to post after a ``payload``-byte payload arrived into (or
    next to) a receive of ``posted`` bytes. Both ends of a gloo link call this with the
    same sizes in the same order, so the sender always knows what the receiver posted."""
    if payload <= posted or payload > PREPOST_MAX:
        return posted
    return min(PREPOST_MAX, -(-payload // _PREPOST_STEP) * _PREPOST_STEP)


class PostedSizes:
    """The sizes of a gloo reader's posted payload receives, front first, as both ends
    track them: the reader to post them, the writer to cut each payload to fit."""

    def __init__(self, initial: int, depth: int = POSTED_AHEAD) -> None:
        self.next_size = initial
        """Size of the receive posted next, grown by ``next_prepost``."""
        self.queue = deque([initial] * depth)

    def take(self, total: int) -> list[tuple[int, int]]:
        """The receives a ``total``-byte payload fills, in order, as (bytes of the payload
        in it, size of the receive posted to replace it). One entry when it fits the
        front receive; otherwise the payload continues in the next ones."""
        self.next_size = next_prepost(self.next_size, total)
        pieces, left = [], total
        while True:
            room = self.queue.popleft()
            self.queue.append(self.next_size)
            piece = min(room, left)
            pieces.append((piece, self.next_size))
            left -= piece
            if left == 0:
                return pieces


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

