"""Closing and joining the ends of cross-rank links, on both kinds (torch on gloo, and
same host): ``close`` returns at once whatever the other thread or the peer is doing,
``join`` waits for END within its timeout and no longer.

The stalled peer is a rank stopped with SIGSTOP by the other one, which continues it
before returning (also when it fails), so the shared world stays usable.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
import torch.distributed as dist

from comms import shm
from comms.config import TransportConfig
from comms.errors import ChannelClosed
from comms.link_spec import Transport
from comms.links import create_links
from comms.message import Kind, Message
from tests.comms.gloo_ranks import GlooWorld
from tests.comms.test_torch_p2p import link, make_message

TRANSPORTS = pytest.mark.parametrize("transport", [Transport.TORCH, Transport.SAME_HOST, Transport.TCP],
                                   ids=["gloo", "same-host", "tcp"])
BIG = 32 * 2**20
"""A payload no socket or TCP buffer holds: its send stays in progress while the peer is stopped."""


def in_thread(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the calling thread
            out["error"] = e
        out["ended_at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def timed(fn) -> tuple[object, float]:
    t = time.monotonic()
    value = fn()
    return value, time.monotonic() - t


def _no_memory(name, size):
    raise OSError(12, "Cannot allocate memory")


# ------------------------------------------------------------------ rank functions

def _r_close_while_send_waits_for_credit(rank, world, transport):
    """The writer spends its credits on a reader that does not read yet; a third send
    waits for credit in another thread while the main thread closes."""
    links = create_links([link("credit", transport=transport)], TransportConfig(link_capacity=2))
    if rank == 1:
        reader = links.readers["credit"]
        dist.barrier()  # the writer has closed
        ids = [reader.recv(timeout=5).frame_id for _ in range(2)]
        with pytest.raises(ChannelClosed):
            reader.recv(timeout=5)
        return {"ids": ids, "joined": reader.join(5)}
    writer = links.writers["credit"]
    for i in range(2):
        writer.send(make_message(i), timeout=5)
    thread, blocked = in_thread(lambda: writer.send(make_message(2), timeout=None))
    time.sleep(0.3)
    waiting = thread.is_alive()
    closed_at = time.monotonic()
    writer.close()
    close_s = time.monotonic() - closed_at
    _, again_s = timed(writer.close)
    thread.join(5)
    dist.barrier()
    joined, join_s = timed(lambda: writer.join(5))
    return {"waiting": waiting, "close_s": close_s, "again_s": again_s, "error": blocked.get("error"),
            "woken_s": blocked["ended_at"] - closed_at, "credits": writer.credits(), "joined": joined,
            "join_s": join_s}


def _r_close_to_stalled_peer(rank, world, transport):
    """Rank 0 stops rank 1, starts a send too large to go out while rank 1 is stopped,
    closes, and joins with a short timeout; likewise on a second link, idle, where END
    alone goes out. Then it continues rank 1, which takes the message and both ENDs.
    The same-host link carries the payload in its socket here (as when shared memory
    cannot be had), so that the send stays in progress."""
    create_file = shm.create_file
    if rank == 0 and transport == Transport.SAME_HOST:
        shm.create_file = _no_memory
    try:
        return _close_to_stalled_peer(rank, transport)
    finally:
        shm.create_file = create_file  # the world's processes run later tests too


def _close_to_stalled_peer(rank, transport):
    links = create_links([link("stalled", transport=transport), link("idle", transport=transport)])
    pids = [None, None]
    dist.all_gather_object(pids, os.getpid())
    if rank == 1:
        stalled, idle = links.readers["stalled"], links.readers["idle"]
        dist.barrier()  # rank 0 stops this process right after
        got = stalled.recv(timeout=30)
        for reader in (stalled, idle):
            with pytest.raises(ChannelClosed):
                reader.recv(timeout=10)
        return {"big": got.tensors[0].numel() == BIG and bool((got.tensors[0] == 7).all()),
                "joined": stalled.join(5) and idle.join(5)}
    stalled, idle = links.writers["stalled"], links.writers["idle"]
    dist.barrier()
    os.kill(pids[1], signal.SIGSTOP)
    try:
        payload = torch.full((BIG,), 7, dtype=torch.uint8)
        thread, sending = in_thread(lambda: stalled.send(Message(kind=Kind.DATA, tensors=[payload]), timeout=5))
        time.sleep(0.5)
        in_progress = thread.is_alive()
        _, close_s = timed(stalled.close)
        early, early_join_s = timed(lambda: stalled.join(0.3))
        _, idle_close_s = timed(idle.close)
        idle_early, idle_early_join_s = timed(lambda: idle.join(0.3))
    finally:
        os.kill(pids[1], signal.SIGCONT)
    thread.join(20)
    return {"in_progress": in_progress, "close_s": close_s, "early": early, "early_join_s": early_join_s,
            "idle_close_s": idle_close_s, "idle_early": idle_early, "idle_early_join_s": idle_early_join_s,
            "send_error": sending.get("error"), "joined": stalled.join(20) and idle.join(20),
            "paths": dict(stalled.sent_by_path)}


# ------------------------------------------------------------------------ tests

@pytest.fixture(scope="module")
def world():
    with GlooWorld(2) as w:
        yield w


@pytest.mark.timeout(60)
@TRANSPORTS
def test_close_returns_at_once_and_wakes_a_send_waiting_for_credit(world, transport):
    writer, reader = world.run(_r_close_while_send_waits_for_credit, transport, timeout=30)
    assert writer["waiting"]
    assert writer["close_s"] < 0.05 and writer["again_s"] < 0.05
    assert isinstance(writer["error"], ChannelClosed) and writer["woken_s"] < 0.5
    assert writer["credits"] == 0
    assert reader["ids"] == [0, 1] and reader["joined"]  # the messages sent, then END
    assert writer["joined"] and writer["join_s"] < 2.0


@pytest.mark.timeout(90)
@TRANSPORTS
def test_close_to_a_stalled_peer_returns_at_once_and_join_is_bounded(world, transport):
    writer, reader = world.run(_r_close_to_stalled_peer, transport, timeout=60)
    assert writer["in_progress"], "the send should still be running while the peer is stopped"
    assert writer["close_s"] < 0.05 and writer["idle_close_s"] < 0.05
    assert writer["early"] is False and 0.3 <= writer["early_join_s"] < 0.8  # the send is still running
    assert writer["idle_early"] is False and 0.3 <= writer["idle_early_join_s"] < 0.8  # END not taken
    assert writer["send_error"] is None  # the send in progress finished once the peer went on...
    assert reader["big"] and reader["joined"]  # ...and END followed it
    assert writer["joined"]
    assert writer["paths"]["payload" if transport == Transport.TORCH else "socket"] == 1
