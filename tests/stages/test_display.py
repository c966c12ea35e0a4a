"""DisplayStage: portraits become JPEG bytes plus the vision payload for the page."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import torch

from comms.message import Kind, Message
from core.config import ConfigError
from core.settings import RuntimeSettings, RuntimeView
from stages.base import StageContext
from stages.display import DisplayConfig, DisplayStage

FACES = [{"face_id": 3, "bbox": [10, 20, 30, 30], "emotion": "happy", "emotion_probs": {"happy": 0.8},
          "quality": 0.9}]


def make_stage(jpeg_quality: int = 80, **config) -> tuple[DisplayStage, list[Message]]:
    events: list[Message] = []
    settings = RuntimeSettings(jpeg_quality=jpeg_quality)
    context = StageContext(rank=3, role="display", replica=0, device=torch.device("cpu"),
                           logger=logging.getLogger("test.display"),
                           runtime=lambda: RuntimeView(revision=4, settings=settings),
                           publish_event=events.append)
    stage = DisplayStage(DisplayConfig(**config), context)
    stage.setup()
    return stage, events


def portrait(size: int = 96) -> torch.Tensor:
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 200)], axis=-1).astype(np.uint8)
    return torch.from_numpy(rgb)


def portrait_msg(tensor: torch.Tensor, frame_id: int = 11, faces=FACES) -> Message:
    style = {"generator": "stylenet", "name": "auto/happy", "emotion": "happy", "confidence": 0.8, "face_id": 3,
             "crop": [0, 0, 90, 90], "angle": 0.0}
    meta = {"faces": faces, "style": style} if faces is not None else {}
    return Message(kind=Kind.DATA, session="s1", frame_id=frame_id, revision=4, capture_ts=55.0,
                   meta=meta, tensors=[tensor])


def test_emits_decodable_jpeg_and_page_payload():
    stage, events = make_stage()
    image = portrait()
    (out,) = stage.process([portrait_msg(image)])
    assert out.kind == Kind.DATA and (out.session, out.frame_id, out.revision, out.capture_ts) == (
        "s1", 11, 4, 55.0)
    data = out.tensors[0]
    assert data.dtype == torch.uint8 and data.dim() == 1
    bgr = cv2.imdecode(data.numpy(), cv2.IMREAD_COLOR)
    assert bgr.shape == (96, 96, 3)
    # Colours survive the trip (RGB in, RGB meaning out): mean error of a smooth gradient.
    assert np.abs(bgr[:, :, ::-1].astype(int) - image.numpy().astype(int)).mean() < 3
    # The page learns which face the portrait follows, and what made the portrait.
    assert out.meta["vision"] == {"frame_id": 11, "faces": [{**FACES[0], "primary": True}], "generator": "stylenet",
                                  "style": {"name": "auto/happy", "emotion": "happy", "confidence": 0.8}}
    assert out.meta["style"]["generator"] == "stylenet"
    assert [name for name, _ in out.trace] == ["display.start", "display.end"]
    assert events == []


def test_missing_faces_give_empty_list():
    stage, _ = make_stage()
    (out,) = stage.process([portrait_msg(portrait(), faces=None)])
    assert out.meta["vision"] == {"frame_id": 11, "faces": []}


def test_boxes_go_back_to_the_pixels_of_the_frame_the_browser_sent():
    stage, _ = make_stage()
    msg = portrait_msg(portrait())
    msg.meta.update(width=1280, height=720, scaled_from=[1920, 1080])  # ingest shrank it
    msg.meta["faces"] = [{**FACES[0], "landmarks": [[20, 30], [30, 30], [25, 36], [21, 42], [29, 42]]}]
    (out,) = stage.process([msg])
    assert out.meta["vision"]["faces"][0]["bbox"] == [15, 30, 45, 45]
    assert out.meta["vision"]["faces"][0]["landmarks"][0] == [30.0, 45.0]
    assert out.meta["faces"][0]["bbox"] == [10, 20, 30, 30]  # the decoded frame's own boxes stay


def test_quality_follows_runtime_settings_and_override():
    noisy = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    low, _ = make_stage(jpeg_quality=30)
    high, _ = make_stage(jpeg_quality=95)
    pinned, _ = make_stage(jpeg_quality=95, quality_override=30)
    sizes = [s.process([portrait_msg(noisy)])[0].tensors[0].numel() for s in (low, high, pinned)]
    assert sizes[0] < sizes[1] and sizes[2] == sizes[0]


def test_non_contiguous_portrait_and_bad_tensor():
    stage, events = make_stage()
    transposed = portrait().transpose(0, 1)  # a strided view is copied, not rejected
    assert not transposed.is_contiguous()
    bad = portrait_msg(torch.zeros(8, 8), frame_id=12)
    outputs = stage.process([portrait_msg(transposed), bad])
    assert [o.frame_id for o in outputs] == [11]
    assert [(e.frame_id, e.meta["code"]) for e in events] == [(12, "encode_failed")]


def test_config_is_validated():
    with pytest.raises(ConfigError, match="quality_override"):
        DisplayConfig(quality_override=10)
