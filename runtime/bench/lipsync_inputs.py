"""What section 'lipsync' feeds its parts: avatars built from the astronaut photo, and speech.

Avatars: the default astronaut and three variants of its photo (mirrored, shifted, zoomed;
``prepare.build_avatar``), so concurrent sessions show distinct avatars and the 4-rank run
spreads them over its two lip-sync replicas. Speech: espeak-ng's voice
(``runtime.bench.speech``) between stretches of silence; without espeak-ng, a voiced
stand-in for the audio front end's timing (the pipeline runs are then skipped).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from runtime.bench.speech import RATE, espeak_speech, have_espeak
from runtime.bench.stage_harness import ASTRONAUT
from stages.lipsync.prepare import DEFAULT_AVATAR, build_avatar, ensure_default_avatar

log = logging.getLogger(__name__)

SPEECH = {False: ("Hello there. This is a benchmark of the lip sync pipeline.", 0.6, 0.9),
          True: ("Hello there.", 0.3, 0.6)}
"""(text, lead silence s, tail silence s) by ``options.quick``. The tail must exceed the
look-ahead, or the last spoken frames never come out."""
AVATAR_SECONDS = {False: 2.0, True: 1.0}
"""Idle-sway length of the avatars built here (the default astronaut is always 4 s)."""


def avatar_variants() -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Avatar id -> how its photo is made from the astronaut's (BGR): distinct pictures of
    one face that MTCNN still finds."""
    def shifted(image: np.ndarray) -> np.ndarray:
        return cv2.warpAffine(image, np.float32([[1, 0, 48], [0, 1, 16]]), image.shape[1::-1],
                              borderMode=cv2.BORDER_REFLECT)

    def zoomed(image: np.ndarray) -> np.ndarray:
        matrix = cv2.getRotationMatrix2D((280.0, 150.0), 0.0, 1.15)
        return cv2.warpAffine(image, matrix, image.shape[1::-1], borderMode=cv2.BORDER_REFLECT)

    return {"mirrored": lambda image: cv2.flip(image, 1), "shifted": shifted, "zoomed": zoomed}


def build_avatars(root: Path, scratch: Path, seconds: float) -> tuple[list[str], dict[str, Any]]:
    """The default avatar and the variants under ``root``; returns the ids that exist (a
    variant whose build fails is left out and reported) and what each build took."""
    built: dict[str, Any] = {}
    started = time.monotonic()
    ensure_default_avatar(root)
    built[DEFAULT_AVATAR] = {"s": time.monotonic() - started}
    photo = cv2.imread(str(ASTRONAUT))
    if photo is None:
        raise FileNotFoundError(f"benchmark fixture missing or unreadable: {ASTRONAUT}")
    ids = [DEFAULT_AVATAR]
    for avatar, make in avatar_variants().items():
        path = scratch / f"{avatar}.jpg"
        cv2.imwrite(str(path), make(photo))
        started = time.monotonic()
        try:
            build_avatar(image=path, video=None, avatar=avatar, root=root, seconds=seconds)
        except (ValueError, FileNotFoundError) as e:
            log.warning("lipsync bench: avatar %s could not be built: %s", avatar, e)
            built[avatar] = {"error": f"{type(e).__name__}: {e}"}
            continue
        built[avatar] = {"s": time.monotonic() - started}
        ids.append(avatar)
    return ids, built


def synthetic_speech(seconds: float) -> np.ndarray:
    """A voiced, syllable-paced stand-in for speech (harmonics of 140 Hz, 4 Hz envelope),
    for the audio front end's timing when espeak-ng is missing."""
    t = np.arange(int(seconds * RATE)) / RATE
    voice = sum(np.sin(2 * np.pi * 140.0 * k * t) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * 4.0 * t), 0.0, None)
    return (3000.0 * voice * envelope).round().clip(-32768, 32767).astype(np.int16)


def speech(quick: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """The speech every part is fed (int16, 16 kHz) and what the notes say of it."""
    text, lead, tail = SPEECH[quick]
    if have_espeak():
        pcm = espeak_speech(text, lead, tail)
        source = "espeak-ng"
    else:
        pcm = synthetic_speech(lead + 1.5 + tail)
        source = "synthetic (no espeak-ng)"
    return pcm, {"source": source, "text": text if source == "espeak-ng" else None, "seconds": len(pcm) / RATE,
                 "lead_s": lead, "tail_s": tail}
