"""Limits the server holds every peer to: sessions at once, messages a second, and how
long a connection may take to say what it wants."""

from __future__ import annotations

import socket
import time

import pytest
from mm_client import Client, camera_frame
from websockets.exceptions import ConnectionClosed

from stages.server.limits import MessageRateLimit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def metric(server, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    key = f"{name}{{{want}}}" if want else name
    for line in server._metrics.exposition().decode().splitlines():
        if line.rsplit(" ", 1)[0] == key:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- the token bucket, with a clock the test walks ---

def test_bucket_admits_a_burst_then_the_rate():
    clock = Clock()
    limit = MessageRateLimit(rate=10, burst=5, clock=clock)
    assert [limit.admit() for _ in range(7)] == [True] * 5 + [False] * 2
    clock.now += 0.1  # one message's worth of refill
    assert [limit.admit() for _ in range(2)] == [True, False]
    clock.now += 60  # an idle minute banks no more than the burst
    assert sum(limit.admit() for _ in range(20)) == 5
    assert (limit.admitted, limit.dropped) == (11, 18)


def test_bucket_holds_a_steady_sender_to_the_rate():
    clock = Clock()
    limit = MessageRateLimit(rate=50, burst=10, clock=clock)
    admitted = 0
    for _ in range(10_000):  # 1000 messages a second for 10 s
        clock.now += 0.001
        admitted += limit.admit()
    assert 500 <= admitted <= 500 + 10 + 1


def test_notices_come_once_a_second_and_carry_the_count():
    clock = Clock()
    limit = MessageRateLimit(rate=1, burst=1, clock=clock)
    assert limit.notice() is None  # nothing dropped
    limit.admit()
    for _ in range(3):
        assert not limit.admit()
    assert limit.notice() == 3      # the first drop of a flood is told at once
    limit.admit()
    assert limit.notice() is None   # within the second: quiet
    clock.now += 1.0
    assert limit.notice() == 1
    assert "1 message dropped unread" in limit.describe(1)
    assert "this session may send 1 messages a second (bursts of 1)" in limit.describe(4)


@pytest.mark.parametrize("kwargs", [{"rate": 0, "burst": 1}, {"rate": 1, "burst": 0}])
def test_bucket_refuses_nonsense(kwargs):
    with pytest.raises(ValueError):
        MessageRateLimit(**kwargs)


# --- over a socket ---

def test_a_flood_is_dropped_counted_and_reported_now_and_then(start_server, hooks):
    server = start_server(max_messages_per_s=20, message_burst=10, session_out_queue=64)
    with Client.open(server) as flood, Client.open(server) as other:
        flood.text("config.current")
        other.text("config.current")
        for i in range(200):  # as fast as the socket takes them: far above 20 a second
            flood.send(camera_frame(i, 0.0))
        error = flood.text("error")
        assert error["code"] == "rate_limited"
        assert "may send 20 messages a second (bursts of 10)" in error["message"]
        other.roundtrip(5000)  # the neighbour is served meanwhile

        def dropped() -> float:
            return metric(server, "mindmirror_server_messages_dropped_total", reason="rate")

        deadline = time.monotonic() + 5
        while dropped() + sum(1 for s in hooks.submitted if s[1] < 5000) < 200:
            assert time.monotonic() < deadline, "the server did not take all 200 messages"
            time.sleep(0.02)
        # The pipeline saw about the burst, not the flood.
        submitted = [s for s in hooks.submitted if s[1] < 5000]
        assert 10 <= len(submitted) < 20
        dropped = 200 - len(submitted)
        # Told once (the flood took well under a second), not once per message.
        time.sleep(0.3)
        flood.drop("vision")
        stats = flood.text("stats")
        assert stats["server"]["session"]["messages_dropped"] == dropped
        assert sum(1 for m in flood.texts if m["type"] == "error") <= 1
        # The bucket refills: a second later the session is served again.
        time.sleep(0.6)
        flood.texts.clear()
        flood.binaries.clear()
        flood.send(camera_frame(7777, 0.0))
        deadline = time.monotonic() + 3
        while flood.binary().frame_id != 7777:
            assert time.monotonic() < deadline


def test_text_messages_count_too(start_server, hooks):
    server = start_server(max_messages_per_s=5, message_burst=3)
    with Client.open(server) as client:
        client.text("config.current")
        for i in range(8):
            client.send({"type": "preset.apply", "payload": {"name": ("calm", "party")[i % 2]}})
        assert client.text("error")["code"] == "rate_limited"
        assert hooks.live.current()[0] == 4  # revision 1 + the three admitted presets


def test_too_many_sessions_is_told_closed_counted_and_the_slot_freed(start_server):
    server = start_server(max_sessions=1)
    with Client.open(server) as first:
        first.text("config.current")
        with Client.open(server) as extra:
            error = extra.text("error")
            assert error == {"code": "too_many_sessions", "message": "the server takes 1 sessions at once"}
            with pytest.raises(ConnectionClosed):
                extra.ws.recv(timeout=3)
            assert (extra.ws.close_code, extra.ws.close_reason) == (1013, "too many sessions")
        first.roundtrip(1)
    assert metric(server, "mindmirror_server_sessions_refused_total", reason="too_many_sessions") == 1
    deadline = time.monotonic() + 3
    while server.session_count and time.monotonic() < deadline:
        time.sleep(0.02)
    with Client.open(server) as later:  # the first left: its slot is free again
        later.roundtrip(2)


def _closed_by_server(sock: socket.socket, timeout: float) -> float:
    """Seconds until the server closes ``sock`` (EOF or reset), reading whatever comes."""
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def test_a_silent_connection_is_dropped_after_the_handshake_timeout(start_server):
    server = start_server(handshake_timeout_s=0.5, model_action_wait_s=0.01)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        elapsed = _closed_by_server(sock, timeout=5)
    assert 0.4 <= elapsed < 2.0, elapsed
    with Client.open(server) as client:  # the server itself is fine
        client.roundtrip(1)


def test_a_request_trickled_byte_by_byte_gets_no_more_time(start_server):
    server = start_server(handshake_timeout_s=0.5, model_action_wait_s=0.01)
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 200
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        start = time.monotonic()
        with pytest.raises(OSError):  # BrokenPipe or reset once the server gave up
            for byte in request:
                sock.sendall(bytes([byte]))
                time.sleep(0.02)  # 200+ bytes at 50 a second: 4 s if it were allowed
        assert time.monotonic() - start < 2.0
