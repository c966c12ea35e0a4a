"""The lip-sync pipeline end to end: real speech (espeak-ng) over a real WebSocket, the
launcher in one process and as four gloo ranks, frames checked against the audio.

What must hold for a user: frames come back in order, one per 40 ms of audio; the
avatar's mouth moves with the speech and not in silence (mouth-region change correlates
with loudness); the frames line up with the audio they were made from (A/V offset).
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from stages.lipsync.audio_windows import lookahead_seconds
from stages.lipsync.avatar import AvatarStore, pingpong
from stages.lipsync.prepare import build_avatar, ensure_default_avatar
from tests.integration.lipsync_client import decode, espeak_speech, frame_loudness_db, have_espeak, talk
from tests.integration.processes import REPO, RankProcesses

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(not have_espeak(), reason="needs espeak-ng (apt install espeak-ng)")]

TEXT = "Hello there. This is a test of the lip sync pipeline, speaking clearly."


@pytest.fixture(scope="module")
def avatars(tmp_path_factory) -> Path:
    """An avatar folder with the default astronaut and a second avatar (the photo mirrored)."""
    root = tmp_path_factory.mktemp("avatars")
    ensure_default_avatar(root)
    photo = root.parent / "mirrored.jpg"
    cv2.imwrite(str(photo), cv2.flip(cv2.imread(str(REPO / "tests/fixtures/astronaut_640x480.jpg")), 1))
    build_avatar(image=photo, video=None, avatar="mirrored", root=root, seconds=2.0)
    return root


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return espeak_speech(TEXT)


def config_file(tmp_path: Path, source: str, avatars: Path) -> Path:
    data = yaml.safe_load((REPO / "configs" / source).read_text())
    data["lipsync"]["avatar_dir"] = str(avatars)
    data["composite"]["avatar_dir"] = str(avatars)
    data.pop("server", None)
    path = tmp_path / source
    path.write_text(yaml.safe_dump(data))
    return path


def mouth_change(frames: dict[int, np.ndarray], store: AvatarStore, avatar: str) -> dict[int, float]:
    """Mean absolute change of each frame's mouth region against the avatar's own frame."""
    n = store.manifest(avatar).frame_count
    rects = store.crop_rects(avatar)
    change = {}
    for i, image in frames.items():
        k = pingpong(i, n)
        x1, y1, x2, y2 = (int(v) for v in rects[k])
        side = x2 - x1
        box = (slice(y1 + int(0.3 * side), y1 + int(0.75 * side)), slice(x1 + int(0.25 * side), x1 + int(0.75 * side)))
        background = store.read_frame(avatar, k)
        change[i] = float(np.abs(image[box].astype(np.float32) - background[box].astype(np.float32)).mean())
    return change


def check_lipsync(got, pcm: np.ndarray, store: AvatarStore, avatar: str) -> dict[str, float]:
    """The user-visible contract of one talking session; returns the figures it measured."""
    assert not got.of_type("error"), got.of_type("error")
    ids = [frame.frame_id for frame in got.outputs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "frames must come in order, each once"
    # every frame whose look-ahead the audio covers; the last ~0.45 s waits for audio that never comes
    expected = int((len(pcm) / 16000 - lookahead_seconds()) * 25)
    assert ids == list(range(len(ids))) and len(ids) >= expected, f"{len(ids)} frames for {len(pcm) / 16000:.2f} s"
    visions = {v["frame_id"]: v["lipsync"] for v in got.of_type("vision")}
    assert {v["avatar"] for v in visions.values()} == {avatar}
    frames = {frame.frame_id: decode(frame) for frame in got.outputs}
    change = mouth_change(frames, store, avatar)
    order = sorted(change)
    loudness = np.maximum(frame_loudness_db(pcm, max(order) + 1)[order], -60.0)
    moved = np.array([change[i] for i in order])
    correlation = float(np.corrcoef(moved, loudness)[0, 1])
    silent = [change[i] for i in order if not visions[i]["speech"]]
    spoken = [change[i] for i in order if visions[i]["speech"]]
    assert silent and spoken, "the audio has both silence and speech"
    assert correlation >= 0.5, f"mouth change vs loudness correlation {correlation:.2f}"
    assert np.median(silent) < 2.0 < np.median(spoken), (np.median(silent), np.median(spoken))
    # A/V offset: the lag (in frames) at which the mouth follows the loudness best.
    lags = range(-8, 9)
    score = [np.corrcoef(np.roll(moved, lag), loudness)[0, 1] for lag in lags]
    offset = lags[int(np.argmax(score))]
    assert abs(offset) <= 1, f"mouth follows the audio {offset} frames off"
    return {"frames": len(ids), "correlation": correlation, "av_offset_frames": offset,
            "latency_p50_ms": float(np.median(got.latencies_ms))}


def test_lipsync_in_one_process(tmp_path, avatars, speech):
    procs = RankProcesses(1, config_file(tmp_path, "lipsync-local.yaml", avatars), tmp_path)
    try:
        port = procs.wait_ready()
        got = asyncio.run(talk(port, speech))
        figures = check_lipsync(got, speech, AvatarStore(avatars), "astronaut")
        assert {v["lipsync"]["generator"] for v in got.of_type("vision")} == {"silence", "mouth-synth"}
        print("one process:", figures)
    finally:
        procs.kill_all()


def test_lipsync_on_four_ranks_places_avatars_by_affinity(tmp_path, avatars, speech):
    procs = RankProcesses(4, config_file(tmp_path, "lipsync.yaml", avatars), tmp_path)
    try:
        port = procs.wait_ready(timeout=120)
        got = asyncio.run(talk(port, speech))
        print("four ranks:", check_lipsync(got, speech, AvatarStore(avatars), "astronaut"))
        got = asyncio.run(talk(port, speech[: 16000 * 3], avatar="mirrored", settle_s=2.5))
        assert not got.of_type("error")
        assert {v["lipsync"]["avatar"] for v in got.of_type("vision")} == {"mirrored"}

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/models", timeout=10) as reply:
            models = json.load(reply)
        where = {avatar: info for avatar, info in models["avatars"].items()}
        # least_loaded: the second avatar goes to the replica that did not hold the first
        assert set(where) >= {"astronaut", "mirrored"}, models
        assert where["astronaut"]["replicas"] != where["mirrored"]["replicas"], models
    finally:
        procs.kill_all()
