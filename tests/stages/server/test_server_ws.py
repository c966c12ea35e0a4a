"""WebSocket sessions against a real ``WebServer`` on port 0 with an echoing runtime double."""

from __future__ import annotations

import contextlib
import json
import time

import pytest
from mm_client import FIXTURE_JPEG, Client, camera_frame, sof_only_jpeg
from websockets.exceptions import ConnectionClosed

from stages.server.protocol import Kind


def test_config_current_on_connect(server):
    with Client.open(server) as client:
        current = client.text("config.current")
    assert current["revision"] == 1
    assert current["config"]["style"] == "auto" and current["config"]["target_fps"] == 20.0
    assert current["presets"] == ["calm", "party"]
    assert current["styles"] == ["auto", "neon", "ink", "pop", "noir", "aurora"]
    assert current["status"]["ranks"][1]["role"] == "generator"


def test_camera_frame_comes_back_with_vision(server, hooks):
    with Client.open(server) as client:
        ts = 1732345678901.123
        client.send(camera_frame(41, ts))
        vision = client.text("vision")
        frame = client.binary()
    assert (frame.kind, frame.frame_id, frame.client_ts, frame.payload) == (Kind.OUTPUT_FRAME, 41, ts, FIXTURE_JPEG)
    assert vision["frame_id"] == 41
    assert vision["faces"][0]["bbox"] == [160, 120, 320, 240]
    assert vision["faces"][0]["emotion"] == "happy"
    session, frame_id, client_ts, width, height = hooks.submitted[0]
    assert (frame_id, client_ts, width, height) == (41, ts, 640, 480)
    assert session == hooks.opened[0]


BAD_BINARY = [
    pytest.param(b"MMF2" + camera_frame(1, 0.0)[4:], "bad_magic", id="wrong-magic"),
    pytest.param(camera_frame(1, 0.0)[:4] + b"\x09" + camera_frame(1, 0.0)[5:], "bad_kind", id="unknown-kind"),
    pytest.param(camera_frame(1, 0.0)[:4] + b"\x03" + camera_frame(1, 0.0)[5:], "bad_kind", id="output-kind"),
    pytest.param(camera_frame(1, 0.0)[:4] + b"\x02" + camera_frame(1, 0.0)[5:], "unsupported_kind", id="audio"),
    pytest.param(b"MMF1\x01\x00", "short_header", id="short-header"),
    pytest.param(camera_frame(1, 0.0)[:7] + b"\x01" + camera_frame(1, 0.0)[8:], "reserved_bytes", id="reserved"),
    pytest.param(camera_frame(1, float("nan")), "bad_timestamp", id="nan-timestamp"),
    pytest.param(camera_frame(1, 0.0, b"GIF89a not a jpeg at all"), "bad_jpeg", id="not-jpeg"),
    pytest.param(camera_frame(1, 0.0, b""), "bad_jpeg", id="empty-payload"),
    pytest.param(camera_frame(1, 0.0, sof_only_jpeg(60000, 60000)), "bad_image_size", id="absurd-size"),
]
BAD_TEXT = [
    pytest.param('{"type": "config.update", "payload": ', "bad_json", id="invalid-json"),
    pytest.param("[]", "bad_message", id="not-an-object"),
    pytest.param('{"type": "hello", "payload": {}}', "unknown_type", id="unknown-type"),
    pytest.param('{"type": "config.update", "payload": {"strenght": 0.5}}', "bad_config", id="unknown-config-key"),
    pytest.param('{"type": "config.update", "payload": {"strength": 7}}', "bad_config", id="config-out-of-range"),
    pytest.param('{"type": "config.update", "payload": {"style": 3}}', "bad_config", id="config-wrong-type"),
    pytest.param('{"type": "preset.apply", "payload": {"name": "nope"}}', "bad_config", id="unknown-preset"),
    pytest.param('{"type": "preset.apply", "payload": {"name": 1}}', "bad_payload", id="preset-bad-payload"),
]


@pytest.mark.parametrize("message, code", BAD_BINARY + BAD_TEXT)
def test_bad_input_gets_error_and_nothing_else_is_disturbed(server, hooks, message, code):
    with Client.open(server) as bad, Client.open(server) as other:
        bad.text("config.current")
        other.text("config.current")
        bad.send(message)
        error = bad.text("error")
        assert error["code"] == code and error["message"]
        # The session that erred, and its neighbour, both still work.
        bad.roundtrip(2)
        other.roundtrip(3)
        assert all(m["type"] != "error" for m in other.texts)
    assert [s[1] for s in hooks.submitted] == [2, 3]  # nothing bad reached the pipeline
    assert hooks.live.current()[0] == 1               # nor changed the config


