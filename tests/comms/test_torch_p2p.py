"""Torch links (TorchWriter / TorchReader) across real gloo ranks (spawned processes, no
mocks); the contract tests parametrized by ``transport`` run on the same-host link
(SocketWriter / SocketReader) as well (its own particulars are in test_socket_link.py,
closing and joining in test_close.py).

Rank functions (``_r_*``) run on every rank of a ``GlooWorld``; the tests assert on
what they return. One two-rank world is shared by most tests to keep spawn costs down;
the failure test kills a rank, so it gets a world of its own.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from comms.config import TransportConfig
from comms.errors import ChannelClosed, ChannelTimeout, PeerFailure
from comms.link_spec import LinkSpec, Transport
from comms.links import LinkEnds, create_links
from comms.message import Kind, Message
from comms.posted import PREPOST_MAX, PostedSizes, next_prepost
from tests.comms.gloo_ranks import GlooWorld

DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
          torch.bfloat16, torch.float32, torch.float64, torch.bool]


def make_message(i: int) -> Message:
    """Deterministic message ``i``: both ranks build the same one to compare bytes."""
    g = torch.Generator().manual_seed(i)
    tensors = []
    for j in range(i % 4):
        dtype = DTYPES[(i + j) % len(DTYPES)]
        shape = [(), (0,), (7,), (3, 5, 2), (64, 48, 3), (480, 640, 3)][(i * 7 + j) % 6]
        raw = torch.randint(0, 256, (max(1, torch.Size(shape).numel() * dtype.itemsize),), generator=g,
                            dtype=torch.uint8)
        if dtype == torch.bool:
            raw &= 1  # any other byte is not a valid bool and copies would normalise it
        t = raw[:torch.Size(shape).numel() * dtype.itemsize].view(dtype).reshape(shape)
        if t.dim() >= 2 and j % 2:
            t = t.transpose(0, 1)  # non-contiguous on the sender
        tensors.append(t)
    return Message(kind=Kind.DATA, session=f"s{i % 3}", frame_id=i, revision=i // 10, capture_ts=i * 1.5,
                   trace=[("src", 1000.0 + i)], meta={"i": i, "faces": [[1, 2, 3, 4]] * (i % 3)},
                   tensors=tensors)


def link(name: str, src: int = 0, dst: int = 1, transport: Transport = Transport.TORCH) -> LinkSpec:
    """A link between two ranks as the planner declares it (torch links on gloo)."""
    return LinkSpec(name=name, src_rank=src, dst_rank=dst, transport=transport,
                    backend="gloo" if transport == Transport.TORCH else None)


def my_end(ends: LinkEnds, name: str):
    """This rank's end of cross-rank link ``name``: its writer or its reader."""
    return ends.writers[name] if name in ends.writers else ends.readers[name]


def same_message(a: Message, b: Message) -> bool:
    return (a.kind == b.kind and a.session == b.session and a.frame_id == b.frame_id
            and a.revision == b.revision and a.capture_ts == b.capture_ts and a.trace == b.trace
            and a.meta == b.meta and len(a.tensors) == len(b.tensors)
            and all(x.dtype == y.dtype and x.shape == y.shape
                    and torch.equal(x.contiguous().reshape(-1).view(torch.uint8),
                                    y.contiguous().reshape(-1).view(torch.uint8))
                    for x, y in zip(a.tensors, b.tensors)))


# ------------------------------------------------------------------ rank functions

def _r_order(rank, world, n):
    ch = my_end(create_links([link("order")]), "order")
    if rank == 0:
        for i in range(n):
            ch.send(make_message(i), timeout=10)
        ch.close()
        return dict(ch.sent_by_path)
    mismatches = [i for i in range(n) if not same_message(ch.recv(timeout=10), make_message(i))]
    with pytest.raises(ChannelClosed):
        ch.recv(timeout=5)
    return {"mismatches": mismatches, "received": ch.stats.messages_received, "joined": ch.join(5)}


