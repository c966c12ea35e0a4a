"""Which audio each video frame sees: mel windows for the encoder, feature windows for the U-Net.

Two index rules, both fixed by how SyncTalk_2D's ``ave`` model was trained and run
(``AudDataset`` and ``get_audio_features`` in its ``utils.py``):

1. Encoder frame j (one per 25 fps video frame) encodes the 16 mel frames
   ``[s, s + 16)`` with ``s = int(80 j / 25)``, i.e. 0.2 s starting at the video frame's
   start. Offline there are ``int((T - 16) / 80 * 25) + 2`` of them for T mel frames,
   and a window that would run past the last mel frame is moved left to end at it.
2. With the encoder outputs F[0..N-1], the U-Net's audio input for video frame i is the
   16 entries ``P[i - 8 : i + 8]`` of the padded list ``P = [F0] + F + [F(N-1)]``, zero
   vectors where the index falls outside P, stacked to [16, 512] and reshaped row-major
   to [32, 16, 16]. Because P is shifted by one, ``P[i + 7] = F[i + 6]``: frame i needs
   the features of the six frames after it (``LOOKAHEAD_FEATURES``).

The offline functions apply these rules to a whole file; the two streaming classes
apply them to a live session and produce identical tensors, in order, as soon as the
inputs they need exist; ``finish`` applies the end-of-file rules. Both streaming
classes keep only the last few frames they still need.

``lookahead_seconds`` is what this costs a live session: how much audio after the
start of video frame i must have arrived before frame i can be made.
"""

from __future__ import annotations

from collections import deque

import torch

from stages.lipsync.mel import HOP, MEL_FPS, N_FFT, N_MELS, SAMPLE_RATE, SILENCE_VALUE

VIDEO_FPS = 25
SAMPLES_PER_VIDEO_FRAME = SAMPLE_RATE // VIDEO_FPS  # 640
MEL_WINDOW = 16            # mel frames per encoder input (0.2 s)
FEATURE_WINDOW = 16        # encoder features per U-Net audio input
FEATURE_DIM = 512
LOOKAHEAD_FEATURES = 6     # frame i needs F[..i+6]
_HALF_WINDOW = FEATURE_WINDOW // 2  # P[i - 8 : i + 8]


def encoder_mel_start(j: int) -> int:
    """First mel frame of encoder frame j: ``int(80 * j / 25)`` (exact in integers)."""
    return (MEL_FPS * j) // VIDEO_FPS


def encoder_count(mel_frames: int) -> int:
    """Offline number of encoder frames for T mel frames: SyncTalk's float formula
    ``int((T - 16) / 80 * 25) + 2``, rounding quirks included (T = 384 gives 116, not
    the exact 117), so a file yields exactly the frames the original pipeline makes."""
    t = max(mel_frames, MEL_WINDOW)
    return int((t - MEL_WINDOW) / float(MEL_FPS) * float(VIDEO_FPS)) + 2


def _pad_short(mel: torch.Tensor) -> torch.Tensor:
    """Less than 16 mel frames (under ~0.19 s of audio): SyncTalk would fail; we pad on
    the right with the mel value of silence so a short utterance still gets its frames."""
    if mel.shape[1] >= MEL_WINDOW:
        return mel
    pad = mel.new_full((N_MELS, MEL_WINDOW - mel.shape[1]), SILENCE_VALUE)
    return torch.cat([mel, pad], dim=1)


def _check_mel(mel: torch.Tensor, what: str) -> None:
    if mel.dim() != 2 or mel.shape[0] != N_MELS:
        raise ValueError(f"{what}: expected mel frames [{N_MELS}, T], got {tuple(mel.shape)}")


def _window_start(j: int, total: int) -> int:
    """Start of encoder window j over ``total`` mel frames, with the offline end rule."""
    return min(encoder_mel_start(j), total - MEL_WINDOW)