def test_bad_config_message_names_the_field(server):
    with Client.open(server) as client:
        client.send({"type": "config.update", "payload": {"strenght": 0.5}})
        assert client.text("error")["message"].startswith("config.strenght: unknown key; allowed:")


def test_oversize_message_closes_1009_and_spares_others(server):
    with Client.open(server) as big, Client.open(server) as other:
        big.text("config.current")
        big.send(camera_frame(1, 0.0, b"\xff\xd8" + bytes(server.config.max_message_bytes)))
        with pytest.raises(ConnectionClosed):
            big.ws.recv(timeout=3)
            big.ws.recv(timeout=3)
        assert big.ws.close_code == 1009
        assert "exceeds limit" in big.ws.close_reason
        other.roundtrip(5)


def test_config_update_is_broadcast(server, hooks):
    with Client.open(server) as a, Client.open(server) as b:
        a.text("config.current")
        b.text("config.current")
        a.send({"type": "config.update", "payload": {"strength": 0.3, "style": "noir"}})
        for client in (a, b):
            current = client.text("config.current")
            assert current["revision"] == 2
            assert (current["config"]["strength"], current["config"]["style"]) == (0.3, "noir")
        b.send({"type": "preset.apply", "payload": {"name": "party"}})
        for client in (a, b):
            current = client.text("config.current")
            assert current["revision"] == 3 and current["config"]["style"] == "neon"


def test_two_sessions_get_their_own_frames_in_order(start_server):
    # The double echoes the 40 frames in one burst; a queue that holds them all and tiny
    # frames that fit the socket buffers mean none is dropped.
    server = start_server(session_out_queue=32)
    tiny = sof_only_jpeg(64, 48)
    with Client.open(server) as a, Client.open(server) as b:
        for i in range(20):
            a.send(camera_frame(i, float(i), tiny))
            b.send(camera_frame(1000 + i, float(i), tiny))
        got_a = [a.binary().frame_id for _ in range(20)]
        got_b = [b.binary().frame_id for _ in range(20)]
        assert got_a == list(range(20))
        assert got_b == list(range(1000, 1020))
        vision_a = [a.text("vision")["frame_id"] for _ in range(20)]
        assert vision_a == got_a
        assert not a.binaries and not b.binaries


def test_slow_reader_loses_oldest_frames_not_newest(server):
    big = FIXTURE_JPEG + bytes(200_000 - len(FIXTURE_JPEG))
    n = 80  # 16 MB of output: more than loopback socket buffers hold
    with Client.open(server, max_queue=2) as client:
        client.text("config.current")
        for i in range(n):
            client.send(camera_frame(i, 0.0, big))
        time.sleep(0.5)  # the runtime double echoes everything while nobody reads
        ids = []
        while not ids or ids[-1] != n - 1:
            ids.append(client.binary(timeout=5).frame_id)
        stats = client.text("stats")
    assert ids == sorted(set(ids)), "frames arrive in order, without duplicates"
    assert len(ids) < n, "some frames were dropped"
    assert stats["server"]["session"]["frames_dropped"] >= n - len(ids) - server.config.session_out_queue
    print(f"slow reader got {len(ids)} of {n} frames; dropped {stats['server']['session']['frames_dropped']}")


def test_deliver_error_and_unknown_session(server, hooks):
    with Client.open(server) as client:
        client.text("config.current")
        server.deliver_output("no-such-session", 1, 0.0, FIXTURE_JPEG, {"faces": []})  # dropped quietly
        server.deliver_error(hooks.opened[0], "decode_failed", "frame 9 is not a decodable JPEG")
        assert client.text("error") == {"code": "decode_failed", "message": "frame 9 is not a decodable JPEG"}
        client.roundtrip(1)


def test_hook_exception_is_contained(server, hooks):
    with Client.open(server) as client:
        hooks.fail_next = RuntimeError("queue exploded")
        client.send(camera_frame(1, 0.0))
        assert client.text("error") == {"code": "internal", "message": "RuntimeError: queue exploded"}
        client.roundtrip(2)


