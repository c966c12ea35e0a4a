"""Socket links (SocketWriter / SocketReader) across real processes: same-host (Unix
socket + shared memory) and TCP (between hosts; here on loopback).

What is particular to these links: payloads in shared memory (segments handed over as
file descriptors, growing on demand), a fallback when shared memory cannot be had,
payloads in the TCP stream, a blocked ``recv`` woken by ``close``, bad frames. Credits,
END / CLOSED and a killed peer are tested on every link kind in test_torch_p2p.py,
closing and joining in test_close.py.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch
import torch.distributed as dist

from comms import shm
from comms.config import TransportConfig
from comms.errors import ChannelClosed, ChannelTimeout, PeerFailure
from comms.header import encode_header
from comms.link_spec import LinkSpec, Transport
from comms.links import create_links
from comms.message import Kind, Message
from comms.socket_link import ANNOUNCE, FRAME, SHM, SHM_NEW, SocketWriter
from comms.socket_reader import SocketReader
from tests.comms.gloo_ranks import GlooWorld
from tests.comms.test_torch_p2p import link, make_message, my_end, same_message

INLINE_MAX_BYTES = TransportConfig().inline_max_bytes


def local(name: str, src: int = 0, dst: int = 1) -> LinkSpec:
    return link(name, src, dst, transport=Transport.SAME_HOST)


def _no_memory(name, size):
    raise OSError(12, "Cannot allocate memory")


def _r_order_and_paths(rank, world, shared_memory_works):
    """Mixed messages in order, byte for byte; the segment grows twice on the way.
    Without shared memory the sender cannot create segments (this rank only)."""
    create_file = shm.create_file
    if not shared_memory_works:
        shm.create_file = _no_memory
    try:
        return _order_and_paths(rank)
    finally:
        shm.create_file = create_file  # the world's processes run later tests too


def _order_and_paths(rank, transport=Transport.SAME_HOST):
    ch = my_end(create_links([link("same#0->host#0", transport=transport)]), "same#0->host#0")
    messages = [make_message(i) for i in range(60)]
    messages += [Message(kind=Kind.DATA, frame_id=100 + i, tensors=[torch.full((n,), i, dtype=torch.uint8)])
                 for i, n in enumerate([3 * 2**20, 100_000, 5 * 2**20 + 1, 70_000, INLINE_MAX_BYTES, 0])]
    if rank == 0:
        for m in messages:
            ch.send(m, timeout=10)
        ch.close()
        joined = ch.join(10)
        return {"kind": type(ch).__name__, "paths": dict(ch.sent_by_path), "off": ch._shm and ch._shm.off_reason,
                "joined": joined}
    ok = [same_message(ch.recv(timeout=10), m) for m in messages]
    with pytest.raises(ChannelClosed):
        ch.recv(timeout=5)
    return {"ok": ok, "received": ch.stats.messages_received}


def _r_idle_and_woken(rank, world):
    """An idle receiver times out cleanly again and again; a recv blocked with no
    timeout returns ChannelClosed when another thread closes the link."""
    links = create_links([local("idle"), local("woken")])
    if rank == 0:
        time.sleep(1.2)
        links.writers["idle"].send(make_message(5), timeout=5)
        links.writers["idle"].close()
        dist.barrier()
        links.writers["woken"].close()
        return None
    timeouts = 0
    while True:
        try:
            msg = links.readers["idle"].recv(timeout=0.2)
            break
        except ChannelTimeout:
            timeouts += 1
    errors = []

    def blocked():
        try:
            links.readers["woken"].recv()
        except ChannelClosed as e:
            errors.append(e)

    thread = threading.Thread(target=blocked)
    thread.start()
    time.sleep(0.2)
    t = time.monotonic()
    links.readers["woken"].close()
    close_s = time.monotonic() - t
    thread.join(5)
    dist.barrier()
    return {"timeouts": timeouts, "ok": same_message(msg, make_message(5)),
            "woken": bool(errors) and not thread.is_alive(), "woken_s": time.monotonic() - t, "close_s": close_s}


# ------------------------------------------------------------------------ tests

@pytest.fixture(scope="module")
def world():
    with GlooWorld(2) as w:
        yield w


@pytest.mark.timeout(60)
def test_messages_arrive_in_order_byte_exact_with_payloads_in_shared_memory(world):
    sender, receiver = world.run(_r_order_and_paths, True, timeout=50)
    assert sender["kind"] == "SocketWriter" and sender["off"] is None and sender["joined"]
    assert all(receiver["ok"]) and receiver["received"] == 66
    paths = sender["paths"]
    assert paths["shm"] >= 20 and paths["inline"] > 0 and paths["empty"] > 0 and paths["socket"] == 0


@pytest.mark.timeout(60)
def test_without_shared_memory_payloads_travel_in_the_socket(world):
    sender, receiver = world.run(_r_order_and_paths, False, timeout=50)
    assert all(receiver["ok"])
    assert "cannot create" in sender["off"]
    assert sender["paths"]["shm"] == 0 and sender["paths"]["socket"] >= 20


def _r_tcp_order_and_paths(rank, world):
    return _order_and_paths(rank, Transport.TCP)


@pytest.mark.timeout(60)
def test_a_tcp_link_carries_every_payload_in_its_stream_in_order_byte_exact(world):
    sender, receiver = world.run(_r_tcp_order_and_paths, timeout=50)
    assert sender["kind"] == "SocketWriter" and sender["joined"]
    assert all(receiver["ok"]) and receiver["received"] == 66
    paths = sender["paths"]
    assert paths["shm"] == 0 and paths["socket"] >= 20 and paths["inline"] > 0 and paths["empty"] > 0


@pytest.mark.timeout(60)
def test_idle_link_times_out_cleanly_and_close_wakes_a_blocked_recv(world):
    _, receiver = world.run(_r_idle_and_woken, timeout=30)
    assert receiver["ok"] and receiver["timeouts"] >= 3
    assert receiver["woken"] and receiver["woken_s"] < 2.0 and receiver["close_s"] < 0.05


# ------------------------------------------------ one process, a socket pair: bad frames

def socket_pair() -> tuple[SocketWriter, SocketReader, socket.socket]:
    """Writer and reader joined by a socketpair, plus a raw handle on the writer's socket
    for writing hand-made frames."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd_a, fd_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    spec, config = local("pair"), TransportConfig(peer_timeout_s=1.0)
    return SocketWriter(spec, a, fd_a, config), SocketReader(spec, b, fd_b, config), a


