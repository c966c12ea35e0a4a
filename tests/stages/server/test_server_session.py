"""The per-session outbound queue: order, bounds by kind, and what a slow reader loses."""

from __future__ import annotations

import asyncio

from stages.server.metrics import ServerMetrics
from stages.server.session import Session


class SlowConnection:
    """Records what is sent; ``send`` waits while ``gate`` is closed, like a full socket."""

    def __init__(self) -> None:
        self.sent: list[str | bytes] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def send(self, data: str | bytes) -> None:
        await self.gate.wait()
        self.sent.append(data)


def make_session(connection: SlowConnection, max_frames: int = 2, max_errors: int = 2) -> Session:
    return Session(id="s1", connection=connection, metrics=ServerMetrics(),
                   max_frames=max_frames, max_errors=max_errors)


async def drain(session: Session, connection: SlowConnection) -> None:
    connection.gate.set()
    sender = asyncio.create_task(session.run_sender())
    await asyncio.sleep(0.01)
    session.close()
    await asyncio.wait_for(sender, 1)


def test_frames_keep_order_and_stay_paired():
    async def run():
        connection = SlowConnection()
        session = make_session(connection, max_frames=8)
        for i in range(3):
            session.push_frame(f"v{i}", b"f%d" % i)
        await drain(session, connection)
        return connection.sent, session

    sent, session = asyncio.run(run())
    assert sent == ["v0", b"f0", "v1", b"f1", "v2", b"f2"]
    assert session.counters.frames_out == 3 and session.counters.frames_dropped == 0


def test_slow_reader_drops_oldest_frames_and_keeps_control_messages():
    async def run():
        connection = SlowConnection()
        connection.gate.clear()  # the browser is not reading
        session = make_session(connection, max_frames=2, max_errors=2)
        session.push_config("c1")
        for i in range(5):
            session.push_frame(f"v{i}", b"f%d" % i)
            session.push_stats(f"s{i}")
        session.push_config("c2")
        for i in range(4):
            session.push_error("bad_magic", f"e{i}")
        await drain(session, connection)
        return connection.sent, session

    sent, session = asyncio.run(run())
    # Newest two frames, newest stats and config, newest two errors, in the order queued.
    assert sent == ["v3", b"f3", "v4", b"f4", "s4", "c2", "e2", "e3"]
    assert session.counters.frames_dropped == 3
    assert session.counters.errors_dropped == 2
    summary = session.summary()
    assert (summary["frames_out"], summary["errors_sent"], summary["queued_frames"]) == (2, 2, 0)


def test_closed_session_queues_nothing_and_sender_ends():
    async def run():
        connection = SlowConnection()
        session = make_session(connection)
        sender = asyncio.create_task(session.run_sender())
        await asyncio.sleep(0)
        session.close()
        session.push_frame("v", b"f")
        session.push_stats("s")
        session.push_error("x", "e")
        await asyncio.wait_for(sender, 1)
        return connection.sent

    assert asyncio.run(run()) == []