def _r_paths(rank, world):
    # 1 KiB posted ahead: the 2400 B payload does not fit (oversize) and grows it to 1 MiB;
    # the first 2 MiB payload is oversize again, the second fits.
    config = TransportConfig(slot_bytes=4096, inline_max_bytes=2048, prepost_bytes=1024)
    ch = my_end(create_links([link("paths")], config), "paths")
    messages = [
        Message(kind=Kind.EVENT, meta={"x": 1}),  # empty
        Message(kind=Kind.DATA, tensors=[torch.arange(500, dtype=torch.int32)]),  # 2000 B inline
        Message(kind=Kind.DATA, tensors=[torch.arange(600, dtype=torch.int32)]),  # 2400 B payload
        Message(kind=Kind.STATUS, meta={"big": "x" * 10000}),  # overflow, no payload
        Message(kind=Kind.STATUS, meta={"big": "y" * 10000}, tensors=[torch.ones(3, 3)]),  # overflow + payload
        Message(kind=Kind.DATA, tensors=[torch.ones(2, dtype=torch.bool), torch.zeros(0), torch.tensor(7.0)]),
        Message(kind=Kind.DATA, tensors=[torch.arange(2**19, dtype=torch.float32)]),  # 2 MiB, oversize
        Message(kind=Kind.DATA, tensors=[torch.arange(2**19, dtype=torch.int32)]),  # 2 MiB, fits now
    ]
    if rank == 0:
        for m in messages:
            ch.send(m, timeout=10)
        ch.close()
        return dict(ch.sent_by_path)
    ok = [same_message(ch.recv(timeout=10), m) for m in messages]
    return ok


def _r_backpressure(rank, world, transport):
    config = TransportConfig(link_capacity=3)
    ch = my_end(create_links([link("bp", transport=transport)], config), "bp")
    if rank == 0:
        for i in range(3):
            ch.send(make_message(i), timeout=5)
        out = {"credits_full": ch.credits()}
        t = time.monotonic()
        with pytest.raises(ChannelTimeout):
            ch.send(make_message(3), timeout=0)
        with pytest.raises(ChannelTimeout):
            ch.send(make_message(3), timeout=0.3)
        out["waited"] = time.monotonic() - t
        dist.barrier()  # the receiver starts consuming only now
        t = time.monotonic()
        ch.send(make_message(3), timeout=5)
        out["unblocked_after"] = time.monotonic() - t
        dist.barrier()
        ch.close()
        # Until joined, END may not have left (a TCP socket dropped with credit records
        # unread is reset, and what it had not sent yet is lost).
        out["joined"] = ch.join(20)
        return out
    dist.barrier()
    time.sleep(0.2)  # the sender has been blocked all along; nothing more may have arrived
    queued = len(ch._queue) if transport == Transport.TORCH else None  # a socket link queues in the kernel
    first = ch.recv(timeout=5)
    dist.barrier()
    rest = [ch.recv(timeout=5).frame_id for _ in range(3)]
    # Dropped without close or join: the link must still finish by itself (END in, CLOSED
    # out), for the sender's join to come back.
    return {"queued_max": queued, "ids": [first.frame_id] + rest}


def _r_opposite(rank, world, n):
    import threading

    links = create_links([link("fwd"), link("back", src=1, dst=0)])
    outgoing, incoming = ("fwd", "back") if rank == 0 else ("back", "fwd")
    out_link, in_link = links.writers[outgoing], links.readers[incoming]
    big = [torch.full((1 << 20,), i % 251, dtype=torch.uint8) for i in range(n)]

    def pump():
        for i in range(n):
            out_link.send(Message(kind=Kind.DATA, frame_id=i, tensors=[big[i]]), timeout=20)

    sender = threading.Thread(target=pump)
    sender.start()
    got = [in_link.recv(timeout=20) for _ in range(n)]
    sender.join(20)
    ok = all(m.frame_id == i and torch.equal(m.tensors[0], big[i]) for i, m in enumerate(got))
    out_link.close()
    return ok