def offline_encoder_inputs(mel: torch.Tensor) -> torch.Tensor:
    """[N, 1, 80, 16] encoder inputs of a whole file's [80, T] mel, N = encoder_count(T)."""
    _check_mel(mel, "offline_encoder_inputs")
    mel = _pad_short(mel)
    total = mel.shape[1]
    starts = [_window_start(j, total) for j in range(encoder_count(total))]
    return torch.stack([mel[:, s:s + MEL_WINDOW] for s in starts]).unsqueeze(1)


def _window(padded: list[torch.Tensor | None]) -> torch.Tensor:
    """16 entries of P (None = outside P, a zero vector) -> [32, 16, 16]."""
    ref = next(f for f in padded if f is not None)
    rows = [f if f is not None else torch.zeros_like(ref) for f in padded]
    return torch.stack(rows).reshape(32, 16, 16)


def offline_windows(features: torch.Tensor) -> torch.Tensor:
    """[N, 32, 16, 16] U-Net audio inputs, one per video frame i in 0..N-1, from the
    [N, 512] encoder outputs of a whole file."""
    if features.dim() != 2 or features.shape[1] != FEATURE_DIM or features.shape[0] == 0:
        raise ValueError(f"offline_windows: expected features [N >= 1, {FEATURE_DIM}], "
                         f"got {tuple(features.shape)}")
    n = features.shape[0]
    zero = features.new_zeros(_HALF_WINDOW, FEATURE_DIM)
    # Z + P + Z with 8 zero rows each side: P[k] sits at row k + 8, so P[i-8 : i+8] is rows i .. i+15.
    padded = torch.cat([zero, features[:1], features, features[-1:], zero])
    windows = padded.unfold(0, FEATURE_WINDOW, 1)[:n]          # [n, 512, 16]
    return windows.transpose(1, 2).reshape(n, 32, 16, 16)


