"""InProcessChannel: order, credits, the three timeout modes and close semantics."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from comms.errors import ChannelClosed, ChannelTimeout
from comms.inprocess import InProcessChannel
from comms.message import Kind, Message

pytestmark = pytest.mark.timeout(30)


def msg(i: int) -> Message:
    return Message(kind=Kind.FRAME, frame_id=i, tensors=[torch.full((4,), i)])


def in_thread(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        t = time.monotonic()
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the test thread
            out["error"] = e
        out["seconds"] = time.monotonic() - t

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_order_is_kept_across_threads_and_messages_pass_by_reference():
    ch = InProcessChannel("t", capacity=2)
    sent = [msg(i) for i in range(500)]
    thread, _ = in_thread(lambda: [ch.send(m, timeout=5) for m in sent])
    got = [ch.recv(timeout=5) for _ in range(500)]
    thread.join(5)
    assert all(a is b for a, b in zip(got, sent))
    assert ch.stats.messages_sent == ch.stats.messages_received == 500
    assert ch.stats.bytes_sent == 500 * 4 * 8


def test_credits_bound_in_flight_messages():
    ch = InProcessChannel("t", capacity=3)
    assert ch.credits() == 3
    for i in range(3):
        ch.send(msg(i), timeout=0)
    assert ch.credits() == 0
    with pytest.raises(ChannelTimeout):
        ch.send(msg(3), timeout=0)
    ch.recv(timeout=0)
    assert ch.credits() == 1


def test_blocked_send_resumes_when_the_receiver_takes_one():
    ch = InProcessChannel("t", capacity=1)
    ch.send(msg(0))
    thread, out = in_thread(lambda: ch.send(msg(1), timeout=None))
    time.sleep(0.2)
    assert thread.is_alive()
    assert ch.recv(timeout=1).frame_id == 0
    thread.join(2)
    assert "error" not in out and ch.recv(timeout=1).frame_id == 1


@pytest.mark.parametrize("timeout", [0, 0.2])
def test_finite_and_zero_timeouts_expire(timeout):
    ch = InProcessChannel("t", capacity=1)
    t = time.monotonic()
    with pytest.raises(ChannelTimeout):
        ch.recv(timeout=timeout)
    ch.send(msg(0))
    with pytest.raises(ChannelTimeout):
        ch.send(msg(1), timeout=timeout)
    assert timeout * 2 <= time.monotonic() - t < timeout * 2 + 0.5


def test_zero_timeout_returns_what_is_ready():
    ch = InProcessChannel("t", capacity=1)
    ch.send(msg(7), timeout=0)
    assert ch.recv(timeout=0).frame_id == 7


def test_negative_timeout_and_bad_arguments_are_rejected():
    ch = InProcessChannel("t")
    with pytest.raises(ValueError, match="timeout"):
        ch.recv(timeout=-1)
    with pytest.raises(TypeError, match="Message"):
        ch.send("frame")
    with pytest.raises(ValueError, match="capacity"):
        InProcessChannel("t", capacity=0)


@pytest.mark.parametrize("blocked", ["send", "recv"])
def test_close_wakes_blocked_callers_with_channel_closed(blocked):
    ch = InProcessChannel("t", capacity=1)
    if blocked == "send":
        ch.send(msg(0))
        thread, out = in_thread(lambda: ch.send(msg(1), timeout=None))
    else:
        thread, out = in_thread(lambda: ch.recv(timeout=None))
    time.sleep(0.2)
    t = time.monotonic()
    ch.close()
    assert time.monotonic() - t < 0.05
    thread.join(2)
    assert isinstance(out.get("error"), ChannelClosed) and not thread.is_alive()


def test_close_is_idempotent_and_queued_messages_drain_first():
    ch = InProcessChannel("t", capacity=2)
    ch.send(msg(0))
    ch.send(msg(1))
    ch.close()
    ch.close()
    with pytest.raises(ChannelClosed):
        ch.send(msg(2), timeout=0)
    assert [ch.recv(timeout=0).frame_id for _ in range(2)] == [0, 1]
    with pytest.raises(ChannelClosed):
        ch.recv(timeout=None)
    assert ch.credits() == 0


def test_hop_latency_is_recorded():
    ch = InProcessChannel("t")
    ch.send(msg(0))
    time.sleep(0.05)
    ch.recv()
    (latency,) = ch.stats.snapshot()["hop_latencies_ms"]
    assert 40 <= latency < 1000