def _r_close(rank, world, transport):
    links = create_links([link("end", transport=transport), link("stop", transport=transport)])
    end, stop = my_end(links, "end"), my_end(links, "stop")
    if rank == 0:
        assert not hasattr(end, "recv")
        for i in range(3):
            end.send(make_message(i), timeout=5)
        t = time.monotonic()
        end.close()
        end.close()
        close_s = time.monotonic() - t
        with pytest.raises(ChannelClosed):
            end.send(make_message(9), timeout=1)
        # "stop": the receiver closes; the sender learns it through CLOSED.
        t = time.monotonic()
        while True:
            try:
                stop.send(Message(kind=Kind.EVENT), timeout=5)
            except ChannelClosed:
                break
        return {"close_s": close_s, "stop_noticed_s": time.monotonic() - t, "credits": stop.credits(),
                "joined": end.join(5) and stop.join(5)}
    time.sleep(0.3)
    ids = [end.recv(timeout=5).frame_id for _ in range(3)]
    with pytest.raises(ChannelClosed):
        end.recv(timeout=5)
    stop.recv(timeout=5)
    t = time.monotonic()
    stop.close()
    close_s = time.monotonic() - t
    with pytest.raises(ChannelClosed):
        stop.recv(timeout=0)
    assert not hasattr(end, "send")
    return {"ids": ids, "close_s": close_s, "joined": end.join(5) and stop.join(5)}


def _r_idle(rank, world, idle_s):
    ch = my_end(create_links([link("idle")]), "idle")
    if rank == 0:
        time.sleep(idle_s)
        ch.send(make_message(5), timeout=5)
        ch.close()
        return None
    timeouts = 0
    t = time.monotonic()
    while True:
        try:
            msg = ch.recv(timeout=0.5)
            break
        except ChannelTimeout:
            timeouts += 1
    return {"waited": time.monotonic() - t, "timeouts": timeouts, "ok": same_message(msg, make_message(5))}


def _r_kill(rank, world, transport):
    links = create_links([link("a", src=1, dst=0, transport=transport), link("b", transport=transport),
                          link("c", src=2, dst=0, transport=transport)])
    if rank == 1:
        for i in range(5):
            links.writers["a"].send(make_message(i), timeout=5)
        links.readers["b"].recv(timeout=5)
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 2:
        for i in range(20):
            links.writers["c"].send(make_message(i), timeout=10)
            time.sleep(0.05)
        links.writers["c"].close()
        return None
    links.writers["b"].send(make_message(0), timeout=5)
    got = [links.readers["a"].recv(timeout=5).frame_id for _ in range(5)]
    t = time.monotonic()
    with pytest.raises(PeerFailure):
        links.readers["a"].recv(timeout=30)
    recv_noticed = time.monotonic() - t
    t = time.monotonic()
    with pytest.raises(PeerFailure):
        for i in range(10):
            links.writers["b"].send(make_message(i), timeout=30)
    send_noticed = time.monotonic() - t
    healthy = [links.readers["c"].recv(timeout=10).frame_id for _ in range(20)]
    return {"got": got, "recv_noticed": recv_noticed, "send_noticed": send_noticed, "healthy": healthy}


# ------------------------------------------------------------------------ tests

@pytest.fixture(scope="module")
def world():
    with GlooWorld(2) as w:
        yield w


@pytest.mark.timeout(60)
def test_strict_order_and_exact_bytes_over_200_mixed_messages(world):
    sender, receiver = world.run(_r_order, 200, timeout=50)
    assert receiver["mismatches"] == []
    assert receiver["received"] == 200 and receiver["joined"]
    assert sender["inline"] > 0 and sender["payload"] > 0 and sender["empty"] > 0


