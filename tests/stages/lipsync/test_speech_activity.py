"""Speech activity: silero-vad (the real shipped weights) on real synthetic speech, loudness.

The speech is espeak-ng's voice, resampled to 16 kHz, between stretches of digital
silence and of low white noise; a frame counts as "inside the speech" when espeak's
own signal is loud there, and as "silence" when it is far from any such frame.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.lipsync.speech_activity import (
    FrameActivity,
    SpeechActivity,
    loudness_db,
    silero_model,
    silero_path,
)
from tests.stages.lipsync.speech_util import espeak_16k

FRAME = 640


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> tuple[np.ndarray, np.ndarray]:
    """(samples, voiced) with voiced[i] = espeak's voice is loud in video frame i."""
    voice = espeak_16k("The quick brown fox jumps over the lazy dog, and then it rests.")
    noise = (10 ** (-60 / 20) * np.random.default_rng(0).standard_normal(32_000)).astype(np.float32)
    silence = np.zeros(32_000, np.float32)
    parts = [silence, voice, noise, voice, silence[:20_000], noise[:7_777]]
    samples = np.concatenate(parts)
    voice_here = np.concatenate([np.zeros_like(p) if p is not voice else p for p in parts])
    frames = len(samples) // FRAME
    rms = np.sqrt(np.mean(voice_here[:frames * FRAME].reshape(frames, FRAME) ** 2, axis=1))
    return samples, 20 * np.log10(np.maximum(rms, 1e-10)) > -35


def run(samples: np.ndarray, chunk: int, detector: SpeechActivity | None = None) -> list[FrameActivity]:
    detector = detector or SpeechActivity()
    x = torch.from_numpy(samples)
    out = [f for at in range(0, len(samples), chunk) for f in detector.push(x[at:at + chunk])]
    return out + detector.finish()


def test_speech_is_found_inside_speech_and_not_in_silence(scene) -> None:
    samples, voiced = scene
    frames = run(samples, 320)
    assert [f.index for f in frames] == list(range(math.ceil(len(samples) / FRAME)))
    speech = np.array([f.speech for f in frames[:len(voiced)]])
    probability = np.array([f.probability for f in frames[:len(voiced)]])
    # Inside the speech: nearly every loud frame is speech.
    assert voiced.sum() > 100
    assert speech[voiced].mean() >= 0.9
    # Silence and noise: nothing within them, away from the speech by more than the
    # hangover and a little of silero's own memory.
    near = np.convolve(voiced.astype(float), np.ones(2 * 12 + 1), mode="same") > 0
    quiet = ~near
    assert quiet.sum() > 60
    assert not speech[quiet].any()
    assert probability[quiet].max() < 0.35
    assert not frames[-1].speech                          # the partial frame at the end, in noise


def test_chunk_size_does_not_matter(scene) -> None:
    samples, _ = scene
    by_20ms = run(samples, 320)
    for chunk in (1_001, 77, 5_000):
        assert run(samples, chunk) == by_20ms


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:DeprecationWarning")
def test_probabilities_equal_the_shipped_wrapper(scene) -> None:
    """Our per-session state around the inner network == silero's own stateful wrapper,
    and a frame's probability is the max of the chunks that end inside it."""
    samples, _ = scene
    samples = samples[:40_000]
    wrapper = torch.jit.load(str(silero_path()))           # a private copy with its own state
    wrapper.reset_states()
    chunks = []
    with torch.no_grad():
        for at in range(0, len(samples) - 511, 512):
            chunks.append((at + 512, float(wrapper(torch.from_numpy(samples[at:at + 512])[None], 16000))))
    frames = run(samples, 320)
    for f in frames[:len(samples) // FRAME]:
        mine = [p for end, p in chunks if FRAME * f.index < end <= FRAME * (f.index + 1)]
        assert 1 <= len(mine) <= 2
        assert f.probability == pytest.approx(max(mine), abs=1e-5)


def test_sessions_do_not_share_state(scene) -> None:
    samples, _ = scene
    a_samples, b_samples = samples[:60_000], samples[60_000:120_000]
    alone_a, alone_b = run(a_samples, 320), run(b_samples, 320)
    a, b = SpeechActivity(), SpeechActivity()
    mixed_a, mixed_b = [], []
    for at in range(0, 60_000, 320):                      # interleaved, as two live sessions
        mixed_a += a.push(torch.from_numpy(a_samples[at:at + 320]))
        mixed_b += b.push(torch.from_numpy(b_samples[at:at + 320]))
    assert mixed_a + a.finish() == alone_a
    assert mixed_b + b.finish() == alone_b
    assert silero_model() is silero_model()               # one network for every session


def test_reset_starts_a_new_stream(scene) -> None:
    samples, _ = scene
    detector = SpeechActivity()
    first = run(samples[:30_000], 320, detector)
    detector.reset()
    assert run(samples[:30_000], 320, detector) == first


@pytest.mark.parametrize("hangover_s", [0.0, 0.2, 0.5])
def test_hangover_holds_speech_after_the_last_speech_frame(scene, hangover_s: float) -> None:
    samples, _ = scene
    frames = run(samples, 640, SpeechActivity(threshold=0.5, hangover_s=hangover_s))
    hold = round(hangover_s * 25)
    for f in frames:
        recent = frames[max(0, f.index - hold):f.index + 1]
        assert f.speech == any(g.probability >= 0.5 for g in recent), f.index


def test_loudness_is_rms_dbfs() -> None:
    t = torch.arange(640) / 16000
    sine = 0.5 * torch.sin(2 * torch.pi * 1000 * t)
    assert loudness_db(sine) == pytest.approx(20 * math.log10(0.5 / math.sqrt(2)), abs=0.01)
    assert loudness_db(torch.zeros(640)) == -100.0
    assert loudness_db(torch.full((640,), 1e-7)) == -100.0     # below the floor
    frames = SpeechActivity().push(torch.cat([torch.zeros(640), sine, torch.full((640,), -0.25)]))
    assert [round(f.loudness_db, 2) for f in frames] == [-100.0, round(loudness_db(sine), 2), -12.04]


def test_partial_last_frame_and_empty_finish() -> None:
    detector = SpeechActivity()
    assert detector.push(torch.zeros(639)) == []
    last = detector.finish()
    assert [f.index for f in last] == [0] and last[0].loudness_db == -100.0 and not last[0].speech
    assert detector.finish() == []
    with pytest.raises(RuntimeError, match="after finish"):
        detector.push(torch.zeros(10))
    fresh = SpeechActivity()
    assert fresh.push(torch.zeros(1280)) != [] and fresh.finish() == []


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="threshold"):
        SpeechActivity(threshold=1.5)
    with pytest.raises(ValueError, match="hangover_s"):
        SpeechActivity(hangover_s=-1)
    with pytest.raises(ValueError, match="1-D float"):
        SpeechActivity().push(torch.zeros(640, dtype=torch.int16))


def test_threads_of_the_process_are_left_alone() -> None:
    before = torch.get_num_threads()
    detector = SpeechActivity()
    detector.push(0.1 * torch.randn(4096))
    assert torch.get_num_threads() == before
