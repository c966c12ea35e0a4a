"""VisionStage end to end on the astronaut fixture and on awkward frames."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from comms.message import Kind, Message
from core.config import ConfigError, build
from stages.vision import EMOTION_LABELS, VisionConfig, VisionStage
from vision_testutil import ASTRONAUT_FACE, box_iou


def make_stage(context, **overrides) -> VisionStage:
    stage = VisionStage(VisionConfig(**overrides), context)
    stage.setup()
    return stage


def frame(array: np.ndarray, session: str = "s", frame_id: int = 0, **meta) -> Message:
    return Message(kind=Kind.DATA, session=session, frame_id=frame_id, capture_ts=123.0,
                   meta=dict(meta), tensors=[torch.from_numpy(array)])


def test_astronaut_over_ten_frames(context, astronaut_rgb):
    stage = make_stage(context)
    seen_ids = set()
    for i in range(10):
        msg = frame(astronaut_rgb, frame_id=i, source="camera")
        (out,) = stage.process([msg])
        assert out.kind == Kind.DATA and out.frame_id == i and out.session == "s"
        assert out.capture_ts == 123.0 and out.meta["source"] == "camera"
        assert out.tensors[0] is msg.tensors[0]
        assert [name for name, _ in out.trace][-2:] == ["vision.start", "vision.end"]
        (face,) = out.meta["faces"]
        seen_ids.add(face["face_id"])
        assert all(isinstance(v, int) for v in face["bbox"])
        assert box_iou(face["bbox"], ASTRONAUT_FACE) > 0.5
        assert face["emotion"] in EMOTION_LABELS
        assert list(face["emotion_probs"]) == list(EMOTION_LABELS)
        assert abs(sum(face["emotion_probs"].values()) - 1.0) < 1e-3
        top2 = sorted(face["emotion_probs"], key=face["emotion_probs"].get, reverse=True)[:2]
        assert "happy" in top2
        assert 0.0 <= face["quality"] <= 1.0
    assert seen_ids == {1}


def test_quality_falls_with_blur_and_size(context, astronaut_rgb):
    import cv2

    stage = make_stage(context)
    sharp = stage.process([frame(astronaut_rgb, "a")])[0].meta["faces"][0]["quality"]
    blurred = cv2.GaussianBlur(astronaut_rgb, (0, 0), 3)
    soft = stage.process([frame(blurred, "b")])[0].meta["faces"][0]["quality"]
    assert 0.0 < soft < sharp <= 1.0
    stage.config = dataclasses.replace(stage.config, quality_full_px=400)
    small = stage.process([frame(astronaut_rgb, "c")])[0].meta["faces"][0]["quality"]
    assert small < sharp


def test_two_sessions_keep_independent_tracks(context, astronaut_rgb):
    stage = make_stage(context)
    blank = np.full_like(astronaut_rgb, 90)
    flipped = np.ascontiguousarray(astronaut_rgb[:, ::-1])
    for i in range(4):
        outs = stage.process([frame(astronaut_rgb, "a", i), frame(blank, "b", i), frame(flipped, "c", i)])
        a, b, c = (o.meta["faces"] for o in outs)
        assert [f["face_id"] for f in a] == [1] and [f["face_id"] for f in c] == [1]
        assert b == []
        assert box_iou(a[0]["bbox"], ASTRONAUT_FACE) > 0.5
        mirrored = (640 - ASTRONAUT_FACE[0] - ASTRONAUT_FACE[2], *ASTRONAUT_FACE[1:])
        assert box_iou(c[0]["bbox"], mirrored) > 0.5
    assert sorted(stage.tracker.sessions()) == ["a", "b", "c"]


def test_blank_frame_has_no_faces(context):
    stage = make_stage(context)
    (out,) = stage.process([frame(np.zeros((480, 640, 3), np.uint8))])
    assert out.meta["faces"] == []


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 1), (7, 5, 3), (30, 2000, 3), (480, 640, 1), (48, 64, 4)])
def test_odd_frames_do_not_crash(context, shape):
    stage = make_stage(context)
    rng = np.random.default_rng(0)
    for i in range(4):
        (out,) = stage.process([frame(rng.integers(0, 256, shape, dtype=np.uint8), frame_id=i)])
        assert out.kind == Kind.DATA and isinstance(out.meta["faces"], list)


def test_gray_frame_still_finds_the_face(context, astronaut_rgb):
    stage = make_stage(context)
    gray = np.repeat(astronaut_rgb.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2)
    (face,) = stage.process([frame(gray)])[0].meta["faces"]
    assert box_iou(face["bbox"], ASTRONAUT_FACE) > 0.5


def test_unusable_messages_are_dropped_with_an_event(context):
    events = []
    context.publish_event = events.append
    stage = make_stage(context)
    bad = [frame(np.zeros((4, 4, 3), np.float32)), frame(np.zeros((0, 4, 3), np.uint8)),
           frame(np.zeros((4, 4, 2), np.uint8)), Message(kind=Kind.DATA, session="s"),
           Message(session="s", tensors=[torch.zeros(12, dtype=torch.uint8)])]
    good = frame(np.zeros((40, 40, 3), np.uint8))
    outs = stage.process(bad + [good])
    assert len(outs) == 1 and outs[0].frame_id == good.frame_id
    assert len(events) == len(bad)
    assert all(e.kind == Kind.EVENT and e.meta["code"] == "vision_bad_frame" for e in events)


def test_batched_equals_one_by_one(context, astronaut_rgb):
    """One micro-batch of several sessions gives what separate calls give."""
    frames = [astronaut_rgb, np.ascontiguousarray(astronaut_rgb[:, ::-1]),
              np.ascontiguousarray(astronaut_rgb[40:, 60:]), np.full_like(astronaut_rgb, 30)]
    together = make_stage(context, emotion_batch_max=3)
    alone = make_stage(context)
    for step in range(3):
        batch = together.process([frame(f, f"s{i}", step) for i, f in enumerate(frames)])
        single = [alone.process([frame(f, f"s{i}", step)])[0] for i, f in enumerate(frames)]
        for b, s in zip(batch, single):
            assert [f["emotion"] for f in b.meta["faces"]] == [f["emotion"] for f in s.meta["faces"]]
            assert [f["bbox"] for f in b.meta["faces"]] == [f["bbox"] for f in s.meta["faces"]]
            for fb, fs in zip(b.meta["faces"], s.meta["faces"]):
                for label in EMOTION_LABELS:
                    assert abs(fb["emotion_probs"][label] - fs["emotion_probs"][label]) < 1e-3


def test_process_before_setup_is_an_error(context):
    stage = VisionStage(VisionConfig(), context)
    with pytest.raises(RuntimeError, match="setup"):
        stage.process([])
    stage.setup()
    stage.teardown()
    stage.teardown()  # idempotent


def test_missing_weights_fail_setup(context, tmp_path):
    stage = VisionStage(VisionConfig(emotion_weights=str(tmp_path / "none.pt")), context)
    with pytest.raises(FileNotFoundError, match="none.pt"):
        stage.setup()


def test_config_errors_name_field_and_range():
    with pytest.raises(ConfigError, match=r"vision\.detect_every: must be within 1\.\.30, got 0"):
        build(VisionConfig, {"detect_every": 0}, "vision")
    with pytest.raises(ConfigError, match=r"vision\.detect_widht: unknown key"):
        build(VisionConfig, {"detect_widht": 320}, "vision")
    with pytest.raises(ConfigError, match="emotion_weights"):
        VisionConfig(emotion_weights=" ")
    assert build(VisionConfig, {"emotion_weights": None}).weights_path.name == "emotion_mini_xception.pt"