@pytest.mark.timeout(60)
def test_inline_payload_and_overflow_paths(world):
    sender, receiver = world.run(_r_paths, timeout=30)
    assert receiver == [True] * 8
    assert sender == {"inline": 2, "payload": 4, "overflow": 2, "oversize": 2, "empty": 2}


def test_posted_payload_size_grows_in_whole_mebibytes_up_to_the_cap():
    assert next_prepost(4096, 100) == 4096
    assert next_prepost(4096, 4096) == 4096
    assert next_prepost(4096, 4097) == 2**20
    assert next_prepost(2**20, 2**20 + 1) == 2**21
    assert next_prepost(2**21, PREPOST_MAX) == PREPOST_MAX
    assert next_prepost(2**21, PREPOST_MAX + 1) == 2**21  # too big to keep posted: stays


def test_a_payload_larger_than_the_front_receive_continues_in_the_next_ones():
    sizes = PostedSizes(1024, depth=2)
    assert sizes.take(1000) == [(1000, 1024)] and list(sizes.queue) == [1024, 1024]
    # 2400 B: fills both 1 KiB receives and a third, posted at the grown size (1 MiB)
    # as the first was consumed; every receive consumed is replaced.
    assert sizes.take(2400) == [(1024, 2**20), (1024, 2**20), (352, 2**20)]
    assert list(sizes.queue) == [2**20, 2**20]
    assert sizes.take(2**20) == [(2**20, 2**20)]
    # Beyond the cap the posted size stays and the payload travels in capped pieces.
    big = PostedSizes(PREPOST_MAX, depth=2)
    assert [piece for piece, _ in big.take(2 * PREPOST_MAX + 5)] == [PREPOST_MAX, PREPOST_MAX, 5]
    assert list(big.queue) == [PREPOST_MAX, PREPOST_MAX]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", [Transport.TORCH, Transport.SAME_HOST, Transport.TCP],
                                   ids=["gloo", "same-host", "tcp"])
def test_backpressure_blocks_and_times_out_without_exceeding_capacity(world, transport):
    sender, receiver = world.run(_r_backpressure, transport, timeout=30)
    assert sender["credits_full"] == 0
    assert 0.25 <= sender["waited"] < 2.0
    assert sender["unblocked_after"] < 2.0 and sender["joined"]
    assert receiver["queued_max"] == (3 if transport == Transport.TORCH else None)
    assert receiver["ids"] == [0, 1, 2, 3]


@pytest.mark.timeout(60)
def test_opposite_links_on_one_pair_run_concurrently(world):
    assert world.run(_r_opposite, 40, timeout=40) == [True, True]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", [Transport.TORCH, Transport.SAME_HOST, Transport.TCP],
                                   ids=["gloo", "same-host", "tcp"])
def test_end_and_receiver_close_surface_channel_closed(world, transport):
    sender, receiver = world.run(_r_close, transport, timeout=30)
    assert receiver["ids"] == [0, 1, 2] and receiver["joined"]
    assert sender["close_s"] < 0.05 and receiver["close_s"] < 0.05
    assert sender["stop_noticed_s"] < 3.0 and sender["credits"] == 0 and sender["joined"]


@pytest.mark.timeout(60)
def test_idle_link_does_not_error(world):
    _, receiver = world.run(_r_idle, 5.0, timeout=30)
    assert receiver["ok"] and receiver["waited"] >= 4.5 and receiver["timeouts"] >= 8


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", [Transport.TORCH, Transport.SAME_HOST, Transport.TCP],
                                   ids=["gloo", "same-host", "tcp"])
def test_killed_peer_surfaces_peer_failure_quickly_and_other_links_survive(transport):
    with GlooWorld(3) as w:
        survivor, _, _ = w.run(_r_kill, transport, timeout=40, expect_exit={1})
    assert survivor["got"] == [0, 1, 2, 3, 4]
    assert survivor["recv_noticed"] < 3.0
    assert survivor["send_noticed"] < 3.0
    assert survivor["healthy"] == list(range(20))