class StreamingEncoderInputs:
    """Mel frames in (in order, any number per push) -> encoder inputs ``(j, [1, 80, 16])``
    out, each as soon as its 16 mel frames exist; equal to ``offline_encoder_inputs``
    of the whole stream once ``finish`` has run. One per session; not thread-safe."""

    def __init__(self) -> None:
        self._mel = torch.zeros(N_MELS, 0)
        self._first = 0            # mel frame index of self._mel[:, 0]
        self._total = 0            # mel frames received
        self.next_j = 0
        self._finished = False

    def push(self, mel_frames: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        if self._finished:
            raise RuntimeError("StreamingEncoderInputs.push after finish(); start a new one")
        _check_mel(mel_frames, "StreamingEncoderInputs.push")
        self._mel = torch.cat([self._mel, mel_frames.to(self._mel)], dim=1)
        self._total += mel_frames.shape[1]
        out = []
        while encoder_mel_start(self.next_j) + MEL_WINDOW <= self._total:
            out.append(self._take(encoder_mel_start(self.next_j)))
        self._drop_before(encoder_mel_start(self.next_j))
        return out

    def finish(self) -> list[tuple[int, torch.Tensor]]:
        """The remaining encoder inputs by the offline end rule (windows past the end
        moved left to end at the last mel frame)."""
        if self._finished:
            return []
        self._finished = True
        if self._total == 0:
            return []
        if self._total < MEL_WINDOW:           # as offline: pad a very short stream
            self._mel = _pad_short(self._mel)
            self._total = MEL_WINDOW
        out = []
        while self.next_j < encoder_count(self._total):
            out.append(self._take(_window_start(self.next_j, self._total)))
        self._mel = torch.zeros(N_MELS, 0)
        return out

    def _take(self, start: int) -> tuple[int, torch.Tensor]:
        local = start - self._first
        window = self._mel[:, local:local + MEL_WINDOW].clone().unsqueeze(0)
        self.next_j += 1
        return self.next_j - 1, window

    def _drop_before(self, start: int) -> None:
        # Keep what a later window may read: from the next start on, plus the last 16
        # frames, which the end rule may move a final window back onto.
        keep_from = min(start, self._total - MEL_WINDOW)
        if keep_from > self._first:
            self._mel = self._mel[:, keep_from - self._first:].clone()
            self._first = keep_from


class StreamingWindows:
    """Encoder outputs ``(j, [512])`` in (in order, j = 0, 1, ...) -> U-Net audio inputs
    ``(i, [32, 16, 16])`` out, frame i as soon as F[i + 6] has arrived; equal to
    ``offline_windows`` of all features once ``finish`` has run. One per session."""

    def __init__(self) -> None:
        # P entries from index self._p_first on (P[0] = F0, P[k] = F[k-1]); at most 16.
        self._p: deque[torch.Tensor] = deque()
        self._p_first = 0
        self._received = 0         # features received (N so far)
        self.next_i = 0
        self._finished = False

    def push(self, j: int, feature: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        if self._finished:
            raise RuntimeError("StreamingWindows.push after finish(); start a new one")
        if j != self._received:
            raise ValueError(f"StreamingWindows.push: expected feature {self._received}, got {j} "
                             "(features must arrive in order, once each)")
        if feature.shape != (FEATURE_DIM,):
            raise ValueError(f"StreamingWindows.push: expected a [{FEATURE_DIM}] feature, "
                             f"got {tuple(feature.shape)}")
        if j == 0:
            self._p.append(feature)            # P[0] = F0, the left edge copy
        self._p.append(feature)                # P[j + 1] = F[j]
        self._received += 1
        out = []
        # Frame i needs P up to index i + 7, i.e. F[i + 6].
        while self.next_i + _HALF_WINDOW - 1 <= self._received:
            out.append(self._emit(p_end=self._received + 1))
        return out

    def finish(self) -> list[tuple[int, torch.Tensor]]:
        """The last frames (up to i = N - 1) with P's right edge copy F(N-1) and zeros
        beyond it."""
        if self._finished:
            return []
        self._finished = True
        if self._received == 0:
            return []
        self._p.append(self._p[-1])            # P[N + 1] = F(N - 1)
        out = []
        while self.next_i < self._received:
            out.append(self._emit(p_end=self._received + 2))
        self._p.clear()
        return out

    def _emit(self, p_end: int) -> tuple[int, torch.Tensor]:
        """Window of frame next_i; P entries at index >= p_end are zeros."""
        i = self.next_i
        entries = []
        for k in range(i - _HALF_WINDOW, i + _HALF_WINDOW):
            inside = 0 <= k < p_end
            entries.append(self._p[k - self._p_first] if inside else None)
        self.next_i += 1
        # The next window starts at P[next_i - 8]: drop what lies before it.
        while self._p and self._p_first < self.next_i - _HALF_WINDOW:
            self._p.popleft()
            self._p_first += 1
        return i, _window(entries)


def lookahead_samples(i: int) -> int:
    """Samples after the start of video frame i (sample 640 i) that must have arrived
    before frame i can be made: frame i needs F[i + 6], whose mel window ends at mel
    frame ``int(80 (i + 6) / 25) + 15``, whose STFT window (centred on sample 200 t)
    ends 400 samples after its centre."""
    last_mel = encoder_mel_start(i + LOOKAHEAD_FEATURES) + MEL_WINDOW - 1
    return HOP * last_mel + N_FFT // 2 - SAMPLES_PER_VIDEO_FRAME * i


def lookahead_seconds() -> float:
    """Audio after the START of video frame i needed before frame i can be made, in
    seconds: the worst case over i of ``lookahead_samples`` (the pattern repeats every
    5 frames, 7080..7240 samples), i.e. 7240 / 16000 = 0.4525 s. Of that, 40 ms is
    frame i itself; the rest (0.4125 s) is audio after frame i ends. This is the
    minimum audio-to-lip delay of a live session before any compute time."""
    return max(lookahead_samples(i) for i in range(VIDEO_FPS)) / SAMPLE_RATE
