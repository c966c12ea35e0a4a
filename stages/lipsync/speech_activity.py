"""Is someone speaking in this video frame? silero-vad per 32 ms, loudness per 40 ms.

The lip-sync pipeline uses this to tell talking from silence (and the page shows
it). The voice activity detector is silero-vad, loaded from the
TorchScript file shipped inside the ``silero-vad`` wheel (``silero_vad/data/
silero_vad.jit``): no download, no torchaudio (the package needs it only for its
audio file helpers).

How the model is used, and why:

* silero's 16 kHz network takes 512-sample chunks (32 ms) plus the last 64 samples of
  the previous chunk as context, and carries an LSTM state [2, 1, 128] from chunk to
  chunk. The shipped wrapper keeps that state (and the context) *inside the module*,
  so one wrapper serves one stream at a time. We call the inner network
  (``model._model(x, state) -> (probability, state)``) and keep state and context in
  each ``SpeechActivity``: one loaded model serves every session, and a session can
  never see another's state. ``test_speech_activity`` checks this equals the wrapper.
* We locate the file without importing ``silero_vad``: its ``model.py`` calls
  ``torch.set_num_threads(1)`` at import time, which would silently slow every other
  network on the CPU in this process.
* Video frame i is samples [640 i, 640 (i + 1)), 1.25 VAD chunks. Its probability is
  the highest of the chunks that *end* inside it (one or two; every chunk ends in
  exactly one frame). Such a chunk is complete when the frame is, so a frame is
  reported as soon as its last sample arrives, with no extra delay, and the chunk
  covers at least the frame's last 128 samples.
* Each call runs with one intra-op thread (``mel.one_intraop_thread``): the network is
  tiny (~0.25 ms per chunk on one core), and split over all cores of a busy CPU it
  took 10-20 ms per 32 ms chunk (measured on 2 loaded cores).
* ``speech`` is ``probability >= threshold``, held for ``hangover_s`` after the last
  such frame so a mouth does not snap shut in the short gaps between words.

``loudness_db`` is the frame's RMS in dBFS (``20 log10(rms)`` with samples in [-1, 1],
so a full-scale sine reads -3 dB), -100 for digital silence.
"""

from __future__ import annotations

import importlib.util
import math
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.lipsync.audio_windows import SAMPLES_PER_VIDEO_FRAME, VIDEO_FPS
from stages.lipsync.mel import one_intraop_thread

VAD_CHUNK = 512            # samples per silero call at 16 kHz (32 ms)
VAD_CONTEXT = 64           # samples of the previous chunk prepended to each call
VAD_STATE_SHAPE = (2, 1, 128)
SILENCE_DB = -100.0

_model_lock = threading.Lock()
_model: torch.jit.ScriptModule | None = None


@dataclass(frozen=True)
class FrameActivity:
    """Speech activity of video frame ``index`` (samples [640 i, 640 (i + 1)))."""

    index: int
    speech: bool
    probability: float     # silero's speech probability, 0..1
    loudness_db: float     # RMS dBFS, -100 for digital silence


