"""Speech to talk to the lip-sync pipeline with, made offline: espeak-ng's English voice.

The benchmark and the tests need real speech (voiced and unvoiced sounds, pauses, a
loudness envelope), not tones: the VAD, the mel and the mouth all respond to what speech
is. espeak-ng (a Debian package; CI installs it) synthesises it offline at 22,050 Hz;
``espeak_speech`` brings it to the pipeline's 16 kHz PCM16 between stretches of digital
silence.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

RATE = 16_000


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def espeak_speech(text: str, lead_s: float = 0.0, tail_s: float = 0.0) -> np.ndarray:
    """``text`` spoken by espeak-ng as int16 mono 16 kHz, after ``lead_s`` and before
    ``tail_s`` seconds of digital silence. Raises FileNotFoundError without espeak-ng."""
    if not have_espeak():
        raise FileNotFoundError("espeak-ng is not installed (apt install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", "en", "-s", "150", "-w", str(path), text], check=True,
                       capture_output=True, timeout=60)
        with wave.open(str(path)) as wav:
            rate, raw = wav.getframerate(), wav.readframes(wav.getnframes())
    voice = np.frombuffer(raw, np.int16).astype(np.float64)
    # Linear interpolation to 16 kHz: espeak's voice has little energy above 5 kHz, so the
    # aliasing a proper low-pass would remove is far below what the tests measure.
    times = np.arange(int(len(voice) * RATE / rate)) / RATE
    resampled = np.interp(times, np.arange(len(voice)) / rate, voice)
    pcm = np.concatenate([np.zeros(int(lead_s * RATE)), resampled, np.zeros(int(tail_s * RATE))])
    return pcm.round().clip(-32768, 32767).astype(np.int16)
