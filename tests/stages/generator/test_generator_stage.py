"""GeneratorStage: analyzed frames become square stylized portraits of the primary face."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import pytest
import torch

from comms.message import Kind, Message
from core.config import ConfigError
from core.settings import RuntimeSettings, RuntimeView
from stages.base import StageContext
from stages.generator import GeneratorConfig, GeneratorStage

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "astronaut_640x480.jpg"
FACE = {"face_id": 1, "bbox": [221, 83, 119, 119], "emotion": "happy",
        "emotion_probs": {"happy": 0.9, "neutral": 0.1}, "quality": 0.95}


@pytest.fixture(scope="module")
def frame() -> torch.Tensor:
    return torch.from_numpy(cv2.cvtColor(cv2.imread(str(FIXTURE)), cv2.COLOR_BGR2RGB))


class Harness:
    """A stage with a switchable runtime view and a list of published events."""

    def __init__(self, **config) -> None:
        self.view = RuntimeView(revision=1, settings=RuntimeSettings())
        self.events: list[Message] = []
        context = StageContext(rank=2, role="generator", replica=0, device=torch.device("cpu"),
                               logger=logging.getLogger("test.generator"), runtime=lambda: self.view,
                               publish_event=self.events.append)
        self.stage = GeneratorStage(GeneratorConfig(**config), context)
        self.stage.setup()

    def set(self, revision: int, **settings) -> None:
        self.view = RuntimeView(revision=revision, settings=RuntimeSettings(**settings))


def analyzed(frame: torch.Tensor, session: str = "s1", frame_id: int = 1, faces=None,
             capture_ts: float = 1000.0) -> Message:
    return Message(kind=Kind.DATA, session=session, frame_id=frame_id, revision=1, capture_ts=capture_ts,
                   meta={"faces": [FACE] if faces is None else faces, "width": 640, "height": 480},
                   tensors=[frame])


def test_portrait_of_the_face(frame):
    h = Harness()
    (out,) = h.stage.process([analyzed(frame)])
    portrait = out.tensors[0]
    assert out.kind == Kind.DATA and (out.session, out.frame_id, out.revision) == ("s1", 1, 1)
    assert portrait.shape == (320, 320, 3) and portrait.dtype == torch.uint8 and portrait.is_contiguous()
    assert out.meta["faces"] == [FACE] and out.meta["width"] == 640
    style = out.meta["style"]
    assert (style["generator"], style["name"], style["emotion"], style["confidence"], style["face_id"]) == (
        "stylenet", "auto/happy", "happy", 0.9, 1)
    x, y, w, hgt = style["crop"]
    assert w == hgt and x <= 221 and y <= 83 and x + w >= 340 and y + w >= 202
    assert [name for name, _ in out.trace] == ["generator.start", "generator.end"]
    assert portrait.float().std() > 20  # a picture, not a flat fill
    assert h.events == []


def test_emotion_changes_the_learned_style(frame):
    h = Harness()
    h.set(revision=2, smoothing=0.0, strength=1.0)
    happy = h.stage.process([analyzed(frame, "a")])[0].tensors[0].float()
    sad = {**FACE, "emotion": "sad", "emotion_probs": {"sad": 0.9, "neutral": 0.1}}
    gloomy = h.stage.process([analyzed(frame, "b", faces=[sad])])[0].tensors[0].float()
    assert (happy - gloomy).abs().mean() > 20
    # Sad blends blue styles: the sad portrait is bluer than the happy one.
    blueness = lambda rgb: (rgb[..., 2] - rgb[..., 0]).mean()  # noqa: E731
    assert blueness(gloomy) > blueness(happy) + 10


def test_strength_blends_with_the_photo(frame):
    h = Harness()
    h.set(revision=2, smoothing=0.0, strength=0.0)
    (out,) = h.stage.process([analyzed(frame)])
    h.set(revision=3, smoothing=0.0, strength=1.0)
    (styled,) = h.stage.process([analyzed(frame, "b")])
    photo = out.tensors[0].float()
    # At strength 0 the portrait is the aligned photo crop itself.
    x, y, side, _ = out.meta["style"]["crop"]
    assert abs(photo.mean() - frame[max(y, 0):y + side, max(x, 0):x + side].float().mean()) < 6
    assert (styled.tensors[0].float() - photo).abs().mean() > 20


@pytest.mark.parametrize("model", ["stylenet", "lowfi"])
def test_follows_changed_live_settings(frame, model):
    h = Harness(model=model)
    h.stage.process([analyzed(frame)])
    h.set(revision=5, output_size=128, style="noir", strength=1.0)
    (out,) = h.stage.process([analyzed(frame, frame_id=2)])
    assert out.tensors[0].shape == (128, 128, 3) and out.revision == 5
    assert out.meta["style"]["name"] == "noir/happy" and out.meta["style"]["generator"] == model


def test_no_face_is_the_whole_frame_letterboxed(frame):
    h = Harness()
    (out,) = h.stage.process([analyzed(frame, faces=[])])
    portrait = out.tensors[0]
    assert portrait.shape == (320, 320, 3)
    assert out.meta["faces"] == [] and out.meta["style"]["crop"] == [0, -80, 640, 640]
    assert out.meta["style"]["emotion"] == "neutral" and out.meta["style"]["face_id"] is None


def test_primary_face_is_the_largest_and_stays(frame):
    small = {**FACE, "face_id": 9, "bbox": [20, 300, 40, 40], "emotion": "sad", "emotion_probs": {"sad": 1.0}}
    h = Harness()
    (out,) = h.stage.process([analyzed(frame, faces=[small, FACE])])
    assert out.meta["style"]["face_id"] == 1 and out.meta["style"]["emotion"] == "happy"
    bigger = {**small, "face_id": 7, "bbox": [400, 200, 200, 200]}
    (out,) = h.stage.process([analyzed(frame, frame_id=2, faces=[bigger, FACE])])
    assert out.meta["style"]["face_id"] == 1  # sticky while it stays


def test_window_eases_instead_of_jumping(frame):
    h = Harness(ease_s=0.25)
    left = {**FACE, "bbox": [60, 100, 100, 100]}
    right = {**FACE, "bbox": [480, 100, 100, 100]}
    h.stage.process([analyzed(frame, faces=[left], capture_ts=1000.0)])
    xs = [h.stage.process([analyzed(frame, frame_id=i, faces=[right], capture_ts=1000.0 + 50 * i)])[0]
          .meta["style"]["crop"][0] for i in range(1, 30)]
    steps = [b - a for a, b in zip(xs, xs[1:])]
    # 420 px to go: every 50 ms frame moves at most 1 - exp(-0.05 / 0.25) = 18 % of what is left.
    assert xs[0] < 200 and all(0 <= d <= 0.19 * 420 for d in steps)
    assert xs[-1] > 380


def test_mixed_session_batch_keeps_order_and_state(frame):
    h = Harness()
    sad = {**FACE, "emotion": "sad", "emotion_probs": {"sad": 0.8}}
    batch = [analyzed(frame, "a", 1), analyzed(frame, "b", 1, faces=[sad]), analyzed(frame, "a", 2, faces=[]),
             analyzed(frame.flip(0).contiguous(), "c", 1)]
    outputs = h.stage.process(batch)
    assert [(o.session, o.frame_id) for o in outputs] == [("a", 1), ("b", 1), ("a", 2), ("c", 1)]
    # Session a's face vanishing for one frame keeps its framing and emotion (face_hold_s).
    assert [o.meta["style"]["emotion"] for o in outputs] == ["happy", "sad", "happy", "happy"]
    assert outputs[2].meta["style"]["crop"] == outputs[0].meta["style"]["crop"]
    assert h.stage.sessions_tracked == 3


def test_lost_face_eases_out_to_the_whole_frame_after_hold(frame):
    h = Harness(face_hold_s=0.2, ease_s=0.0)
    h.stage.process([analyzed(frame, capture_ts=1000.0)])
    (held,) = h.stage.process([analyzed(frame, frame_id=2, faces=[], capture_ts=1150.0)])
    assert held.meta["style"]["face_id"] == 1 and held.meta["style"]["emotion"] == "happy"
    (out,) = h.stage.process([analyzed(frame, frame_id=3, faces=[], capture_ts=1250.0)])
    assert out.meta["style"]["crop"] == [0, -80, 640, 640] and out.meta["style"]["emotion"] == "neutral"


def test_smoothing_calms_shimmer_without_ghosts(frame):
    def second_frame(smoothing: float, second: torch.Tensor) -> torch.Tensor:
        h = Harness()
        h.set(revision=2, smoothing=smoothing)
        h.stage.process([analyzed(frame, capture_ts=1000.0)])
        return h.stage.process([analyzed(second, frame_id=2, capture_ts=1050.0)])[0].tensors[0].float()

    h = Harness()
    first = h.stage.process([analyzed(frame)])[0].tensors[0].float()
    noise = torch.randint(-4, 5, frame.shape, generator=torch.Generator().manual_seed(0))
    noisy = (frame.int() + noise).clamp(0, 255).to(torch.uint8)
    # Sensor noise: smoothing keeps the portrait closer to the previous one.
    assert (second_frame(0.9, noisy) - first).abs().mean() < (second_frame(0.0, noisy) - first).abs().mean() * 0.7
    # A different picture under the same face box: no trace of the first portrait.
    other = frame.flip(1).contiguous()
    assert (second_frame(0.9, other) - second_frame(0.0, other)).abs().mean() < 3


def test_lowfi_portrait_animates_with_capture_time(frame):
    h = Harness(model="lowfi")
    h.set(revision=2, smoothing=0.0)
    first = h.stage.process([analyzed(frame, capture_ts=1000.0)])[0].tensors[0].float()
    again = h.stage.process([analyzed(frame, frame_id=2, capture_ts=1000.0)])[0].tensors[0].float()
    later = h.stage.process([analyzed(frame, frame_id=3, capture_ts=1400.0)])[0].tensors[0].float()
    assert torch.equal(first, again)  # same capture time, same picture
    assert (later - first).abs().mean() > 2.0


def test_idle_and_excess_sessions_are_evicted(frame):
    h = Harness(max_sessions_state=2, session_idle_s=60.0)
    h.stage.process([analyzed(frame, s, faces=[]) for s in ("a", "b", "c")])
    assert h.stage.sessions_tracked == 2
    idle = Harness(session_idle_s=1e-9)
    idle.stage.process([analyzed(frame, s, faces=[]) for s in ("a", "b")])
    idle.stage.process([analyzed(frame, "d", faces=[])])
    assert idle.stage.sessions_tracked == 1


def test_bad_frame_publishes_event(frame):
    h = Harness()
    bad = Message(kind=Kind.DATA, session="s9", frame_id=4, meta={"faces": []}, tensors=[torch.zeros(5)])
    outputs = h.stage.process([bad, analyzed(frame)])
    assert [o.session for o in outputs] == ["s1"]
    assert [(e.session, e.frame_id, e.meta["code"]) for e in h.events] == [("s9", 4, "bad_frame")]


def test_missing_style_weights_fail_setup(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        Harness(weights=str(tmp_path / "nowhere.pt"))


def test_face_at_the_border_is_clamped(frame):
    edge = {**FACE, "bbox": [600, 440, 60, 60]}
    h = Harness()
    (out,) = h.stage.process([analyzed(frame, faces=[edge])])
    x, y, w, _ = out.meta["style"]["crop"]
    assert x + w <= 640 and y + w <= 480 and x >= 0 and y >= 0


def test_config_is_validated():
    with pytest.raises(ConfigError, match="face_margin"):
        GeneratorConfig(face_margin=-1.0)
    with pytest.raises(ConfigError, match="max_sessions_state"):
        GeneratorConfig(max_sessions_state=0)
    with pytest.raises(ConfigError, match=r"model: got 'diffusion'; allowed: 'stylenet', 'lowfi'"):
        GeneratorConfig(model="diffusion")
    with pytest.raises(ConfigError, match="net_side"):
        GeneratorConfig(net_side=16)