def silero_path() -> Path:
    """The TorchScript silero-vad shipped in the installed wheel (found, not imported)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("silero-vad is not installed (pip install 'silero-vad>=6'); "
                           "the lip-sync speech detector needs its shipped model")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.jit"
    if not path.is_file():
        raise RuntimeError(f"silero-vad model not found at {path}: the installed wheel "
                           "lacks its data files (reinstall silero-vad)")
    return path


def silero_model() -> torch.jit.ScriptModule:
    """The shared silero-vad network (loaded once per process, CPU, eval)."""
    global _model
    with _model_lock:
        if _model is None:
            path = silero_path()
            try:
                with warnings.catch_warnings():
                    # torch >= 2.13 deprecates TorchScript loading; silero ships only
                    # TorchScript and ONNX, and this file is the one the wheel tests.
                    warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=DeprecationWarning)
                    model = torch.jit.load(str(path), map_location="cpu")
            except Exception as e:  # a corrupt or incompatible file: name it
                raise RuntimeError(f"silero-vad model {path} could not be loaded: {e}") from e
            _model = model.eval()
        return _model


def loudness_db(samples: torch.Tensor) -> float:
    """RMS level of float samples in [-1, 1], in dBFS; -100 for silence (and the floor)."""
    if samples.numel() == 0:
        return SILENCE_DB
    rms = math.sqrt(float(samples.double().square().mean()))
    return max(SILENCE_DB, 20.0 * math.log10(rms)) if rms > 0 else SILENCE_DB


class SpeechActivity:
    """Per-session speech detection: samples in, one ``FrameActivity`` per completed
    640-sample video frame out, in order. Not thread-safe (one session, one caller);
    many instances may run concurrently, they share only the stateless network."""

    def __init__(self, threshold: float = 0.5, hangover_s: float = 0.2) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"SpeechActivity threshold must be in (0, 1), got {threshold}")
        if not hangover_s >= 0.0:
            raise ValueError(f"SpeechActivity hangover_s must be >= 0, got {hangover_s}")
        self.threshold = threshold
        self.hangover_s = hangover_s
        self.hangover_frames = round(hangover_s * VIDEO_FPS)
        self._net = silero_model()._model      # the 16 kHz network, without the wrapper's state
        self._state = torch.zeros(VAD_STATE_SHAPE)
        self._context = torch.zeros(1, VAD_CONTEXT)
        self._vad_pending = torch.zeros(0)     # samples not yet in a VAD chunk
        self._frame_pending = torch.zeros(0)   # samples of the current video frame
        self._vad_done = 0                     # samples consumed by VAD chunks
        self._chunks: list[tuple[int, float]] = []  # (end sample, probability) not yet assigned
        self._last_speech: int | None = None
        self._finished = False
        self.frames_out = 0

    def push(self, samples: torch.Tensor) -> list[FrameActivity]:
        """Add float samples (1-D, in [-1, 1], 16 kHz); returns the frames they complete."""
        if self._finished:
            raise RuntimeError("SpeechActivity.push after finish(); start a new SpeechActivity")
        if not isinstance(samples, torch.Tensor) or samples.dim() != 1 or not samples.is_floating_point():
            got = f"{tuple(samples.shape)} {samples.dtype}" if isinstance(samples, torch.Tensor) else type(samples).__name__
            raise ValueError(f"SpeechActivity.push: expected a 1-D float tensor of samples, got {got}")
        x = samples.detach().to("cpu", torch.float32)
        self._vad_pending = torch.cat([self._vad_pending, x])
        while self._vad_pending.numel() >= VAD_CHUNK:
            self._run_vad(self._vad_pending[:VAD_CHUNK])
            self._vad_pending = self._vad_pending[VAD_CHUNK:]
        self._frame_pending = torch.cat([self._frame_pending, x])
        out = []
        while self._frame_pending.numel() >= SAMPLES_PER_VIDEO_FRAME:
            out.append(self._emit(self._frame_pending[:SAMPLES_PER_VIDEO_FRAME], None))
            self._frame_pending = self._frame_pending[SAMPLES_PER_VIDEO_FRAME:]
        return out

    def finish(self) -> list[FrameActivity]:
        """The last, partial frame (if any samples of it arrived): its VAD chunk padded
        with zeros, its loudness over the samples that exist. Closes the session."""
        if self._finished:
            return []
        self._finished = True
        if self._frame_pending.numel() == 0:
            return []
        if self._vad_pending.numel():
            pad = VAD_CHUNK - self._vad_pending.numel()
            self._run_vad(torch.cat([self._vad_pending, torch.zeros(pad)]))
        return [self._emit(self._frame_pending, math.inf)]

    def reset(self) -> None:
        """Start over as a new stream (frame 0, fresh network state)."""
        self.__init__(self.threshold, self.hangover_s)

    def _run_vad(self, chunk: torch.Tensor) -> None:
        x = torch.cat([self._context, chunk.unsqueeze(0)], dim=1)     # [1, 576]
        with torch.inference_mode(), one_intraop_thread():
            prob, self._state = self._net(x, self._state)
        self._context = x[:, -VAD_CONTEXT:]
        self._vad_done += VAD_CHUNK
        self._chunks.append((self._vad_done, float(prob)))

    def _emit(self, frame: torch.Tensor, end: float | None) -> FrameActivity:
        i = self.frames_out
        end = SAMPLES_PER_VIDEO_FRAME * (i + 1) if end is None else end
        mine = [p for e, p in self._chunks if e <= end]
        self._chunks = [(e, p) for e, p in self._chunks if e > end]
        probability = max(mine) if mine else 0.0
        if probability >= self.threshold:
            self._last_speech = i
        speech = self._last_speech is not None and i - self._last_speech <= self.hangover_frames
        self.frames_out += 1
        return FrameActivity(index=i, speech=speech, probability=probability,
                             loudness_db=loudness_db(frame))


def frame_samples(index: int) -> tuple[int, int]:
    """The [start, end) samples of video frame ``index`` at 16 kHz, 25 fps."""
    return SAMPLES_PER_VIDEO_FRAME * index, SAMPLES_PER_VIDEO_FRAME * (index + 1)