def test_stats_arrive_at_least_once_a_second(start_server):
    server = start_server(stats_interval_s=1.0)
    with Client.open(server) as client:
        client.text("config.current")
        first = client.text("stats", timeout=1.5)
        start = time.monotonic()
        second = client.text("stats", timeout=1.5)
        assert time.monotonic() - start < 1.25
    for stats in (first, second):
        assert stats["stages"]["generator"]["p95"] == 15.2
        assert stats["ranks"][0]["alive"] is True
        assert stats["nan_is_null"] is None  # strict JSON for the browser
        assert stats["server"]["sessions"] == 1
        assert set(stats["server"]["session"]) >= {"id", "frames_in", "frames_out", "frames_dropped"}


def test_too_many_sessions(start_server):
    server = start_server(max_sessions=2)
    with Client.open(server) as a, Client.open(server) as b, Client.open(server) as c:
        assert c.text("error")["code"] == "too_many_sessions"
        with pytest.raises(ConnectionClosed):
            c.ws.recv(timeout=3)
        assert c.ws.close_code == 1013
        a.roundtrip(1)
        b.roundtrip(2)


def test_sessions_open_and_close_in_hooks(server, hooks):
    with Client.open(server) as client:
        client.text("config.current")
    deadline = time.monotonic() + 3
    while not hooks.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hooks.closed == hooks.opened and len(hooks.opened) == 1
    assert server.session_count == 0


def test_stop_is_prompt_with_clients_connected(server):
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(Client.open(server)) for _ in range(3)]
        for i, client in enumerate(clients):
            client.roundtrip(i)
        start = time.monotonic()
        server.stop()
        elapsed = time.monotonic() - start
        for client in clients:
            with pytest.raises(ConnectionClosed):
                while True:
                    client.ws.recv(timeout=2)
            assert client.ws.close_code == 1001
    assert elapsed < 1.0
    server.deliver_output("gone", 1, 0.0, b"", {})  # after stop: ignored, no exception
    server.stop()  # idempotent


def test_port_in_use_raises(server, start_server):
    with pytest.raises(OSError):
        start_server(port=server.port)


def test_url_and_port(server):
    assert server.url == f"http://127.0.0.1:{server.port}/"
    assert server.port > 0


def test_output_frame_with_odd_vision_values(server, hooks):
    # A stage handing over numpy-ish values or NaN must still produce valid JSON.
    class Scalar:
        def tolist(self):
            return 0.5

    with Client.open(server) as client:
        client.text("config.current")
        server.deliver_output(hooks.opened[0], 7, 1.0, b"\xff\xd8", {"faces": [{"quality": float("nan"),
                                                                               "p": Scalar()}]})
        vision = client.text("vision")
        assert vision == {"faces": [{"quality": None, "p": 0.5}], "frame_id": 7}
        assert client.binary().frame_id == 7


def test_large_frame_throughput(server):
    """Many ~100 kB frames through one session (compression off keeps this fast)."""
    jpeg = FIXTURE_JPEG + bytes(100_000 - len(FIXTURE_JPEG))
    n = 100
    with Client.open(server) as client:
        client.text("config.current")
        start = time.monotonic()
        for i in range(n):
            client.send(camera_frame(i, 0.0, jpeg))
            client.binary()
        elapsed = time.monotonic() - start
    # Both directions: n frames in and n out.
    assert 2 * n * len(jpeg) / elapsed > 5e6, f"{2 * n * len(jpeg) / elapsed / 1e6:.1f} MB/s"
    print(f"round trip of {n} x {len(jpeg)} B frames: {elapsed * 1e3 / n:.2f} ms each, "
          f"{2 * n * len(jpeg) / elapsed / 1e6:.0f} MB/s")


def test_binary_json_payload_is_not_a_text_message(server):
    # A JSON document sent as a binary message is judged as a frame: no magic.
    with Client.open(server) as client:
        client.send(json.dumps({"type": "config.update", "payload": {}}).encode())
        assert client.text("error")["code"] == "bad_magic"


def test_open_session_failure_refuses_only_that_session(server, hooks, monkeypatch):
    with Client.open(server) as fine:
        fine.text("config.current")
        real_open = hooks.open_session
        monkeypatch.setattr(hooks, "open_session", lambda session: 1 / 0)
        with Client.open(server) as refused:
            assert refused.text("error") == {"code": "internal", "message": "ZeroDivisionError: division by zero"}
            with pytest.raises(ConnectionClosed):
                refused.ws.recv(timeout=3)
            assert refused.ws.close_code == 1011
        monkeypatch.setattr(hooks, "open_session", real_open)
        fine.roundtrip(1)
