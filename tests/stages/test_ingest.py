"""IngestStage: JPEG bytes in, RGB frames out; broken or huge payloads become events."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from comms.message import Kind, Message
from core.config import ConfigError
from core.settings import RuntimeSettings, RuntimeView
from stages.base import StageContext
from stages.ingest import IngestConfig, IngestStage
from stages.jpeg_header import jpeg_size

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "astronaut_640x480.jpg"


def make_stage(**config) -> tuple[IngestStage, list[Message]]:
    events: list[Message] = []
    context = StageContext(rank=1, role="ingest", replica=0, device=torch.device("cpu"),
                           logger=logging.getLogger("test.ingest"),
                           runtime=lambda: RuntimeView(revision=1, settings=RuntimeSettings()),
                           publish_event=events.append)
    stage = IngestStage(IngestConfig(**config), context)
    stage.setup()
    return stage, events


def camera_msg(data: bytes, frame_id: int = 7, **meta) -> Message:
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return Message(kind=Kind.DATA, session="s1", frame_id=frame_id, capture_ts=123.0,
                   meta=dict(meta), tensors=[payload])


def encode(rgb: np.ndarray, quality: int = 85) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def test_decodes_fixture_to_rgb_frame():
    stage, events = make_stage()
    data = FIXTURE.read_bytes()
    (out,) = stage.process([camera_msg(data, width=640, height=480, extra="kept")])
    frame = out.tensors[0]
    assert out.kind == Kind.DATA and (out.session, out.frame_id, out.capture_ts) == ("s1", 7, 123.0)
    assert frame.shape == (480, 640, 3) and frame.dtype == torch.uint8 and frame.is_contiguous()
    assert out.meta == {"width": 640, "height": 480, "extra": "kept"}
    # RGB, not BGR: matches OpenCV's decode with the channels swapped.
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(frame.numpy(), bgr[:, :, ::-1])
    assert [name for name, _ in out.trace] == ["ingest.start", "ingest.end"]
    assert events == []


def test_corrupt_payload_publishes_event_and_emits_nothing():
    stage, events = make_stage()
    good = FIXTURE.read_bytes()
    broken = camera_msg(b"\xff\xd8 this is not really a jpeg" * 10, frame_id=8)
    garbage = camera_msg(b"GIF89a" + bytes(100), frame_id=9)
    outputs = stage.process([broken, camera_msg(good, frame_id=10), garbage])
    assert [o.frame_id for o in outputs] == [10]
    assert [(e.kind, e.session, e.frame_id, e.meta["code"]) for e in events] == [
        (Kind.EVENT, "s1", 8, "bad_jpeg"), (Kind.EVENT, "s1", 9, "bad_jpeg")]
    assert all(isinstance(e.meta["message"], str) and e.meta["message"] for e in events)


def test_truncated_jpeg_body_is_rejected_or_decoded_but_never_raises():
    stage, events = make_stage()
    data = FIXTURE.read_bytes()
    outputs = stage.process([camera_msg(data[: len(data) // 3]), camera_msg(data[:200])])
    # libjpeg fills a cut-off scan with grey; a cut-off header is undecodable.
    assert len(outputs) + len(events) == 2
    assert all(o.tensors[0].shape == (480, 640, 3) for o in outputs)


def test_wide_frames_are_downscaled():
    stage, events = make_stage(max_width=640)
    wide = np.zeros((1200, 2600, 3), np.uint8)
    wide[:, :1300] = (255, 0, 0)
    (out,) = stage.process([camera_msg(encode(wide))])
    frame = out.tensors[0].numpy()
    assert frame.shape == (295, 640, 3)
    assert (out.meta["width"], out.meta["height"], out.meta["scaled_from"]) == (640, 295, [2600, 1200])
    assert frame[150, 100, 0] > 200 and frame[150, 100, 2] < 50  # still red on the left
    assert frame[150, 600].max() < 50
    assert events == []


def test_frames_over_max_pixels_are_refused_undecoded():
    stage, events = make_stage(max_pixels=640 * 480 - 1)
    assert stage.process([camera_msg(FIXTURE.read_bytes())]) == []
    assert [e.meta["code"] for e in events] == ["frame_too_large"]


def test_non_byte_payload_is_reported():
    stage, events = make_stage()
    msg = Message(kind=Kind.DATA, session="s2", frame_id=1, tensors=[torch.zeros(4, 4)])
    assert stage.process([msg]) == []
    assert events[0].meta["code"] == "bad_jpeg" and events[0].session == "s2"


def test_jpeg_size_reads_the_frame_header():
    assert jpeg_size(FIXTURE.read_bytes()) == (640, 480)
    with pytest.raises(ValueError, match="JPEG ends inside a marker"):
        jpeg_size(b"\xff\xd8\xff\xff")
    with pytest.raises(ValueError, match="no SOI marker"):
        jpeg_size(b"not a jpeg")


def test_config_is_validated():
    with pytest.raises(ConfigError, match="max_width"):
        IngestConfig(max_width=0)
