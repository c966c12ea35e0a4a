"""The ingest inbox: drop-oldest per session, fair turns, flush, close."""

import threading
import time

import pytest

from comms.errors import ChannelClosed, ChannelTimeout
from comms.message import Kind, Message
from runtime.session_queue import SessionQueue


def frame(session: str, frame_id: int) -> Message:
    return Message(kind=Kind.DATA, session=session, frame_id=frame_id)


def test_drops_the_oldest_frame_of_a_session_that_is_behind():
    q = SessionQueue(depth=2)
    for i in range(5):
        q.put(frame("a", i))
    assert [q.recv(0).frame_id for _ in range(2)] == [3, 4]
    assert q.dropped == {"a": 3} and q.dropped_total == 3


def test_sessions_take_turns():
    q = SessionQueue(depth=4)
    for i in range(3):
        q.put(frame("a", i))
    q.put(frame("b", 100))
    order = [(m.session, m.frame_id) for m in (q.recv(0) for _ in range(4))]
    assert order == [("a", 0), ("b", 100), ("a", 1), ("a", 2)]


def test_flush_and_drop_session():
    q = SessionQueue(depth=4)
    q.put(frame("a", 1))
    q.put(frame("b", 1))
    q.drop_session("a")
    assert q.queued() == 1 and "a" not in q.dropped
    assert q.flush() == 1 and q.queued() == 0 and q.flushed == 1


def test_recv_times_out_and_close_wakes_a_waiting_reader():
    q = SessionQueue()
    with pytest.raises(ChannelTimeout):
        q.recv(timeout=0.01)
    errors = []

    def reader():
        try:
            q.recv(timeout=None)
        except ChannelClosed as e:
            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.05)
    q.close()
    t.join(2)
    assert not t.is_alive() and errors
    with pytest.raises(ChannelClosed):
        q.put(frame("a", 1))
