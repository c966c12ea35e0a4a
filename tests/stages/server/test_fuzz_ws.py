"""Fuzzing over a real WebSocket: random and half-valid messages at a running server, one
at a time. Every message gets its answer (the ``error`` whose code the pure decoders
predict, or the frame / config it asked for), the session stays open, a neighbouring
session is served throughout, and the server takes new sessions afterwards."""

from __future__ import annotations

import json
import time

import pytest
from echo_hooks import EchoHooks
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from mm_client import Client, camera_frame
from test_fuzz_protocol import binary_messages, envelopes, json_values
from websockets.exceptions import ConnectionClosed

from stages.server.config import ServerConfig
from stages.server.protocol import (
    CONFIG_UPDATE,
    PRESET_APPLY,
    ProtocolError,
    decode_camera_frame,
    decode_client_message,
    decode_frame,
    probe_jpeg,
)
from stages.server.ws_server import WebServer

EXAMPLES = 150


@pytest.fixture(scope="module")
def fuzz_server():
    hooks = EchoHooks()
    # No rate limit to trip (the fuzz sends as fast as it is answered) and stats rarely.
    config = ServerConfig(port=0, max_message_bytes=256 * 1024, stats_interval_s=1.0, max_messages_per_s=100_000,
                          message_burst=100_000, session_out_queue=64, close_timeout_s=1.0, stop_timeout_s=3.0)
    server = WebServer(config, hooks)
    hooks.sink = server
    server.start()
    yield server
    server.stop()
    hooks.close()


def expected(server, message: bytes | str) -> tuple[str, object]:
    """What the server must answer: ("error", code), ("frame", frame id) or ("config", None)
    (a well-formed config change: ``config.current``, or ``bad_config`` for a value the
    config refuses)."""
    limits = {"max_width": server.config.max_frame_width, "max_height": server.config.max_frame_height,
              "max_pixels": server.config.max_frame_pixels}
    try:
        if isinstance(message, bytes):
            frame = decode_camera_frame(message)
            probe_jpeg(frame.payload, **limits)
            return "frame", frame.frame_id
        decoded = decode_client_message(message)
    except ProtocolError as e:
        return "error", str(e.code)
    if decoded.type in (CONFIG_UPDATE, PRESET_APPLY):
        return "config", None
    return "error", "unknown_avatar"  # a camera pipeline shows no avatars


def answer(client: Client, timeout: float = 3.0) -> tuple[str, dict]:
    """The next message that is not ``stats``: (type, payload); a ``vision`` brings its frame."""
    deadline = time.monotonic() + timeout
    while True:
        message = client.ws.recv(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(message, bytes):
            raise AssertionError(f"a binary message before its vision: {message[:24]!r}")
        parsed = json.loads(message)
        if parsed["type"] == "stats":
            continue
        if parsed["type"] == "vision":
            frame = decode_frame(client.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            assert frame.frame_id == parsed["payload"]["frame_id"]
        return parsed["type"], parsed["payload"]


def drain(client: Client) -> None:
    """Read whatever a bystander was sent, so its socket never fills."""
    while True:
        try:
            client.ws.recv(timeout=0)
        except TimeoutError:
            return


texts = (st.text(max_size=80) | json_values.map(json.dumps) | envelopes.map(json.dumps)
         | st.sampled_from(['{"type": "config.update", "payload": {"strength": 0.5}}',
                            '{"type": "preset.apply", "payload": {"name": "party"}}',
                            '{"type": "avatar.select", "payload": {"id": "robot"}}', "", "{}", "null", "[" * 5000]))


def test_every_message_is_answered_and_nothing_else_breaks(fuzz_server):
    server = fuzz_server
    with Client.open(server) as fuzzed, Client.open(server) as neighbour:
        fuzzed.text("config.current")
        neighbour.text("config.current")
        seen: set[str] = set()

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
        @given(binary_messages | texts)
        def one_message(message):
            kind, value = expected(server, message)
            fuzzed.send(message)
            got, payload = answer(fuzzed)
            if kind == "error":
                assert (got, payload["code"]) == ("error", value), (message, payload)
                assert payload["message"]
            elif kind == "frame":
                assert got == "vision" and payload["frame_id"] == value
            else:
                assert got == "config.current" or (got, payload["code"]) == ("error", "bad_config"), payload
            seen.add(f"{kind}:{value}")
            event(f"{kind}: {value}")
            drain(neighbour)

        one_message()
        neighbour.roundtrip(1)  # served all along
        fuzzed.roundtrip(2)     # and the fuzzed session itself is still open
        assert len(seen) >= 8, seen  # the fuzz reached many different answers
    print(f"fuzzed {EXAMPLES} messages; answers seen: {sorted(seen)}")
    with Client.open(server) as fresh:
        fresh.roundtrip(3)


def test_invalid_utf8_text_frame_closes_only_that_session_1007(fuzz_server):
    with Client.open(fuzz_server) as bad, Client.open(fuzz_server) as other:
        bad.text("config.current")
        other.text("config.current")
        bad.ws.send(b'{"type": "\xff\xfe"}', text=True)  # a text frame that is not UTF-8
        with pytest.raises(ConnectionClosed):
            while True:
                bad.ws.recv(timeout=3)
        assert bad.ws.close_code == 1007
        other.roundtrip(4)


def test_a_burst_of_bad_frames_gets_an_answer_each(fuzz_server):
    """Sent all at once rather than one by one: still one error per message, in order (as
    long as no more than ``session_error_queue`` wait at once; past it the oldest go)."""
    assert fuzz_server.config.session_error_queue >= 30
    with Client.open(fuzz_server) as client:
        client.text("config.current")
        bad = [camera_frame(i, 0.0)[:19] for i in range(20)] + [b"MMF1\x09" + bytes(15)] * 10
        for message in bad:
            client.send(message)
        codes = [answer(client)[1]["code"] for _ in bad]
        assert codes == ["short_header"] * 20 + ["bad_kind"] * 10
