"""The Wav2Lip mel: equal to librosa's, and the same streamed as offline."""

from __future__ import annotations

import ast
from pathlib import Path

import librosa
import numpy as np
import pytest
import torch

from stages.lipsync import mel as M
from tests.stages.lipsync.speech_util import espeak_16k

LIPSYNC = Path(__file__).resolve().parents[3] / "stages" / "lipsync"


def wav2lip_reference(x: np.ndarray) -> np.ndarray:
    """Wav2Lip's audio.melspectrogram (hparams of SyncTalk_2D) written with librosa."""
    y = np.append(x[0], x[1:] - 0.97 * x[:-1]).astype(np.float32)  # lfilter([1, -0.97], [1])
    spec = np.abs(librosa.stft(y=y, n_fft=800, hop_length=200, win_length=800,
                               center=True, pad_mode="constant"))
    basis = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    db = 20 * np.log10(np.maximum(1e-5, basis @ spec)) - 20
    return np.clip(8 * ((db + 100) / 100) - 4, -4, 4)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    """Real speech with digital silence before and low noise after (the floor matters)."""
    voice = espeak_16k("Mirror, mirror on the wall, who speaks the clearest of them all?")
    noise = 1e-3 * np.random.default_rng(0).standard_normal(5_000).astype(np.float32)
    return np.concatenate([np.zeros(3_001, np.float32), voice, noise])


def test_filterbank_equals_librosa() -> None:
    ours = M.mel_filterbank()
    ref = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    assert ours.shape == (80, 401) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-7)


def test_speech_matches_librosa(speech: np.ndarray) -> None:
    ours = M.melspectrogram(torch.from_numpy(speech))
    ref = wav2lip_reference(speech)
    assert ours.shape == ref.shape == (80, len(speech) // 200 + 1)
    assert ours.dtype == torch.float32
    assert float(np.abs(ours.numpy() - ref).max()) <= 1e-4
    # The test signal reaches both clip limits and the range between them.
    assert ours.min() == -4.0 and ours.max() > 0.0


def test_tones_and_noise_match_librosa() -> None:
    t = np.arange(12_345) / 16000
    x = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 3100 * t)
         + 0.05 * np.random.default_rng(1).standard_normal(t.size)).astype(np.float32)
    err = np.abs(M.melspectrogram(torch.from_numpy(x)).numpy() - wav2lip_reference(x)).max()
    assert err <= 1e-4


def test_silence_is_the_floor() -> None:
    out = M.melspectrogram(torch.zeros(1000))
    assert out.shape == (80, 6)
    assert torch.all(out == M.SILENCE_VALUE)


def _stream(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    stream, parts, at, k = M.StreamingMel(), [], 0, 0
    while at < x.numel():
        size = sizes[k % len(sizes)]
        parts.append(stream.push(x[at:at + size]))
        assert stream.frames_out == sum(p.shape[1] for p in parts)
        at, k = at + size, k + 1
    parts.append(stream.finish())
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("sizes", [[320], [1, 7, 199, 200, 201, 333, 0, 1001], [4096], [399, 401]])
def test_streaming_equals_offline(speech: np.ndarray, sizes: list[int]) -> None:
    x = torch.from_numpy(speech)
    offline = M.melspectrogram(x)
    streamed = _stream(x, sizes)
    assert streamed.shape == offline.shape
    assert float((streamed - offline).abs().max()) <= 1e-5


@pytest.mark.parametrize("n", [0, 1, 199, 200, 399, 400, 401, 801])
def test_short_streams_equal_offline(n: int) -> None:
    x = torch.rand(n) - 0.5
    stream = M.StreamingMel()
    out = torch.cat([stream.push(x), stream.finish()], dim=1)
    offline = M.melspectrogram(x)
    assert out.shape == offline.shape == (80, n // 200 + 1)
    assert float((out - offline).abs().max()) <= 1e-5


def test_frame_is_final_400_samples_after_its_centre() -> None:
    x = 0.1 * torch.randn(3000)
    stream = M.StreamingMel()
    got = stream.push(x[:1399])               # frame 5 is centred on sample 1000
    assert got.shape[1] == 5 and stream.frames_out == 5
    got = stream.push(x[1399:1400])
    assert got.shape[1] == 1 and stream.frames_out == 6
    assert torch.allclose(got[:, 0], M.melspectrogram(x)[:, 5], atol=1e-5)


def test_streaming_keeps_only_what_later_frames_need() -> None:
    stream = M.StreamingMel()
    for _ in range(500):                      # 10 s in 20 ms chunks
        stream.push(0.1 * torch.randn(320))
    assert stream.frames_out == (500 * 320 - 400) // 200 + 1
    assert stream._buffer.numel() < 800       # no history kept, nothing recomputed


def test_push_after_finish_and_bad_input_raise() -> None:
    stream = M.StreamingMel()
    with pytest.raises(ValueError, match="1-D float"):
        stream.push(torch.zeros(2, 10))
    with pytest.raises(ValueError, match="1-D float"):
        M.melspectrogram(torch.zeros(10, dtype=torch.int16))
    stream.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        stream.push(torch.zeros(10))


def test_pcm16_to_float() -> None:
    pcm = np.array([0, 1, -1, 32767, -32768], np.int16).astype("<i2").tobytes()
    out = M.pcm16_to_float(pcm)
    assert out.dtype == torch.float32
    assert out.tolist() == [0.0, 1 / 32768, -1 / 32768, 32767 / 32768, -1.0]
    with pytest.raises(ValueError, match="even number"):
        M.pcm16_to_float(b"\x00\x01\x02")


@pytest.mark.parametrize("name", ["mel.py", "audio_encoder.py", "audio_windows.py", "speech_activity.py"])
def test_front_end_needs_neither_librosa_nor_scipy(name: str) -> None:
    tree = ast.parse((LIPSYNC / name).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"librosa", "scipy", "silero_vad", "torchaudio"}
