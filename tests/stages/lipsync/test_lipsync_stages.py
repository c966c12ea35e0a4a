"""The four lip-sync stages on real audio and real avatars, chained by hand (no runtime).

speech -> lipsync -> composite -> present, each built as the runtime builds it. The
U-Net path is checked against the model called directly on the offline features of the
same audio: the streaming window indexing, the crop inputs and the patch layout must
all agree, or the avatar would mouth the wrong sound.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from comms.message import Kind, Message
from core.settings import RuntimeSettings, RuntimeView
from stages.base import StageContext
from stages.lipsync.audio_encoder import AudioEncoder
from stages.lipsync.audio_windows import offline_encoder_inputs
from stages.lipsync.avatar import AvatarStore, pingpong
from stages.lipsync.composite_stage import CompositeStage, patch_rgb
from stages.lipsync.config import CompositeConfig, LipsyncConfig, PresentConfig, SpeechConfig
from stages.lipsync.crop import unet_inputs
from stages.lipsync.lipsync_stage import LipsyncStage
from stages.lipsync.mel import melspectrogram
from stages.lipsync.prepare import build_avatar, ensure_default_avatar
from stages.lipsync.present_stage import PresentStage
from stages.lipsync.speech_stage import SpeechStage
from stages.lipsync.unet import LipSyncUNet
from tests.integration.lipsync_client import espeak_speech, have_espeak

REPO = Path(__file__).resolve().parents[3]
needs_espeak = pytest.mark.skipif(not have_espeak(), reason="needs espeak-ng (apt install espeak-ng)")


def context(role: str, events: list[Message]) -> StageContext:
    return StageContext(rank=0, role=role, replica=0, device=torch.device("cpu"),
                        logger=logging.getLogger(f"test.{role}"), publish_event=events.append,
                        runtime=lambda: RuntimeView(revision=1, settings=RuntimeSettings()))


@pytest.fixture(scope="module")
def avatars(tmp_path_factory) -> Path:
    """The default avatar, and 'talker': the same photo with a (random-weight, half-width)
    U-Net and audio encoder, to exercise the neural path (its output is compared, never shown)."""
    root = tmp_path_factory.mktemp("avatars")
    ensure_default_avatar(root)
    torch.manual_seed(0)
    weights = root.parent / "weights"
    weights.mkdir()
    unet = LipSyncUNet(width=0.5).eval()
    encoder = AudioEncoder().eval()
    for module in (unet, encoder):  # non-trivial batch-norm statistics, so eval mode matters
        for buffer_name, buffer in module.named_buffers():
            if buffer_name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    torch.save(unet.state_dict(), weights / "unet.pth")
    torch.save(encoder.state_dict(), weights / "encoder.pth")
    build_avatar(image=REPO / "stages/lipsync/assets/astronaut_640x480.jpg", avatar="talker", root=root,
                 seconds=1.0, model=weights / "unet.pth", audio_encoder=weights / "encoder.pth")
    return root


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    if not have_espeak():
        pytest.skip("needs espeak-ng")
    return espeak_speech("Hello, lip sync.", lead_s=0.4, tail_s=0.6)


def chunks(pcm: np.ndarray, session: str = "s1", avatar: str = "astronaut", size: int = 320,
           t0: float = 1_000.0) -> list[Message]:
    return [Message(kind=Kind.DATA, session=session, frame_id=n, revision=1, capture_ts=t0 + first / 16.0,
                    meta={"avatar": avatar, "sample_rate": 16000, "first_sample": first},
                    tensors=[torch.from_numpy(pcm[first:first + size].copy())])
            for n, first in enumerate(range(0, len(pcm), size))]


def speech_frames(pcm: np.ndarray, avatar: str, events: list[Message]) -> list[Message]:
    stage = SpeechStage(SpeechConfig(), context("speech", events))
    stage.setup()
    out = []
    for msg in chunks(pcm, avatar=avatar):
        out += stage.process([msg])
    return out


@needs_espeak
def test_speech_stage_makes_one_frame_per_40_ms_in_order_stamped_with_page_time(speech):
    events: list[Message] = []
    frames = speech_frames(speech, "astronaut", events)
    assert not events
    assert [f.frame_id for f in frames] == list(range(len(frames)))
    assert len(frames) == int((len(speech) / 16000 - 0.4525) * 25) + 1
    # frame i starts at sample 640 i: the page's clock there is t0 + 40 ms * i
    assert [f.capture_ts for f in frames] == pytest.approx([1000.0 + 40.0 * i for i in range(len(frames))])
    assert frames[0].tensors[0].shape == (7, 1, 80, 16) and frames[0].meta["encoder_first"] == 0
    assert all(f.tensors[0].shape == (1, 1, 80, 16) and f.meta["encoder_first"] == f.frame_id + 6 for f in frames[1:])
    assert frames[3].meta["affinity"] == "astronaut"
    spoken = [f.meta["lipsync"]["speech"] for f in frames]
    assert not any(spoken[:5]) and any(spoken), "0.4 s of silence first, then speech"


def test_speech_stage_fills_lost_chunks_with_silence_and_drops_repeats():
    events: list[Message] = []
    stage = SpeechStage(SpeechConfig(), context("speech", events))
    stage.setup()
    tone = (np.sin(np.arange(16000 * 2) * 2 * np.pi * 220 / 16000) * 8000).astype(np.int16)
    msgs = chunks(tone)
    kept = [m for m in msgs if m.frame_id not in (10, 11)]  # two chunks lost on the way
    out = []
    for msg in kept + [msgs[5]]:  # and an old one again at the end
        out += stage.process([msg])
    # the timeline holds: as many frames as without the loss, and still in page time
    assert [f.frame_id for f in out] == list(range(len(out)))
    assert out[-1].capture_ts == pytest.approx(1000.0 + 40.0 * out[-1].frame_id)
    assert len(out) == int((len(tone) / 16000 - 0.4525) * 25) + 1


def test_speech_stage_rejects_what_is_not_int16_samples():
    events: list[Message] = []
    stage = SpeechStage(SpeechConfig(), context("speech", events))
    stage.setup()
    bad = Message(session="s1", frame_id=0, meta={"avatar": "astronaut"}, tensors=[torch.zeros(320)])
    assert stage.process([bad]) == []
    assert events[0].meta["code"] == "bad_audio" and "int16" in events[0].meta["message"]


def lipsync_stage(avatars: Path, events: list[Message], **config) -> LipsyncStage:
    stage = LipsyncStage(LipsyncConfig(avatar_dir=str(avatars), build_default=False, **config),
                         context("lipsync", events))
    stage.setup()
    return stage


@needs_espeak
def test_unet_path_matches_the_model_called_on_offline_features(avatars, speech):
    events: list[Message] = []
    frames = speech_frames(speech, "talker", events)
    chosen = [i for i, f in enumerate(frames) if f.meta["lipsync"]["speech"]][2:5]
    for i, frame in enumerate(frames):  # the U-Net runs on three frames; every frame feeds the audio history
        frame.meta["lipsync"]["speech"] = i in chosen
    stage = lipsync_stage(avatars, events)
    patches = {}
    for start in range(0, len(frames), 8):
        for out in stage.process(frames[start:start + 8]):
            patches[out.frame_id] = out
    assert not events and sorted(patches) == list(range(len(frames)))
    assert {patches[i].meta["lipsync"]["generator"] for i in chosen} == {"unet"}
    assert all(not patches[i].tensors for i in patches if i not in chosen), "silence: no patch"

    # The same frames by hand: offline mel -> encoder -> window of 16 (P = [F0] + F), crops.
    loaded = stage.registry.acquire("talker")
    features = loaded.encoder(offline_encoder_inputs(melspectrogram(torch.from_numpy(speech) / 32768.0)))
    padded = torch.cat([features[:1], features])
    n = AvatarStore(avatars).manifest("talker").frame_count
    for i in chosen:
        window = torch.stack([padded[k] if k >= 0 else torch.zeros(512) for k in range(i - 8, i + 8)])
        x = unet_inputs(loaded.crops_bgr[pingpong(i, n)][None])
        expected = (loaded.unet(x, window.reshape(1, 32, 16, 16))[0] * 255).round().to(torch.uint8)
        got = patches[i].tensors[0]
        assert got.dtype == torch.uint8 and got.shape == (3, 320, 320)
        assert (got.int() - expected.int()).abs().max() <= 1
        assert patches[i].meta["lipsync"]["avatar_frame"] == pingpong(i, n)
    stage.registry.release("talker")


def test_non_neural_mouth_opens_with_loudness_and_is_labelled(avatars):
    events: list[Message] = []
    stage = lipsync_stage(avatars, events, patch_dtype="float32")
    frames = [Message(session="s1", frame_id=i, meta={"affinity": "astronaut", "encoder_first": i + 6,
                                                     "lipsync": {"speech": True, "loudness_db": db}},
                      tensors=[torch.zeros(1, 1, 80, 16)]) for i, db in enumerate((-60.0, -30.0, -10.0))]
    quiet, mid, loud = stage.process(frames)
    assert {m.meta["lipsync"]["generator"] for m in (quiet, mid, loud)} == {"mouth-synth"}
    crop = stage.registry.acquire("astronaut").crops_rgb
    stage.registry.release("astronaut")
    reference = torch.from_numpy(crop[pingpong(0, len(crop))][4:324, 4:324].copy())
    assert torch.equal(torch.from_numpy(patch_rgb(quiet.tensors[0])), reference), "closed below quiet_db"
    change = [float((torch.from_numpy(patch_rgb(m.tensors[0])).float() - reference.float()).abs().mean())
              for m in (mid, loud)]
    assert 0 < change[0] < change[1]
    assert quiet.tensors[0].dtype == torch.float32


def test_an_unknown_avatar_is_reported_and_others_still_served(avatars):
    events: list[Message] = []
    stage = lipsync_stage(avatars, events)
    frames = [Message(session=s, frame_id=0, meta={"affinity": a, "encoder_first": 6, "lipsync": {"speech": False}},
                      tensors=[torch.zeros(1, 1, 80, 16)]) for s, a in (("s1", "nobody"), ("s2", "astronaut"))]
    (out,) = stage.process(frames)
    assert out.session == "s2"
    assert events[0].session == "s1" and events[0].meta["code"] == "avatar_unavailable"
    assert "nobody" in events[0].meta["message"]


def test_report_and_commands_load_and_unload(avatars):
    events: list[Message] = []
    stage = lipsync_stage(avatars, events)
    stage.command({"action": "load", "key": "talker"})
    for _ in range(200):
        report = stage.report()
        if any(m["id"] == "talker" and m["resident"] for m in report["models"]):
            break
        import time
        time.sleep(0.05)
    assert any(m["id"] == "talker" and m["resident"] for m in stage.report()["models"])
    assert stage.report()["stats"]["used_bytes"] > 0
    stage.command({"action": "unload", "key": "talker"})
    assert not any(m["id"] == "talker" and m["resident"] for m in stage.report()["models"])
    with pytest.raises(ValueError, match="unknown action"):
        stage.command({"action": "explode", "key": "talker"})


def test_composite_pastes_patches_and_leaves_silence_untouched(avatars):
    events: list[Message] = []
    store = AvatarStore(avatars)
    stage = CompositeStage(CompositeConfig(avatar_dir=str(avatars), feather_px=0, jpeg_quality=95),
                           context("composite", events))
    stage.setup()
    x1, y1, x2, y2 = store.crop_rects("astronaut")[3]
    black = torch.zeros(3, 320, 320, dtype=torch.uint8)
    msgs = [Message(session="s1", frame_id=i, meta={"lipsync": {"avatar": "astronaut", "avatar_frame": 3}},
                    tensors=tensors) for i, tensors in enumerate(([], [black], [black.float()]))]
    silent, pasted, pasted_float = stage.process(msgs)
    decode = [cv2.cvtColor(cv2.imdecode(m.tensors[0].numpy(), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
              for m in (silent, pasted, pasted_float)]
    background = store.read_frame("astronaut", 3).astype(np.float32)
    assert np.abs(decode[0] - background).mean() < 2.0, "silence: the background frame"
    inner = (slice(y1 + 5, y2 - 5), slice(x1 + 5, x2 - 5))
    assert decode[1][inner].mean() < 12 and decode[2][inner].mean() < 12, "the black patch is in the rectangle"
    outside = np.ones(background.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    assert np.abs(decode[1][outside] - background[outside]).mean() < 2.0
    assert not events

    wrong = Message(session="s1", frame_id=9, meta={"lipsync": {"avatar": "astronaut", "avatar_frame": 3}},
                    tensors=[torch.zeros(3, 64, 64, dtype=torch.uint8)])
    assert stage.process([wrong]) == [] and events[0].meta["code"] == "bad_patch"


def test_present_labels_frames_for_the_page():
    stage = PresentStage(PresentConfig(), context("present", []))
    msg = Message(session="s1", frame_id=7, meta={"lipsync": {"avatar": "astronaut", "generator": "unet",
                                                            "speech": True, "avatar_frame": 7, "secret": 1}},
                  tensors=[torch.zeros(4, dtype=torch.uint8)])
    (out,) = stage.process([msg])
    assert out.meta["vision"]["frame_id"] == 7 and out.meta["vision"]["faces"] == []
    assert out.meta["vision"]["lipsync"]["generator"] == "unet" and "secret" not in out.meta["vision"]["lipsync"]
