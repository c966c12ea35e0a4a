"""The benchmark client: frame bookkeeping, the measured window, and real runs against the
web server with an echoing pipeline stand-in (no ranks, so these stay fast)."""

from __future__ import annotations

import math

import pytest

from runtime.bench import client
from runtime.bench.client import ClientSettings, _result, _Session, drop_growth, run
from stages.server.config import ServerConfig
from stages.server.protocol import BinaryFrame, Kind
from stages.server.ws_server import WebServer
from tests.integration.mirror_client import FIXTURE
from tests.stages.server.echo_hooks import EchoHooks


@pytest.fixture
def echo_port():
    hooks = EchoHooks()
    # A long output queue: a CPU-starved test machine must not make the server drop
    # outputs, which is the server's policy to test elsewhere, not the client's.
    server = WebServer(ServerConfig(port=0, stats_interval_s=0.1, session_out_queue=64), hooks)
    hooks.sink = server
    server.start()
    yield server.port
    server.stop()
    hooks.close()


def output(frame_id: int, sent_ms: float) -> BinaryFrame:
    return BinaryFrame(kind=Kind.OUTPUT_FRAME, frame_id=frame_id, client_ts=sent_ms, payload=b"")


def test_an_output_frees_its_slot_and_marks_earlier_frames_lost():
    session = _Session()
    session.in_flight = {1: 0.0, 2: 0.0, 3: 0.0, 5: 0.0}
    session.on_output(output(3, 0.0), now=0.05)
    assert session.in_flight == {5: 0.0} and session.freed.is_set()
    session.expire(now=1.0, lost_after_s=2.0)
    assert session.in_flight == {5: 0.0}
    session.expire(now=2.5, lost_after_s=2.0)
    assert session.in_flight == {}


def test_result_counts_only_the_measured_window():
    session = _Session()
    session.sent_at = {0: 0.5, 1: 1.0, 2: 1.5, 3: 2.0, 4: 2.9}
    session.arrivals = [(0, 0.6, 100.0), (1, 1.1, 100.0), (3, 2.2, 200.0), (4, 3.2, 300.0)]
    session.stats = [(0.9, {"drops": {"ingest": 4}}),
                     (3.1, {"drops": {"ingest": 5}, "server": {"session": {"frames_dropped": 1}}})]
    settings = ClientSettings(port=1, jpeg=b"", duration_s=2.0, warmup_s=1.0, fps=2.0)
    result = _result(session, settings, start=1.0, end=3.0)
    assert (result.sent, result.received, result.dropped) == (4, 3, 1)  # frames 1..4; 2 never came back
    assert result.fps_in == 2.0 and result.fps == 1.0  # outputs of 1 and 3 arrived inside [1, 3]
    assert result.latencies_ms == [100.0, 200.0]
    assert math.isclose(result.ttff_ms, 100.0) and result.input == "2 fps"
    assert result.drops == {"ingest": 1, "out_queue": 1}


def test_drop_growth():
    after = {"drops": {"ingest": 7, "late": 2}, "server": {"session": {"frames_dropped": 3}}}
    assert drop_growth(None, after) == {"ingest": 7, "late": 2, "out_queue": 3}
    assert drop_growth({"drops": {"ingest": 5, "late": 2}}, after) == {"ingest": 2, "late": 0, "out_queue": 3}
    assert drop_growth(None, None) == {}


@pytest.mark.parametrize("kwargs, match", [
    ({"duration_s": 0}, "duration_s must be a finite number > 0"),
    ({"duration_s": math.nan}, "duration_s must be a finite number > 0"),
    ({"warmup_s": math.inf}, "warmup_s must be a finite number >= 0"),
    ({"fps": 0}, "fps must be a finite number > 0 or None"),
    ({"fps": math.nan}, "fps must be a finite number > 0 or None"),
    ({"fps": math.inf}, "fps must be a finite number > 0 or None"),
    ({"window": 0}, "window must be >= 1"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClientSettings(**{"port": 1, "jpeg": b"", "duration_s": 1.0, **kwargs})


def test_fixed_rate_sends_on_schedule_and_gets_every_frame_back(echo_port):
    result = run(ClientSettings(port=echo_port, jpeg=FIXTURE.read_bytes(), duration_s=1.0, warmup_s=0.3, fps=40.0))
    assert abs(result.sent - 40) <= 2  # an absolute schedule: the count does not drift
    assert result.received == result.sent and result.dropped == 0, result.drops
    assert result.fps > 0 and all(ms > 0 for ms in result.latencies_ms) and result.ttff_ms > 0
    assert result.stats is not None and result.stats["drops"] == {"ingest": 0, "flushed": 0, "late": 0}
    assert result.errors == [] and result.error_count == 0


def test_as_fast_as_possible_keeps_the_window_and_loses_nothing(echo_port, monkeypatch):
    in_flight_at_send = []
    send = client._send

    async def counting_send(ws, session, frame_id, jpeg):
        in_flight_at_send.append(len(session.in_flight))
        await send(ws, session, frame_id, jpeg)

    monkeypatch.setattr(client, "_send", counting_send)
    result = run(ClientSettings(port=echo_port, jpeg=FIXTURE.read_bytes(), duration_s=0.6, warmup_s=0.2,
                                window=2))
    assert result.input == "max" and result.sent > 0 and result.received == result.sent
    assert result.fps > 0 and result.stats is not None
    assert max(in_flight_at_send) < 2
