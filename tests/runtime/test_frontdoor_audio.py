"""The front door of a pipeline that takes the page's audio: chunks tagged with the
session's avatar, avatar selection checked against the avatar folder, model commands."""

from __future__ import annotations

import pytest
import torch

from core.settings import RuntimeSettings
from runtime.affinity import Affinity
from runtime.aggregate import Aggregator
from runtime.frontdoor import FrontDoor, ModelService
from runtime.live_config import LiveConfig
from runtime.live_view import LiveView
from runtime.session_queue import SessionQueue
from stages.lipsync.avatar import AvatarStore
from stages.lipsync.catalog import AvatarCatalog
from stages.lipsync.directory import ModelDirectory
from stages.lipsync.prepare import ensure_default_avatar
from stages.server.protocol import ProtocolError


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> AvatarStore:
    root = tmp_path_factory.mktemp("avatars")
    ensure_default_avatar(root)
    return AvatarStore(root)


def door(store: AvatarStore | None, takes: str = "audio", sent: list | None = None) -> FrontDoor:
    live = LiveView(1, RuntimeSettings())
    inbox = SessionQueue("sessions", 100)
    aggregator = Aggregator(roles={0: "server"}, liveness=dict, inbox=inbox, live=live,
                            local_snapshot=lambda: {"rank": 0, "role": "server", "stages": {}, "links": {}})
    models = None
    if sent is not None:
        affinity = Affinity({"lipsync": ModelDirectory(2)}, local_stages=dict, send=sent.append)
        models = ModelService(stage="lipsync", affinity=affinity)
    return FrontDoor(pipeline="lipsync", live_config=LiveConfig(RuntimeSettings(), {}), live_view=live, inbox=inbox,
                     aggregator=aggregator, publish_config=lambda revision, settings: None, health=dict, takes=takes,
                     catalog=None if store is None else AvatarCatalog(store, "astronaut"), models=models)


def test_audio_chunks_carry_the_sessions_avatar(store):
    d = door(store)
    d.open_session("s1")
    d.submit_audio("s1", 0, 1000.0, (b"\x01\x00" * 320))
    msg = d.inbox.recv(timeout=1)
    assert msg.tensors[0].dtype == torch.int16 and msg.tensors[0].tolist()[:2] == [1, 1]
    assert msg.meta == {"sample_rate": 16000, "avatar": "astronaut", "first_sample": 0} and msg.capture_ts == 1000.0
    d.submit_audio("s1", 1, 1020.0, (b"\x00\x00" * 160))
    d.submit_audio("s1", 2, 1030.0, (b"\x00\x00" * 320))
    assert [d.inbox.recv(timeout=1).meta["first_sample"] for _ in range(2)] == [320, 480]
    with pytest.raises(ProtocolError, match="takes audio chunks"):
        d.submit_frame("s1", 1, 0.0, b"\xff\xd8", 16, 16)


def test_selecting_an_avatar_checks_the_folder(store):
    d = door(store)
    d.open_session("s1")
    with pytest.raises(LookupError, match="nobody"):
        d.select_avatar("s1", "nobody")
    with pytest.raises(LookupError):
        d.select_avatar("s1", "../astronaut")
    current = d.select_avatar("s1", "astronaut")
    assert current["avatar"] == "astronaut" and current["avatars"] == ["astronaut"]
    d.close_session("s1")
    assert d.avatar_of("s1") == "astronaut"  # the default again for a new session of that id


def test_model_commands_and_listing(store):
    sent = []
    d = door(store, sent=sent)
    reply = d.model_action("astronaut", "load")
    assert reply["accepted"] and reply["replica"] in (0, 1)
    assert sent[-1].meta["command"] == {"action": "load", "key": "astronaut"}
    assert d.models()["avatars"]["astronaut"]["state"] == "assigned"
    assert "registry" in d.config_current() and "registry" in d.stats()
    with pytest.raises(ValueError, match="allowed: 'load', 'unload'"):
        d.model_action("astronaut", "delete")
    with pytest.raises(LookupError):
        d.model_action("nobody", "load")


def test_a_camera_pipeline_refuses_audio_and_serves_no_models():
    d = door(None, takes="camera")
    with pytest.raises(ProtocolError, match="takes camera frames"):
        d.submit_audio("s1", 0, 0.0, b"\x00\x00")
    with pytest.raises(LookupError, match="serves no models"):
        d.models()
    with pytest.raises(LookupError, match="has no avatars"):
        d.select_avatar("s1", "astronaut")
    assert "avatars" not in d.config_current()
