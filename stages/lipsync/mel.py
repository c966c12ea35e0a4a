"""The Wav2Lip mel spectrogram in plain torch, offline and streaming.

SyncTalk_2D's audio encoder was trained on Wav2Lip's features (its ``audio.py``, built
on librosa and scipy). The model only works on exactly those numbers, so this file
reproduces them step by step, without librosa or scipy at run time:

1. pre-emphasis ``y[n] = x[n] - 0.97 x[n-1]`` with ``x[-1] = 0``;
2. STFT: n_fft 800, hop 200, periodic Hann window of 800, ``center=True`` with zero
   padding (librosa >= 0.10's default ``pad_mode="constant"``): frame t covers input
   samples ``[200 t - 400, 200 t + 400)``, zeros outside the signal;
3. magnitude, then 80 mel bands 55..7600 Hz (librosa's Slaney mel scale and Slaney
   area normalisation, rebuilt in ``mel_filterbank``);
4. ``20 log10(max(1e-5, m)) - 20`` dB, normalised to ``clip(8 (S + 100) / 100 - 4, -4, 4)``.

A signal of n samples gives ``n // 200 + 1`` frames, 80 per second.

The arithmetic runs in float64 and is returned as float32: the log of small mel
energies magnifies float32 rounding of the FFT (a band at the 1e-5 floor next to loud
bands), and float64 keeps us far inside the 1e-4 agreement with librosa at a cost that
does not matter here (80 frames of 800 samples per second of audio).

``StreamingMel`` gives the same frames chunk by chunk: a frame is final once the 400
samples after its centre have arrived, so each ``push`` computes only the frames it
completes and keeps just the samples later frames still need, on the calling thread
alone (``one_intraop_thread``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn import functional as F

SAMPLE_RATE = 16_000
N_FFT = 800
HOP = 200
WIN = 800
N_MELS = 80
FMIN = 55.0
FMAX = 7600.0
PREEMPHASIS = 0.97
MEL_FPS = SAMPLE_RATE // HOP  # 80
MIN_LEVEL = 1e-5                # amplitude floor, -100 dB
REF_LEVEL_DB = 20.0
MIN_LEVEL_DB = -100.0
MAX_ABS_VALUE = 4.0
SILENCE_VALUE = -MAX_ABS_VALUE
"""The normalised value of every band of digital silence (the floor, clipped)."""

_HALF = N_FFT // 2  # centre padding on each side, and look-ahead of a frame in samples
_OFFLINE_BATCH = 4096  # frames per FFT call offline: bounds memory for long files


# -- Slaney mel scale (librosa.hz_to_mel / mel_to_hz with htk=False) -----------------
_F_SP = 200.0 / 3.0                    # Hz per mel in the linear part
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP     # 15 mel
_LOG_STEP = math.log(6.4) / 27.0


def _hz_to_mel(hz: float) -> float:
    if hz < _MIN_LOG_HZ:
        return hz / _F_SP
    return _MIN_LOG_MEL + math.log(hz / _MIN_LOG_HZ) / _LOG_STEP


def _mel_to_hz(mels: torch.Tensor) -> torch.Tensor:
    linear = mels * _F_SP
    log = _MIN_LOG_HZ * torch.exp(_LOG_STEP * (mels - _MIN_LOG_MEL))
    return torch.where(mels >= _MIN_LOG_MEL, log, linear)


@functools.lru_cache(maxsize=1)
def _filterbank64() -> torch.Tensor:
    """[80, 401] float64: triangles between consecutive mel points, each scaled by
    2 / (its width in Hz) so every band has the same area (Slaney normalisation)."""
    mel_points = torch.linspace(_hz_to_mel(FMIN), _hz_to_mel(FMAX), N_MELS + 2, dtype=torch.float64)
    hz_points = _mel_to_hz(mel_points)                                  # [82]
    fft_hz = torch.arange(N_FFT // 2 + 1, dtype=torch.float64) * (SAMPLE_RATE / N_FFT)
    widths = hz_points[1:] - hz_points[:-1]                             # [81]
    ramps = hz_points[:, None] - fft_hz[None, :]                        # [82, 401]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return weights * (2.0 / (hz_points[2:] - hz_points[:-2]))[:, None]


@functools.lru_cache(maxsize=1)
def _window64() -> torch.Tensor:
    return torch.hann_window(WIN, periodic=True, dtype=torch.float64)


def mel_filterbank() -> torch.Tensor:
    """The [80, 401] float32 mel basis, equal to ``librosa.filters.mel(sr=16000,
    n_fft=800, n_mels=80, fmin=55, fmax=7600)`` (a fresh copy: callers may modify it)."""
    return _filterbank64().to(torch.float32)


_THREADS_PER_OS_THREAD = "parallel backend: OpenMP" in torch.__config__.parallel_info()


@contextmanager
def one_intraop_thread() -> Iterator[None]:
    """Run the block's torch ops on the calling thread alone.

    Streaming work comes in tiny pieces (two 800-point FFTs, an [80, 2] log), and torch
    still hands some of them to its intra-op pool (MKL's vector math does so for
    ``log10`` of 160 numbers); on a busy CPU each hand-off waits for a core, measured
    at 1-6 ms per 20 ms chunk on 2 loaded cores against ~0.1 ms on the calling thread.
    With the OpenMP backend of the official wheels ``torch.set_num_threads`` is a
    per-OS-thread setting, so changing it around the block leaves every other thread
    alone; with another backend it is process-wide and we do not touch it.
    """
    before = torch.get_num_threads()
    if not _THREADS_PER_OS_THREAD or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_wav(wav: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(wav, torch.Tensor) or wav.dim() != 1 or not wav.is_floating_point():
        got = f"{tuple(wav.shape)} {wav.dtype}" if isinstance(wav, torch.Tensor) else type(wav).__name__
        raise ValueError(f"{what}: expected a 1-D float tensor of samples in [-1, 1] "
                         f"(int16 / 32768), got {got}")
    return wav.detach().to("cpu", torch.float64)


def pcm16_to_float(pcm: bytes) -> torch.Tensor:
    """Little-endian PCM16 mono bytes as float32 samples in [-1, 1) (int16 / 32768)."""
    if len(pcm) % 2:
        raise ValueError(f"PCM16 audio must have an even number of bytes, got {len(pcm)}")
    if not pcm:
        return torch.zeros(0)
    samples = torch.frombuffer(bytearray(pcm), dtype=torch.int16)
    if not _LITTLE_ENDIAN:
        samples = samples.byteswap()
    return samples.to(torch.float32) / 32768.0


_LITTLE_ENDIAN = torch.tensor([1], dtype=torch.int16).view(torch.uint8)[0].item() == 1


def _preemphasis(x: torch.Tensor, previous: float) -> torch.Tensor:
    shifted = torch.cat([x.new_tensor([previous]), x[:-1]])
    return x - PREEMPHASIS * shifted


def _frames_to_mel(frames: torch.Tensor) -> torch.Tensor:
    """[k, 800] float64 pre-emphasised frames -> [80, k] float32 normalised mel."""
    if frames.shape[0] == 0:
        return torch.zeros(N_MELS, 0)
    magnitude = torch.fft.rfft(frames * _window64(), dim=1).abs()       # [k, 401]
    mel = _filterbank64() @ magnitude.T                                  # [80, k]
    db = 20.0 * torch.log10(torch.clamp(mel, min=MIN_LEVEL)) - REF_LEVEL_DB
    normalised = (2 * MAX_ABS_VALUE) * ((db - MIN_LEVEL_DB) / -MIN_LEVEL_DB) - MAX_ABS_VALUE
    return torch.clamp(normalised, -MAX_ABS_VALUE, MAX_ABS_VALUE).to(torch.float32)


def frame_count(n_samples: int) -> int:
    """Mel frames of a signal of ``n_samples`` samples (``center=True``)."""
    return n_samples // HOP + 1


def melspectrogram(wav: torch.Tensor) -> torch.Tensor:
    """[80, len // 200 + 1] float32 Wav2Lip mel of a whole 16 kHz signal (1-D float,
    int16 / 32768)."""
    y = _preemphasis(_check_wav(wav, "melspectrogram"), 0.0)
    frames = F.pad(y, (_HALF, _HALF)).unfold(0, N_FFT, HOP)             # [T, 800] view
    return torch.cat([_frames_to_mel(frames[i:i + _OFFLINE_BATCH])
                      for i in range(0, max(1, frames.shape[0]), _OFFLINE_BATCH)], dim=1)


class StreamingMel:
    """The mel of one audio stream, computed as samples arrive.

    The frames returned by all ``push`` calls and ``finish`` together equal
    ``melspectrogram`` of all the samples (to float rounding, well under 1e-4). Frame t
    is returned by the push that brings the sample count to ``200 t + 400``: the mel
    itself adds 25 ms of look-ahead after a frame's centre. One instance per session;
    not thread-safe.
    """

    def __init__(self) -> None:
        # Pre-emphasised samples from input index 200 * frames_out - 400 on (the first
        # 400 are the centre padding); all that the next frame needs and nothing older.
        self._buffer = torch.zeros(_HALF, dtype=torch.float64)
        self._previous = 0.0          # last raw sample, for the pre-emphasis filter
        self._finished = False
        self.samples_in = 0
        self.frames_out = 0

    def push(self, samples: torch.Tensor) -> torch.Tensor:
        """Add samples (1-D float, any length); returns the [80, k] frames they complete."""
        if self._finished:
            raise RuntimeError("StreamingMel.push after finish(); start a new StreamingMel")
        x = _check_wav(samples, "StreamingMel.push")
        if x.numel() == 0:
            return torch.zeros(N_MELS, 0)
        self._buffer = torch.cat([self._buffer, _preemphasis(x, self._previous)])
        self._previous = float(x[-1])
        self.samples_in += x.numel()
        ready = (self.samples_in - _HALF) // HOP + 1 if self.samples_in >= _HALF else 0
        return self._emit(ready - self.frames_out)

    def finish(self) -> torch.Tensor:
        """The frames still open, the signal zero-padded on the right as offline; after
        this the stream is closed."""
        if self._finished:
            return torch.zeros(N_MELS, 0)
        self._finished = True
        remaining = frame_count(self.samples_in) - self.frames_out
        needed = HOP * (remaining - 1) + N_FFT
        if self._buffer.numel() < needed:
            self._buffer = F.pad(self._buffer, (0, needed - self._buffer.numel()))
        return self._emit(remaining)

    def _emit(self, count: int) -> torch.Tensor:
        if count <= 0:
            return torch.zeros(N_MELS, 0)
        frames = self._buffer[:HOP * (count - 1) + N_FFT].unfold(0, N_FFT, HOP)
        with one_intraop_thread():
            out = _frames_to_mel(frames)
        # Drop what no later frame reads; clone so the kept tail does not pin the old buffer.
        self._buffer = self._buffer[HOP * count:].clone()
        self.frames_out += count
        return out
