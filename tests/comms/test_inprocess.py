"""In-process links: order, credits, the three timeout modes, and the two ends' close
semantics (the writer's END, the reader's CLOSED)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from comms.errors import ChannelClosed, ChannelTimeout
from comms.inprocess import inprocess_link
from comms.message import Kind, Message

pytestmark = pytest.mark.timeout(30)


def msg(i: int) -> Message:
    return Message(kind=Kind.DATA, frame_id=i, tensors=[torch.full((4,), i)])


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
    writer, reader = inprocess_link("t", capacity=2)
    sent = [msg(i) for i in range(500)]
    thread, _ = in_thread(lambda: [writer.send(m, timeout=5) for m in sent])
    got = [reader.recv(timeout=5) for _ in range(500)]
    thread.join(5)
    assert all(a is b for a, b in zip(got, sent))
    assert writer.stats.messages_sent == reader.stats.messages_received == 500
    assert writer.stats.bytes_sent == reader.stats.bytes_received == 500 * 4 * 8


def test_each_end_has_only_its_own_operations():
    writer, reader = inprocess_link("t")
    assert not hasattr(reader, "send") and not hasattr(reader, "credits")
    assert not hasattr(writer, "recv")


def test_credits_bound_in_flight_messages():
    writer, reader = inprocess_link("t", capacity=3)
    assert writer.credits() == 3
    for i in range(3):
        writer.send(msg(i), timeout=0)
    assert writer.credits() == 0
    with pytest.raises(ChannelTimeout):
        writer.send(msg(3), timeout=0)
    reader.recv(timeout=0)
    assert writer.credits() == 1


def test_blocked_send_resumes_when_the_reader_takes_one():
    writer, reader = inprocess_link("t", capacity=1)
    writer.send(msg(0))
    thread, out = in_thread(lambda: writer.send(msg(1), timeout=None))
    time.sleep(0.2)
    assert thread.is_alive()
    assert reader.recv(timeout=1).frame_id == 0
    thread.join(2)
    assert "error" not in out and reader.recv(timeout=1).frame_id == 1


@pytest.mark.parametrize("timeout", [0, 0.2])
def test_finite_and_zero_timeouts_expire(timeout):
    writer, reader = inprocess_link("t", capacity=1)
    t = time.monotonic()
    with pytest.raises(ChannelTimeout):
        reader.recv(timeout=timeout)
    writer.send(msg(0))
    with pytest.raises(ChannelTimeout):
        writer.send(msg(1), timeout=timeout)
    assert timeout * 2 <= time.monotonic() - t < timeout * 2 + 0.5


def test_zero_timeout_returns_what_is_ready():
    writer, reader = inprocess_link("t", capacity=1)
    writer.send(msg(7), timeout=0)
    assert reader.recv(timeout=0).frame_id == 7


def test_negative_timeout_and_bad_arguments_are_rejected():
    writer, reader = inprocess_link("t")
    with pytest.raises(ValueError, match="timeout"):
        reader.recv(timeout=-1)
    with pytest.raises(ValueError, match="timeout"):
        writer.join(timeout=-1)
    with pytest.raises(TypeError, match="Message"):
        writer.send("frame")
    with pytest.raises(ValueError, match="capacity"):
        inprocess_link("t", capacity=0)


@pytest.mark.parametrize("closing", ["writer", "reader"])
@pytest.mark.parametrize("blocked", ["send", "recv"])
def test_either_close_wakes_blocked_callers_at_once_with_channel_closed(blocked, closing):
    writer, reader = inprocess_link("t", capacity=1)
    if blocked == "send":
        writer.send(msg(0))
        thread, out = in_thread(lambda: writer.send(msg(1), timeout=None))
    else:
        thread, out = in_thread(lambda: reader.recv(timeout=None))
    time.sleep(0.2)
    assert thread.is_alive()
    t = time.monotonic()
    (writer if closing == "writer" else reader).close()
    assert time.monotonic() - t < 0.05
    thread.join(2)
    assert isinstance(out.get("error"), ChannelClosed) and out["seconds"] < 0.2 + 0.5


def test_writer_close_is_end_queued_messages_drain_first():
    writer, reader = inprocess_link("t", capacity=2)
    writer.send(msg(0))
    writer.send(msg(1))
    writer.close()
    writer.close()
    with pytest.raises(ChannelClosed):
        writer.send(msg(2), timeout=0)
    assert writer.credits() == 0
    assert [reader.recv(timeout=0).frame_id for _ in range(2)] == [0, 1]
    with pytest.raises(ChannelClosed):
        reader.recv(timeout=None)
    assert writer.join(0) and reader.join(0)


def test_reader_close_is_closed_queued_messages_are_dropped():
    writer, reader = inprocess_link("t", capacity=2)
    writer.send(msg(0))
    reader.close()
    reader.close()
    with pytest.raises(ChannelClosed):
        reader.recv(timeout=None)
    with pytest.raises(ChannelClosed, match="receiving end"):
        writer.send(msg(1), timeout=None)
    assert writer.credits() == 0
    writer.close()  # after the reader's CLOSED, END changes nothing
    assert writer.join(0) and reader.join(0)


def test_hop_latency_is_recorded_by_the_reader():
    writer, reader = inprocess_link("t")
    writer.send(msg(0))
    time.sleep(0.05)
    reader.recv()
    (latency,) = reader.stats.snapshot()["hop_latencies_ms"]
    assert 40 <= latency < 1000
    assert writer.stats.snapshot()["hop_latencies_ms"] == []
