"""The whole mirror pipeline in one process (in-process links) behind the real server."""

import asyncio
import json
import re
import urllib.request

import pytest

from runtime.config import load_config
from runtime.planner import plan
from runtime.rank_runtime import RankRuntime
from tests.integration.mirror_client import FIXTURE, MirrorClient, camera_frame

EMOTIONS = {"angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"}
FACE = (221, 83, 119, 119)  # where the astronaut's face is (tests/fixtures/README.md)


def iou(a, b):
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0, min(ay + ah, by + bh) - max(ay, by))
    return w * h / (aw * ah + bw * bh - w * h)


@pytest.fixture
def runtime():
    config = load_config("configs/local.yaml", {"server.port": 0})
    rt = RankRuntime(config, plan(config.pipeline, 1), 0)
    rt.start()
    yield rt
    rt.close()


def check_stream(got, last_id):
    ids = [f.frame_id for f in got.outputs]
    assert ids == sorted(set(ids)), f"outputs out of order or repeated: {ids}"
    assert ids[-1] == last_id
    visions = {v["frame_id"]: v for v in got.of_type("vision")}
    for frame_id in ids:
        faces = visions[frame_id]["faces"]
        assert len(faces) == 1, faces
        face = faces[0]
        assert iou(face["bbox"], FACE) > 0.5 and face["emotion"] in EMOTIONS
        assert abs(sum(face["emotion_probs"].values()) - 1) < 0.01
        assert 0 <= face["quality"] <= 1
    assert len({visions[i]["faces"][0]["face_id"] for i in ids}) == 1, "face id should be stable"
    for out in got.outputs:
        assert out.payload[:2] == b"\xff\xd8", "output frames are JPEG"


def test_frames_come_back_in_order_with_faces_and_emotions(runtime):
    async def scenario():
        async with MirrorClient(runtime.pieces.front.server.port) as client:
            await client.stream(20, fps=15)
            assert await client.wait_for(lambda g: g.outputs and g.outputs[-1].frame_id == 19)
            return client.got

    got = asyncio.run(scenario())
    check_stream(got, 19)
    assert got.of_type("config.current")[0]["revision"] == 1


def test_a_config_change_reaches_the_frames_that_follow(runtime):
    async def scenario():
        async with MirrorClient(runtime.pieces.front.server.port) as client:
            await client.stream(3, fps=15)
            await client.send_text("config.update", {"style": "ink", "output_size": 256})
            assert await client.wait_for(lambda g: any(c["revision"] == 2 for c in g.of_type("config.current")))
            await client.stream(5, fps=15, first_id=3)
            assert await client.wait_for(lambda g: g.outputs and g.outputs[-1].frame_id == 7)
            return client.got

    got = asyncio.run(scenario())
    current = [c for c in got.of_type("config.current") if c["revision"] == 2][0]
    assert current["config"]["style"] == "ink" and current["config"]["output_size"] == 256
    revisions = {v["frame_id"]: v["revision"] for v in got.of_type("vision")}
    assert revisions[7] == 2 and all(revisions[i] == 1 for i in revisions if i < 3)


def test_bad_input_gets_errors_and_disturbs_no_one(runtime):
    jpeg = FIXTURE.read_bytes()
    undecodable = jpeg[:jpeg.index(b"\xff\xc4")] + b"\xff\xd9"  # headers incl. size, no image data

    async def scenario():
        async with MirrorClient(runtime.pieces.front.server.port) as bystander, MirrorClient(runtime.pieces.front.server.port) as client:
            streaming = asyncio.create_task(bystander.stream(15, fps=10))
            await client.ws.send(b"XXXX" + bytes(16) + jpeg)
            await client.ws.send(b"MMF1")
            await client.ws.send(camera_frame(1, b"not a jpeg at all"))
            await client.ws.send(camera_frame(2, undecodable))
            await client.ws.send("{not json")
            await client.send_text("no.such.type", {})
            await client.send_text("config.update", {"strength": 7})
            await client.stream(3, fps=10, first_id=10)
            await streaming
            assert await client.wait_for(lambda g: g.outputs and g.outputs[-1].frame_id == 12)
            assert await bystander.wait_for(lambda g: g.outputs and g.outputs[-1].frame_id == 14)
            await client.wait_for(lambda g: len(g.of_type("error")) >= 7, timeout=5)
            return client.got, bystander.got

    got, bystander = asyncio.run(scenario())
    codes = [e["code"] for e in got.of_type("error")]
    assert codes[:2] == ["bad_magic", "short_header"], codes
    # One refused by the server's JPEG probe, one that passed the probe but failed to decode.
    assert codes.count("bad_jpeg") == 2, codes
    assert {"bad_json", "unknown_type", "bad_config"} <= set(codes), codes
    assert not bystander.of_type("error"), "another session's bad input must not reach this one"
    check_stream(bystander, 14)
    assert [f.frame_id for f in got.outputs] == sorted(f.frame_id for f in got.outputs)


def test_health_and_metrics_endpoints(runtime):
    port = runtime.pieces.front.server.port
    health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5))
    assert health["ok"] and health["ranks"][0]["role"] == "server+ingest+vision+generator+display"
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "mindmirror_output_fps " in metrics and 'mindmirror_rank_up{node="0",rank="0"' in metrics


def test_a_session_that_left_leaves_no_state_behind(runtime):
    async def scenario():
        for _ in range(3):
            async with MirrorClient(runtime.pieces.front.server.port) as client:
                await client.stream(4, fps=30)  # leaves with frames still in the pipeline
        await asyncio.sleep(1.0)

    asyncio.run(scenario())
    front = runtime.pieces.front
    assert front.aggregator.stats()["sessions"] == {}
    assert front.inbox.dropped == {} and front.sink._last_frame == {}


def test_a_scene_cut_leaves_no_box_of_the_old_scene(runtime):
    """Astronaut frames, then a cut to the six-person group photo: from the first frame of
    the new scene on, every box sits on one of its faces and none keeps an old face id."""
    group = json.loads((FIXTURE.parent / "group6_faces.json").read_text())["faces"]
    group_jpeg = (FIXTURE.parent / "group6_640x480.jpg").read_bytes()

    async def scenario():
        async with MirrorClient(runtime.pieces.front.server.port) as client:
            await client.stream(8, fps=10)
            assert await client.wait_for(lambda g: g.outputs and g.outputs[-1].frame_id == 7)
            await client.stream(8, fps=10, jpeg=group_jpeg, first_id=8)
            assert await client.wait_for(lambda g: g.outputs and g.outputs[-1].frame_id == 15)
            return client.got

    got = asyncio.run(scenario())
    visions = {v["frame_id"]: v for v in got.of_type("vision")}
    before = {face["face_id"] for i, v in visions.items() if i < 8 for face in v["faces"]}
    assert before, "the astronaut was never found"
    after = [v for i, v in sorted(visions.items()) if i >= 8]
    assert after, "no frame of the new scene came back"
    for v in after:
        for face in v["faces"]:
            assert face["face_id"] not in before, (v["frame_id"], face)
            assert max(iou(face["bbox"], g["box"]) for g in group) > 0.3, (v["frame_id"], face["bbox"])
    assert max(len(v["faces"]) for v in after) >= 5
    # Each frame says what made it; /metrics counts it.
    assert {v["generator"] for v in visions.values()} == {"stylenet"}
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{runtime.pieces.front.server.port}/metrics",
                                     timeout=5).read().decode()
    made = re.search(r'mindmirror_frames_by_generator_total\{generator="stylenet"\} (\d+)', metrics)
    assert made and int(made.group(1)) == len(got.outputs), metrics
