"""Audio windows per video frame: SyncTalk's indexing offline, the same streamed, the look-ahead.

The features used here are either labelled vectors (entry k says which encoder frame it
came from) or a random-weight encoder: the tests are about indexing, not about what an
encoder says.
"""

from __future__ import annotations

import pytest
import torch

from stages.lipsync import audio_windows as W
from stages.lipsync.audio_encoder import AudioEncoder
from stages.lipsync.mel import StreamingMel, melspectrogram, one_intraop_thread


def labelled_mel(t: int) -> torch.Tensor:
    """[80, t] mel whose frame k holds the value k in every band."""
    return torch.arange(t, dtype=torch.float32).repeat(80, 1)


def labelled_features(n: int) -> torch.Tensor:
    """[n, 512] features whose row k holds k + 1 (0 stays free for the zero padding)."""
    return (torch.arange(n, dtype=torch.float32) + 1)[:, None].repeat(1, 512)


def window_labels(window: torch.Tensor) -> list[int]:
    """Back from a [32, 16, 16] window to the 16 row labels (feature index + 1, 0 = padding)."""
    rows = window.reshape(16, 512)
    assert torch.all(rows == rows[:, :1]), "each row must be one whole feature vector"
    return [int(v) for v in rows[:, 0]]


def synctalk_window(n: int, i: int) -> list[int]:
    """SyncTalk's get_audio_features on P = [F0] + F + [F(N-1)], as labels."""
    padded = [1] + list(range(1, n + 1)) + [n]
    return [padded[k] if 0 <= k < len(padded) else 0 for k in range(i - 8, i + 8)]


def test_encoder_start_and_count_follow_synctalk_floats() -> None:
    for j in range(20_000):
        assert W.encoder_mel_start(j) == int(80.0 * (j / 25.0))
    for t in range(16, 5_000):
        assert W.encoder_count(t) == int((t - 16) / 80.0 * 25.0) + 2
    assert W.encoder_count(384) == 116   # the float formula's rounding, kept on purpose


@pytest.mark.parametrize("t", [16, 17, 100, 384, 401])
def test_offline_encoder_inputs_index_and_end_rule(t: int) -> None:
    inputs = W.offline_encoder_inputs(labelled_mel(t))
    n = W.encoder_count(t)
    assert inputs.shape == (n, 1, 80, 16)
    for j in range(n):
        start = min(int(80 * j / 25), t - 16)         # past the end: moved left to end at t - 1
        assert inputs[j, 0, 0].tolist() == list(range(start, start + 16)), j
    assert inputs[-1, 0, 0, -1] == t - 1


def test_short_mel_is_padded_with_silence() -> None:
    inputs = W.offline_encoder_inputs(labelled_mel(5))
    assert inputs.shape == (2, 1, 80, 16)
    assert inputs[0, 0, 0, :5].tolist() == [0, 1, 2, 3, 4]
    assert torch.all(inputs[:, :, :, 5:] == -4.0)


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 30])
def test_offline_windows_pad_with_edge_copies_then_zeros(n: int) -> None:
    windows = W.offline_windows(labelled_features(n))
    assert windows.shape == (n, 32, 16, 16)
    for i in range(n):
        assert window_labels(windows[i]) == synctalk_window(n, i), i


def test_edges_in_detail() -> None:
    n = 30
    windows = W.offline_windows(labelled_features(n))
    # frame 0: P[-8..-1] are zeros, then P[0] = F0, P[1] = F0, P[2] = F1 ... P[7] = F6
    assert window_labels(windows[0]) == [0] * 8 + [1, 1, 2, 3, 4, 5, 6, 7]
    # last frame: P[N-9 .. N+6]; P[N] = F(N-1), P[N+1] = F(N-1) again, then five zeros
    assert window_labels(windows[n - 1]) == [21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 30] + [0] * 5


def test_frame_i_needs_features_up_to_i_plus_6() -> None:
    n = 40
    base = W.offline_windows(labelled_features(n))
    for i in range(5, 25):
        later = labelled_features(n)
        later[i + 7:] = -1                                # everything after F[i+6] changed
        assert torch.equal(W.offline_windows(later)[i], base[i])
        changed = labelled_features(n)
        changed[i + 6] = -1
        assert not torch.equal(W.offline_windows(changed)[i], base[i])
    assert W.LOOKAHEAD_FEATURES == 6 and W.FEATURE_WINDOW == 16


