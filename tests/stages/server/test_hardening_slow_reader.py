"""A page that sends but never reads: held back by TCP, bounded in what it costs rank 0,
harmless to its neighbours, and closed with a reason once nothing could be sent to it.

The slow client is a real WebSocket client on a socket with a small receive buffer whose
reading thread stops after one message (``max_queue=1``): from then on the kernel's
buffers fill, the server's writes wait, and only its bounded queues can grow.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import psutil
import pytest
from mm_client import FIXTURE_JPEG, Client, camera_frame
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

FRAME = FIXTURE_JPEG + bytes(300_000 - len(FIXTURE_JPEG))
"""A camera frame the echo double sends back as it is: 300 kB each way."""
FPS = 20.0


@contextlib.contextmanager
def non_reader(server, *, rcvbuf: int = 32 * 1024) -> Iterator[Client]:
    """A client whose reading stops after its first message."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    url = server.url.replace("http://", "ws://") + "ws"
    with connect(url, sock=sock, compression=None, open_timeout=5, close_timeout=1, max_queue=1) as ws:
        yield Client(ws)


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} within {timeout} s")


def drain_until_closed(client: Client, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    with pytest.raises(ConnectionClosed):
        while time.monotonic() < deadline:
            client.ws.recv(timeout=max(0.01, deadline - time.monotonic()))


def metric(server, name: str) -> float:
    for line in server._metrics.exposition().decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_non_reader_is_bounded_spares_its_neighbour_and_is_closed_1008(start_server, hooks):
    limit_s = 1.5
    server = start_server(max_message_bytes=1 << 20, slow_reader_close_s=limit_s, close_timeout_s=3.0)
    process = psutil.Process()
    with non_reader(server) as slow, Client.open(server) as other:
        other.text("config.current")
        slow_id = hooks.opened[0]
        rss_start = process.memory_info().rss
        stalled_at = None
        worst = {"queued_bytes": 0, "write_buffer_bytes": 0}
        sent = 0
        next_at = time.monotonic()
        # 20 fps until the server gives up on the slow page (or far longer than it should).
        while time.monotonic() - next_at < 20:
            try:
                slow.send(camera_frame(sent, float(sent), FRAME))
            except ConnectionClosed:
                break
            sent += 1
            started = time.monotonic()
            other.roundtrip(sent)  # the neighbour is served at once, every time
            assert time.monotonic() - started < 1.0
            mine = [s for s in server.session_stats() if s["id"] == slow_id]
            if not mine or mine[0]["closing"]:
                break
            for key in worst:
                worst[key] = max(worst[key], mine[0][key])
            if stalled_at is None and mine[0]["send_stalled_s"] > 0.2:
                stalled_at = sent
            next_at += 1 / FPS
            time.sleep(max(0.0, next_at - time.monotonic()))
        grown_mib = (process.memory_info().rss - rss_start) / 2**20
        assert stalled_at is not None, "backpressure never held the server's sends"
        closed_after_s = (sent - stalled_at) / FPS
        # Closed about limit_s after its sends stopped (the check runs 4 times in limit_s).
        assert closed_after_s < limit_s + 2.0, closed_after_s
        # What rank 0 held for it: its queue (4 frames) and one message in the transport.
        per_frame = len(FRAME) + 2048
        assert worst["queued_bytes"] <= server.config.session_out_queue * per_frame, worst
        assert worst["write_buffer_bytes"] <= 64 * 1024 + per_frame, worst
        assert grown_mib < 64, f"the process grew {grown_mib:.0f} MiB"
        wait_for(lambda: metric(server, "mindmirror_server_sessions_closed_by_server_total") == 1, 3,
                 "the close counted")
        # The page reads again: what was stuck arrives, then the close with its reason.
        drain_until_closed(slow)
        assert slow.ws.close_code == 1008
        assert slow.ws.close_reason == f"slow reader: nothing could be sent for {limit_s:g} s"
        wait_for(lambda: server.session_count == 1, 3, "the slow session gone")
        other.roundtrip(10_000)
    print(f"backpressure after {stalled_at} frames; closed {closed_after_s:.1f} s later; "
          f"worst queue {worst['queued_bytes'] / 1e6:.1f} MB, write buffer {worst['write_buffer_bytes'] / 1e6:.2f} MB; "
          f"process grew {grown_mib:.1f} MiB")


def test_a_page_that_never_reads_is_dropped_even_if_it_never_reads_again(start_server):
    """The close frame cannot reach it; past close_timeout_s the connection is cut."""
    server = start_server(max_message_bytes=1 << 20, slow_reader_close_s=0.5, close_timeout_s=0.5)
    with non_reader(server) as slow:
        wait_for(lambda: server.session_count == 1, 3, "the session open")
        for i in range(60):
            try:
                slow.send(camera_frame(i, 0.0, FRAME))
            except ConnectionClosed:
                break
            if server.session_count == 0:
                break
            time.sleep(0.02)
        wait_for(lambda: server.session_count == 0, 5, "the session dropped")
    assert metric(server, "mindmirror_server_sessions_closed_by_server_total") == 1


def test_a_slow_but_reading_page_is_not_closed(start_server):
    """Only a socket that takes nothing at all trips the limit: a page that reads slowly
    loses its oldest frames and stays."""
    server = start_server(max_message_bytes=1 << 20, slow_reader_close_s=0.5)
    with Client.open(server, max_queue=1) as client:
        client.text("config.current")
        for i in range(30):
            client.send(camera_frame(i, 0.0, FRAME))
        end = time.monotonic() + 1.5
        got = 0
        while time.monotonic() < end:  # 1.5 s of reading a frame every 50 ms
            with contextlib.suppress(AssertionError):
                client.binary(timeout=0.05)
                got += 1
            time.sleep(0.05)
        assert server.session_count == 1
        client.send(camera_frame(999, 0.0))
        wait_for(lambda: client.binary(timeout=5).frame_id == 999, 10, "the newest frame")
    assert got > 0
    assert metric(server, "mindmirror_server_sessions_closed_by_server_total") == 0


def test_slow_reader_close_can_be_turned_off(start_server, hooks):
    server = start_server(max_message_bytes=1 << 20, slow_reader_close_s=None)
    with non_reader(server) as slow:
        wait_for(lambda: server.session_count == 1, 3, "the session open")
        for i in range(40):
            slow.send(camera_frame(i, 0.0, FRAME))
        wait_for(lambda: server.session_stats()[0]["send_stalled_s"] > 1.0, 10, "the sends stalled for 1 s")
        assert server.session_count == 1
    assert metric(server, "mindmirror_server_sessions_closed_by_server_total") == 0