def raw_frame(kind: int, flags: int = 0, header: bytes = b"", extra: bytes = b"", total: int = 0) -> bytes:
    return FRAME.pack(kind, flags, 0, len(header), total, time.time()) + header + extra


def test_a_segment_announced_without_its_descriptor_fails_the_link_clearly():
    sender, receiver, raw = socket_pair()
    header = encode_header(Message(kind=Kind.DATA, tensors=[torch.zeros(100_000, dtype=torch.uint8)]))
    raw.sendall(raw_frame(1, SHM | SHM_NEW, header, ANNOUNCE.pack(2**20, 2), 100_000))
    with pytest.raises(PeerFailure, match="bad frame"):
        receiver.recv(timeout=1)
    with pytest.raises(PeerFailure):  # the stream is out of step now: the link stays failed
        receiver.recv(timeout=0)


def test_an_unknown_frame_kind_or_a_truncated_frame_fails_the_link():
    _, receiver, raw = socket_pair()
    raw.sendall(raw_frame(7))
    with pytest.raises(PeerFailure, match="protocol error"):
        receiver.recv(timeout=1)
    _, receiver, raw = socket_pair()
    raw.sendall(raw_frame(1, header=b"\x00" * 10))  # announces 10 header bytes, then garbage
    with pytest.raises(PeerFailure, match="bad frame"):
        receiver.recv(timeout=1)
    _, receiver, raw = socket_pair()
    raw.sendall(raw_frame(1, header=b"x" * 8)[:-4])  # the rest never comes
    t = time.monotonic()
    with pytest.raises(PeerFailure, match="stalled mid-message"):
        receiver.recv(timeout=5)
    assert time.monotonic() - t < 3.0  # peer_timeout_s, not the recv timeout


def test_a_sender_that_vanishes_without_end_is_a_peer_failure_not_an_end():
    sender, receiver, raw = socket_pair()
    sender.send(Message(kind=Kind.EVENT), timeout=1)
    raw.close()
    assert receiver.recv(timeout=1).kind == Kind.EVENT
    with pytest.raises(PeerFailure, match="without END"):
        receiver.recv(timeout=1)
