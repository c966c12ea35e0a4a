"""Real speech for the audio front end's tests, or a skip where espeak-ng is missing."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.bench.speech import espeak_speech, have_espeak


def espeak_16k(text: str) -> np.ndarray:
    """espeak-ng's voice as float32 in [-1, 1] at 16 kHz (the test skips without espeak-ng)."""
    if not have_espeak():
        pytest.skip("espeak-ng is not installed")
    return espeak_speech(text).astype(np.float32) / 32768
