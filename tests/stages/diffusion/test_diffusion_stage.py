"""DiffusionStage on a tiny random model: framed faces in, diffusion portraits out, with
renders skipped for unchanged frames and capped per session."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import pytest
import torch
from diffusion_testutil import make_context, require_diffusers

from comms.message import Kind, Message
from core.settings import RuntimeSettings, RuntimeView
from stages.diffusion import DiffusionConfig, DiffusionStage

require_diffusers()

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "astronaut_640x480.jpg"
FACE = {"face_id": 1, "bbox": [221, 83, 119, 119], "emotion": "happy",
        "emotion_probs": {"happy": 0.9, "neutral": 0.1}, "quality": 0.95}
SAD_FACE = {**FACE, "emotion": "sad", "emotion_probs": {"sad": 0.9, "neutral": 0.1}}


@pytest.fixture(scope="module")
def frame() -> torch.Tensor:
    return torch.from_numpy(cv2.cvtColor(cv2.imread(str(FIXTURE)), cv2.COLOR_BGR2RGB))


class Harness:
    """A stage on the tiny model with a switchable runtime view and a list of published events."""

    def __init__(self, model_dir: Path, **config) -> None:
        self.view = RuntimeView(revision=1, settings=RuntimeSettings(output_size=64, smoothing=0.0))
        self.events: list[Message] = []
        context = make_context(self.events)
        context.runtime = lambda: self.view
        self.stage = DiffusionStage(DiffusionConfig(model_path=str(model_dir), size=32, **config), context)
        self.stage.setup()
        self.unet_calls: list[int] = []
        self.stage.loop.model.unet.register_forward_pre_hook(lambda mod, args: self.unet_calls.append(len(args[0])))

    def set(self, revision: int, **settings) -> None:
        self.view = RuntimeView(revision=revision, settings=RuntimeSettings(**{"output_size": 64, "smoothing": 0.0,
                                                                              **settings}))

    def run(self, *frames: Message) -> list[Message]:
        return self.stage.process(list(frames))


def analyzed(frame: torch.Tensor, session: str = "s1", frame_id: int = 1, faces=None) -> Message:
    return Message(kind=Kind.DATA, session=session, frame_id=frame_id, revision=1, capture_ts=1000.0 + frame_id,
                   meta={"faces": [FACE] if faces is None else faces}, tensors=[frame])


def test_portrait_of_the_face(tiny_model_dir, frame):
    h = Harness(tiny_model_dir)
    assert h.stage.status() == {"ready": True, "reason": None} and h.stage.unavailable() is None
    (out,) = h.run(analyzed(frame))
    portrait = out.tensors[0]
    assert (out.kind, out.session, out.frame_id, out.revision) == (Kind.DATA, "s1", 1, 1)
    assert portrait.shape == (64, 64, 3) and portrait.dtype == torch.uint8 and portrait.is_contiguous()
    style = out.meta["style"]
    assert {k: style[k] for k in ("generator", "name", "emotion", "confidence", "face_id", "skipped")} == {
        "generator": "diffusion", "name": "pop/happy", "emotion": "happy", "confidence": 0.9, "face_id": 1,
        "skipped": False}
    x, y, w, hgt = style["crop"]
    assert w == hgt and x <= 221 and y <= 83 and x + w >= 340 and y + w >= 202 and style["angle"] == 0.0
    assert out.meta["faces"] == [FACE]
    assert [name for name, _ in out.trace] == ["diffusion.start", "diffusion.end"]
    assert portrait.float().std() > 5 and h.events == [] and h.unet_calls == [1]


def test_identical_frame_is_skipped_and_a_changed_one_rendered(tiny_model_dir, frame):
    h = Harness(tiny_model_dir)
    (first,) = h.run(analyzed(frame))
    (again,) = h.run(analyzed(frame, frame_id=2))
    assert again.meta["style"]["skipped"] is True and torch.equal(again.tensors[0], first.tensors[0])
    assert h.unet_calls == [1]
    (changed,) = h.run(analyzed(255 - frame, frame_id=3))
    assert changed.meta["style"]["skipped"] is False and h.unet_calls == [1, 1]
    assert not torch.equal(changed.tensors[0], first.tensors[0])


def test_a_new_emotion_always_renders(tiny_model_dir, frame):
    h = Harness(tiny_model_dir)
    h.run(analyzed(frame))
    (sad,) = h.run(analyzed(frame, frame_id=2, faces=[SAD_FACE]))
    assert sad.meta["style"]["skipped"] is False and sad.meta["style"]["name"] == "ink/sad"
    assert h.unet_calls == [1, 1]


def test_token_bucket_caps_renders_per_session(tiny_model_dir, frame):
    h = Harness(tiny_model_dir, similarity_threshold=0.0, regen_rate=0.001, regen_burst=1)
    (first,) = h.run(analyzed(frame))
    (capped,) = h.run(analyzed(255 - frame, frame_id=2, faces=[SAD_FACE]))
    # Over budget even with a new emotion: the previous portrait, described as what it shows.
    assert capped.meta["style"]["skipped"] is True and capped.meta["style"]["emotion"] == "happy"
    assert torch.equal(capped.tensors[0], first.tensors[0])
    (other,) = h.run(analyzed(frame, session="s2"))  # another session has its own budget
    assert other.meta["style"]["skipped"] is False and h.unet_calls == [1, 1]


def test_sessions_share_one_unet_call_and_the_same_picture_renders_the_same(tiny_model_dir, frame):
    h = Harness(tiny_model_dir)
    a, b, c = h.run(analyzed(frame, "a"), analyzed(frame, "b"), analyzed(255 - frame, "c"))
    assert h.unet_calls == [3]
    assert (a.session, b.session, c.session) == ("a", "b", "c")
    assert (a.tensors[0].int() - b.tensors[0].int()).abs().max() <= 1
    assert (a.tensors[0].float() - c.tensors[0].float()).abs().mean() > 5


def test_prompts_are_encoded_once_per_change_not_per_frame(tiny_model_dir, frame):
    h = Harness(tiny_model_dir)
    assert h.stage.prompts.encoded == len(h.stage.prompts)  # warm-up: every curated prompt, once
    warmed = h.stage.prompts.encoded
    h.run(*(analyzed(frame, f"s{i}", faces=[FACE if i % 2 else SAD_FACE]) for i in range(4)))
    assert h.stage.prompts.encoded == warmed  # all cached

    small = Harness(tiny_model_dir, prompt_cache_size=2, similarity_threshold=0.0, regen_rate=0.0)
    encoded = small.stage.prompts.encoded
    for i in range(1, 4):
        small.run(analyzed(frame if i % 2 else 255 - frame, frame_id=i))
    assert small.stage.prompts.encoded == encoded + 1 and small.unet_calls == [1, 1, 1]
    small.run(analyzed(frame, frame_id=4, faces=[SAD_FACE]))
    small.run(analyzed(255 - frame, frame_id=5, faces=[SAD_FACE]))
    assert small.stage.prompts.encoded == encoded + 2 and small.unet_calls == [1] * 5


def test_live_settings_resize_blend_and_restyle(tiny_model_dir, frame):
    h = Harness(tiny_model_dir)
    h.set(revision=4, output_size=96, strength=0.0)
    (photo,) = h.run(analyzed(frame))
    assert photo.tensors[0].shape == (96, 96, 3) and photo.revision == 4
    x, y, side, _ = photo.meta["style"]["crop"]
    # Strength 0 is the aligned photo crop itself.
    assert abs(photo.tensors[0].float().mean() - frame[max(y, 0):y + side, max(x, 0):x + side].float().mean()) < 6
    h.set(revision=5, strength=1.0, style="noir")
    (styled,) = h.run(analyzed(frame, frame_id=2))  # same picture, new strength and style: rendered
    assert styled.meta["style"]["skipped"] is False and styled.meta["style"]["name"] == "noir/happy"
    assert styled.tensors[0].shape == (64, 64, 3)


def test_no_face_is_the_whole_frame_and_neutral(tiny_model_dir, frame):
    h = Harness(tiny_model_dir)
    (out,) = h.run(analyzed(frame, faces=[]))
    style = out.meta["style"]
    assert style["crop"] == [0, -80, 640, 640] and style["emotion"] == "neutral" and style["face_id"] is None


def test_bad_frame_is_dropped_with_an_event(tiny_model_dir):
    h = Harness(tiny_model_dir)
    bad = Message(kind=Kind.DATA, session="s1", frame_id=7, tensors=[torch.zeros(10, 10, dtype=torch.uint8)])
    assert h.run(bad) == [] and [e.meta["code"] for e in h.events] == ["bad_frame"]


def test_session_state_is_bounded_and_dropped_when_idle(tiny_model_dir, frame):
    h = Harness(tiny_model_dir, max_sessions_state=2, session_idle_s=0.05)
    h.run(*(analyzed(frame, f"s{i}") for i in range(3)))
    assert h.stage.sessions_tracked == 2
    time.sleep(0.1)
    h.run(analyzed(frame, "s9"))
    assert h.stage.sessions_tracked == 1
    h.stage.teardown()
    assert h.stage.sessions_tracked == 0 and h.stage.status()["ready"] is False


def test_tiny_autoencoder_through_the_stage(tiny_model_dir, tiny_autoencoder_dir, frame):
    h = Harness(tiny_model_dir, tiny_autoencoder_path=str(tiny_autoencoder_dir))
    assert type(h.stage.loop.model.autoencoder).__name__ == "AutoencoderTiny"
    (out,) = h.run(analyzed(frame))
    assert out.tensors[0].shape == (64, 64, 3) and out.meta["style"]["skipped"] is False
