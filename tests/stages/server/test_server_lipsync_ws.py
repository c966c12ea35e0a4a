"""Audio chunks and avatar selection over a real WebSocket, against the lip-sync double and
the camera double (a pipeline takes one kind of input and refuses the other)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from mm_client import Client, audio_chunk, camera_frame
from websockets.exceptions import ConnectionClosed

from core.config import ConfigError
from stages.server.protocol import Kind

CHUNK = 320  # samples: 20 ms, as the page sends


def tone(n: int, amplitude: float = 0.3, start: int = 0) -> bytes:
    t = (np.arange(n) + start) / 16000
    return (amplitude * 32767 * np.sin(2 * np.pi * 220 * t)).astype("<i2").tobytes()


def stream(client: Client, chunks: int, *, first_id: int = 0, ts0: float = 1000.0) -> None:
    for k in range(chunks):
        client.send(audio_chunk(first_id + k, ts0 + 20.0 * (first_id + k), tone(CHUNK, start=(first_id + k) * CHUNK)))


def test_config_current_lists_avatars(lipsync_server):
    with Client.open(lipsync_server) as client:
        current = client.text("config.current")
    assert current["avatars"] == ["astronaut", "robot", "broken"]
    assert current["avatar"] == "astronaut"
    assert list(current["registry"]["avatars"]) == ["astronaut"]


def test_config_current_names_the_default_avatar_as_avatar(lipsync_server, lipsync_hooks, monkeypatch):
    real = lipsync_hooks.config_current

    def current():
        values = real()
        values["default_avatar"] = values.pop("avatar")  # a pipeline that calls it so
        return values

    monkeypatch.setattr(lipsync_hooks, "config_current", current)
    with Client.open(lipsync_server) as client:
        assert client.text("config.current")["avatar"] == "astronaut"
        client.send({"type": "avatar.select", "payload": {"id": "robot"}})
        assert client.text("config.current")["avatar"] == "robot"


def test_audio_chunks_come_back_as_frames_of_640_samples(lipsync_server, lipsync_hooks):
    with Client.open(lipsync_server) as client:
        client.text("config.current")
        stream(client, 5)  # 1600 samples: frames 0 and 1, and 320 samples waiting
        frames = [client.binary() for _ in range(2)]
        visions = [client.text("vision") for _ in range(2)]
        client.drop("stats")
        stats = client.text("stats")
        with pytest.raises(AssertionError):
            client.binary(timeout=0.3)  # no third frame from 320 samples
    assert [(f.kind, f.frame_id) for f in frames] == [(Kind.OUTPUT_FRAME, 0), (Kind.OUTPUT_FRAME, 1)]
    # Frame i is stamped with the page clock at sample 640 i: chunk 2 starts there.
    assert [f.client_ts for f in frames] == [1000.0, 1040.0]
    assert frames[0].payload[:2] == b"\xff\xd8"
    assert [v["frame_id"] for v in visions] == [0, 1]
    lipsync = visions[0]["lipsync"]
    assert lipsync["avatar"] == "astronaut" and lipsync["speech"] is True
    assert lipsync["loudness_db"] == pytest.approx(20 * np.log10(0.3 / np.sqrt(2)), abs=0.1)
    assert [(c[1], c[2], c[3]) for c in lipsync_hooks.audio] == [(k, 1000.0 + 20 * k, 640) for k in range(5)]
    session = stats["server"]["session"]
    assert session["audio_chunks_in"] == 5 and session["audio_in_s"] == 0.1
    assert "frames_in" not in session  # counts camera frames: none here


def test_camera_frame_to_an_audio_pipeline_is_refused(lipsync_server, lipsync_hooks):
    with Client.open(lipsync_server) as client:
        client.text("config.current")
        client.send(camera_frame(3, 0.0))
        error = client.text("error")
        assert error["code"] == "unsupported_kind" and "takes audio chunks (kind 2" in error["message"]
        assert "chunk_id" not in error
        stream(client, 2)
        assert client.binary().frame_id == 0  # the session still works
    assert len(lipsync_hooks.audio) == 2


def test_audio_chunk_to_a_camera_pipeline_is_refused(server, hooks):
    with Client.open(server) as client:
        client.text("config.current")
        client.send(audio_chunk(12, 0.0, tone(CHUNK)))
        error = client.text("error")
        client.roundtrip(1)
    assert error == {"code": "unsupported_kind", "chunk_id": 12,
                     "message": "this pipeline takes camera frames (kind 1); audio chunks (kind 2) go to a "
                                "lip-sync pipeline"}
    assert [s[1] for s in hooks.submitted] == [1]


BAD_AUDIO = [
    pytest.param(audio_chunk(7, 0.0, b""), "bad_audio", 7, id="empty"),
    pytest.param(audio_chunk(7, 0.0, b"\x01\x02\x03"), "bad_audio", 7, id="odd"),
    pytest.param(audio_chunk(7, 0.0, bytes(642)), "audio_too_large", 7, id="too-large"),
    pytest.param(audio_chunk(7, float("inf"), bytes(2)), "bad_timestamp", None, id="inf-timestamp"),
    pytest.param(audio_chunk(7, 0.0, bytes(2))[:4] + b"\x03" + bytes(18), "bad_kind", None, id="output-kind"),
    pytest.param(b"MMF1\x02", "short_header", None, id="short"),
]


@pytest.mark.parametrize("message, code, chunk_id", BAD_AUDIO)
def test_bad_audio_is_refused_and_nothing_else_is_disturbed(start_lipsync_server, lipsync_hooks, message, code,
                                                           chunk_id):
    server = start_lipsync_server(max_audio_chunk_bytes=640)
    with Client.open(server) as bad, Client.open(server) as other:
        bad.text("config.current")
        other.text("config.current")
        bad.send(message)
        error = bad.text("error")
        assert error["code"] == code and error["message"]
        assert error.get("chunk_id") == chunk_id
        stream(bad, 2)
        stream(other, 2)
        assert bad.binary().frame_id == 0 and other.binary().frame_id == 0
        assert all(m["type"] != "error" for m in other.texts)
    assert len(lipsync_hooks.audio) == 4  # only the good chunks reached the pipeline


def test_audio_faster_than_real_time_is_refused_by_chunk(start_lipsync_server, lipsync_hooks):
    # A 0.1 s burst: five 20 ms chunks may run ahead of the clock. One second of audio sent
    # at once cannot all be admitted unless the server took most of that second to read it.
    # (How fast the bucket refills is test_server_audio_rate's, with a clock it controls.)
    # (An error queue long enough that no refusal's error is dropped while the test reads.)
    server = start_lipsync_server(max_audio_chunk_bytes=640, audio_burst_s=0.1, session_error_queue=64)
    with Client.open(server) as client:
        client.text("config.current")
        stream(client, 50)
        errors = []
        while len(errors) + len(lipsync_hooks.audio) < 50:
            errors.append(client.text("error"))
    admitted = [c[1] for c in lipsync_hooks.audio]
    assert admitted[:5] == [0, 1, 2, 3, 4]
    assert len(admitted) < 40
    assert {e["code"] for e in errors} == {"audio_rate"}
    assert sorted(e["chunk_id"] for e in errors) == sorted(set(range(50)) - set(admitted))
    assert "faster than real time" in errors[0]["message"]


def test_too_many_chunks_per_second(start_lipsync_server, lipsync_hooks):
    server = start_lipsync_server(max_audio_chunks_per_s=3)
    with Client.open(server) as client:
        client.text("config.current")
        for k in range(5):
            client.send(audio_chunk(k, 0.0, bytes(4)))
        errors = [client.text("error") for _ in range(2)]
    assert [c[1] for c in lipsync_hooks.audio] == [0, 1, 2]
    assert [(e["code"], e["chunk_id"]) for e in errors] == [("audio_rate", 3), ("audio_rate", 4)]
    assert "more than 3 audio chunks in one second" in errors[0]["message"]


def test_avatar_select_answers_only_that_session(lipsync_server, lipsync_hooks):
    with Client.open(lipsync_server) as a, Client.open(lipsync_server) as b:
        a.text("config.current")
        b.text("config.current")
        a.send({"type": "avatar.select", "payload": {"id": "robot"}})
        current = a.text("config.current")
        assert current["avatar"] == "robot" and current["avatars"] == ["astronaut", "robot", "broken"]
        stream(a, 2)
        stream(b, 2)
        assert a.text("vision")["lipsync"]["avatar"] == "robot"
        assert b.text("vision")["lipsync"]["avatar"] == "astronaut"
        assert all(m["type"] != "config.current" for m in b.texts)  # b was not told of a's choice
        # A shared config change reaches both; each still sees its own avatar.
        b.send({"type": "config.update", "payload": {"strength": 0.25}})
        assert a.text("config.current")["avatar"] == "robot"
        assert b.text("config.current")["avatar"] == "astronaut"
    assert list(lipsync_hooks.selected.values()) == ["robot"]


@pytest.mark.parametrize("payload, code, message", [
    ({"id": "nobody"}, "unknown_avatar", "unknown avatar 'nobody'; known: astronaut, robot, broken"),
    ({"id": "../robot"}, "unknown_avatar", "no avatar is called '../robot': avatar ids match [a-z0-9][a-z0-9_-]{0,63}"),
    ({"id": 3}, "bad_payload", "avatar.select needs a string 'id', got 3"),
    ({"avatar": "robot"}, "bad_payload", "unknown key 'avatar' in avatar.select; allowed: 'id'"),
])
def test_avatar_select_refusals(lipsync_server, lipsync_hooks, payload, code, message):
    with Client.open(lipsync_server) as client:
        client.text("config.current")
        client.send({"type": "avatar.select", "payload": payload})
        assert client.text("error") == {"code": code, "message": message}
        stream(client, 2)
        assert client.text("vision")["lipsync"]["avatar"] == "astronaut"  # the old choice stands
    assert lipsync_hooks.selected == {}


def test_avatar_select_config_error_is_bad_config(lipsync_server, lipsync_hooks):
    with Client.open(lipsync_server) as client:
        client.text("config.current")
        lipsync_hooks.fail_next = ConfigError("has no lip-sync model yet; load it first", "avatar.robot")
        client.send({"type": "avatar.select", "payload": {"id": "robot"}})
        assert client.text("error") == {"code": "bad_config",
                                        "message": "avatar.robot: has no lip-sync model yet; load it first"}


def test_avatar_select_on_a_camera_pipeline(server):
    with Client.open(server) as client:
        client.text("config.current")
        client.send({"type": "avatar.select", "payload": {"id": "astronaut"}})
        assert client.text("error") == {"code": "unknown_avatar",
                                        "message": "this pipeline shows no avatars (it takes camera frames)"}
        client.roundtrip(1)


def test_submit_audio_failure_is_contained(lipsync_server, lipsync_hooks):
    with Client.open(lipsync_server) as client:
        client.text("config.current")
        lipsync_hooks.fail_next = RuntimeError("queue exploded")
        client.send(audio_chunk(0, 0.0, tone(CHUNK)))
        assert client.text("error") == {"code": "internal", "message": "RuntimeError: queue exploded"}
        stream(client, 2, first_id=1)
        assert client.binary().frame_id == 0


def test_hooks_from_before_lip_sync_are_a_camera_pipeline(server, hooks):
    """A hooks object without takes/submit_audio/select_avatar (a runtime not updated yet)."""
    hooks.takes = None  # not callable: as if the method did not exist
    with Client.open(server) as client:
        client.text("config.current")
        client.roundtrip(1)
        client.send(audio_chunk(0, 0.0, bytes(640)))
        assert client.text("error")["code"] == "unsupported_kind"
        client.send({"type": "avatar.select", "payload": {"id": "astronaut"}})
        assert client.text("error")["code"] == "unknown_avatar"


def test_a_pipeline_that_takes_something_else_refuses_sessions(server, hooks, monkeypatch):
    monkeypatch.setattr(hooks, "takes", lambda: "video")
    with Client.open(server) as client:
        error = client.text("error")
        with pytest.raises(ConnectionClosed):
            client.ws.recv(timeout=3)
    assert error["code"] == "internal" and "must return 'camera' or 'audio', got 'video'" in error["message"]


def test_pcm_reaches_the_pipeline_unchanged(lipsync_server, lipsync_hooks, monkeypatch):
    got = []
    real = lipsync_hooks.submit_audio
    monkeypatch.setattr(lipsync_hooks, "submit_audio", lambda *args: (got.append(args), real(*args)))
    pcm = struct.pack("<4h", -32768, -1, 0, 32767)
    with Client.open(lipsync_server) as client:
        client.text("config.current")
        client.send(audio_chunk(0xFFFFFFFF, 1732345678901.123, pcm))
        client.send(audio_chunk(1, 0.0, bytes(1276)))
        assert client.binary().frame_id == 0
    session, chunk_id, client_ts, data = got[0]
    assert (chunk_id, client_ts, data) == (0xFFFFFFFF, 1732345678901.123, pcm)
    assert session == lipsync_hooks.opened[0]