def test_streaming_windows_emit_frame_i_with_feature_i_plus_6() -> None:
    n = 20
    features = labelled_features(n)
    stream = W.StreamingWindows()
    emitted: dict[int, int] = {}
    for j in range(n):
        for i, window in stream.push(j, features[j]):
            emitted[i] = j
            assert window_labels(window) == synctalk_window(n, i)
    assert emitted == {i: i + 6 for i in range(n - 6)}
    rest = stream.finish()
    assert [i for i, _ in rest] == list(range(n - 6, n))
    for i, window in rest:
        assert window_labels(window) == synctalk_window(n, i)
    assert len(stream._p) == 0


@pytest.mark.parametrize("n", [1, 3, 7, 8])
def test_streaming_windows_short_sessions(n: int) -> None:
    stream = W.StreamingWindows()
    out = [w for j in range(n) for w in stream.push(j, labelled_features(n)[j])] + stream.finish()
    assert [i for i, _ in out] == list(range(n))
    assert torch.equal(torch.stack([w for _, w in out]), W.offline_windows(labelled_features(n)))


def test_streaming_windows_refuse_out_of_order() -> None:
    stream = W.StreamingWindows()
    stream.push(0, torch.zeros(512))
    with pytest.raises(ValueError, match="expected feature 1, got 2"):
        stream.push(2, torch.zeros(512))


def run_streaming(samples: torch.Tensor, chunk: int, encoder: AudioEncoder) -> torch.Tensor:
    mel, inputs, windows = StreamingMel(), W.StreamingEncoderInputs(), W.StreamingWindows()
    out: list[tuple[int, torch.Tensor]] = []

    def feed(encoder_inputs: list[tuple[int, torch.Tensor]]) -> None:
        for j, window in encoder_inputs:
            with torch.no_grad():
                out.extend(windows.push(j, encoder(window.unsqueeze(0))[0]))

    with one_intraop_thread():   # a window per call: keep a busy test machine's pool out of it
        for at in range(0, samples.numel(), chunk):
            feed(inputs.push(mel.push(samples[at:at + chunk])))
        feed(inputs.push(mel.finish()))
        feed(inputs.finish())
    out.extend(windows.finish())
    assert [i for i, _ in out] == list(range(len(out)))
    return torch.stack([w for _, w in out])


def run_offline(samples: torch.Tensor, encoder: AudioEncoder) -> torch.Tensor:
    with torch.no_grad():
        return W.offline_windows(encoder(W.offline_encoder_inputs(melspectrogram(samples))))


@pytest.mark.parametrize("n_samples, chunk", [(48_000, 320), (76_700, 333), (52_123, 1_001), (2_500, 320)])
def test_streaming_chain_equals_offline(n_samples: int, chunk: int) -> None:
    torch.manual_seed(0)
    encoder = AudioEncoder().eval()       # random weights: only the indexing is under test
    t = torch.arange(n_samples) / 16000
    samples = 0.3 * torch.sin(2 * torch.pi * 180 * t * (1 + t)) + 0.02 * torch.randn(n_samples)
    offline = run_offline(samples, encoder)
    streamed = run_streaming(samples, chunk, encoder)
    assert streamed.shape == offline.shape
    assert offline.shape[0] == W.encoder_count(n_samples // 200 + 1)
    assert float((streamed - offline).abs().max()) <= 1e-4 * max(1.0, float(offline.abs().max()))


def test_streaming_encoder_inputs_keep_little_history() -> None:
    inputs = W.StreamingEncoderInputs()
    total = 0
    for k in range(400):
        total += len(inputs.push(labelled_mel(7) + 7 * k))
    assert inputs._mel.shape[1] <= 20
    assert total == inputs.next_j and total > 0


def test_lookahead_measured_by_streaming() -> None:
    """Feed samples 40 at a time and note when each frame's window comes out: the audio
    after the frame's start that it waited for is lookahead_samples(i)."""
    mel, inputs, windows = StreamingMel(), W.StreamingEncoderInputs(), W.StreamingWindows()
    waited: dict[int, int] = {}
    received = 0
    while len(waited) < 30:
        received += 40
        for j, window in inputs.push(mel.push(torch.zeros(40))):
            for i, _ in windows.push(j, window.mean(dim=(0, 2)).repeat(7)[:512]):
                waited[i] = received - 640 * i
    assert waited == {i: W.lookahead_samples(i) for i in range(30)}
    assert max(waited.values()) == 7240
    assert W.lookahead_seconds() == pytest.approx(7240 / 16000)
    assert 0.44 < W.lookahead_seconds() < 0.46
