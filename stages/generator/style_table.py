"""Which of the style net's 26 styles a portrait gets: per emotion, and per pinned look.

``stylenet.StyleNet`` takes a row of 26 style weights per image; any non-negative row
summing to 1 is a valid style, and blends of two or three styles read as one coherent
look. The tables below were chosen by rendering every one-hot style and the candidate
blends on the astronaut fixture (a contact sheet) and looking at them:

* ``EMOTION_BLENDS`` — with ``style: auto`` the face's emotion probabilities blend these
  rows (``emotion_style_weights``), so a face hesitating between happy and surprise gets
  a mix of both looks, and the portrait drifts smoothly as the smoothed probabilities do.
* ``LOOK_BLENDS`` — a pinned style (``named_style_weights``), one per pinned name of
  ``core.settings.STYLES`` (``neon``, ``ink``, ``pop``, ``noir``, ``aurora``), so the live
  ``style`` setting means the same look family with either renderer. Each look stands
  for one family of similar styles (members listed per look).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from stages.generator.stylenet import STYLE_COUNT, STYLE_NAMES
from stages.prompt import EMOTIONS as EMOTION_LABELS

# EMOTION_LABELS: the FER labels in classifier order, the same tuple as
# stages.vision.emotion_model's; taken from stages.prompt so that the generator does not
# import the vision stage.

EMOTION_BLENDS: dict[str, dict[str, float]] = {
    # Bright: sunny yellow pastel under bold black comic outlines.
    "happy": {"golden-pastel": 0.5, "pop-outline": 0.5},
    # Hot: fiery red strokes over a red/orange brick weave.
    "angry": {"red-inferno": 0.6, "brick-weave": 0.4},
    # Cool: Starry-Night blues with a navy etched line.
    "sad": {"starry-blue": 0.6, "navy-etching": 0.4},
    # Dark: hollow-eyed indigo lace sunk in murky dark oil.
    "fear": {"indigo-lace": 0.6, "dark-oil": 0.4},
    # Vivid: flat primaries cut by electric blue and red shards.
    "surprise": {"primary-blocks": 0.5, "electric-shards": 0.5},
    # Sickly: acid yellow-green expressionism with a teal mosaic rash.
    "disgust": {"acid-green": 0.7, "teal-mosaic": 0.3},
    # Calm: soft lavender haze with pale frosted teal.
    "neutral": {"lavender-haze": 0.6, "frosted-teal": 0.4},
}
"""Per FER label: style name -> weight (normalised on use)."""

LOOK_BLENDS: dict[str, dict[str, float]] = {
    # family: yellow-comic, primary-blocks, pop-outline -- bold outlines, flat bright colour
    "pop": {"pop-outline": 0.6, "yellow-comic": 0.4},
    # family: charcoal-sketch, ink-drawing -- line drawings on pale paper
    "ink": {"ink-drawing": 0.5, "charcoal-sketch": 0.5},
    # family: indigo-lace, dark-oil -- dark, murky, low-key
    "noir": {"dark-oil": 0.6, "indigo-lace": 0.4},
    # family: electric-shards, brick-weave -- vivid abstract patterns
    "neon": {"electric-shards": 0.7, "brick-weave": 0.3},
    # family: golden-pastel, pastel-sketch, lavender-haze, stained-glass -- soft iridescent pastels
    "aurora": {"stained-glass": 0.6, "lavender-haze": 0.4},
}
"""Per pinned look: style name -> weight (normalised on use)."""

LOOKS: tuple[str, ...] = tuple(LOOK_BLENDS)
"""Look names a user may pin (``named_style_weights`` also takes any of ``STYLE_NAMES``)."""


def _row(blend: Mapping[str, float], owner: str) -> np.ndarray:
    """A blend by style name -> a normalised float32 row of 26 weights."""
    row = np.zeros(STYLE_COUNT, dtype=np.float32)
    for name, weight in blend.items():
        if name not in STYLE_NAMES:
            raise ValueError(f"{owner}: unknown style {name!r}")
        if not weight > 0:
            raise ValueError(f"{owner}: weight of {name!r} must be positive, got {weight}")
        row[STYLE_NAMES.index(name)] += weight
    return row / row.sum()


# Checked and normalised once at import, so a typo in the tables fails the first import.
_EMOTION_ROWS = np.stack([_row(EMOTION_BLENDS[label], label) for label in EMOTION_LABELS])
_LOOK_ROWS = {name: _row(blend, name) for name, blend in LOOK_BLENDS.items()}
_NEUTRAL = EMOTION_LABELS.index("neutral")


def emotion_style_weights(probs: Mapping[str, float]) -> np.ndarray:
    """The probability-weighted blend of the emotions' rows: float32 ``[26]`` summing to 1.

    ``probs`` maps FER labels to probabilities (they need not sum to 1). Labels the
    table does not know count as neutral, like ``stages.prompt.style_prompt`` reads them,
    so a classifier with a new label degrades gracefully; negative or non-finite values
    count as 0, and no probability mass at all gives the neutral row.
    """
    mass = np.zeros(len(EMOTION_LABELS), dtype=np.float64)
    for label, p in probs.items():
        p = float(p)
        if not np.isfinite(p) or p <= 0:
            continue
        mass[EMOTION_LABELS.index(label) if label in EMOTION_LABELS else _NEUTRAL] += p
    total = mass.sum()
    if total <= 0:
        return _EMOTION_ROWS[_NEUTRAL].copy()
    row = (mass / total) @ _EMOTION_ROWS
    return (row / row.sum()).astype(np.float32)


def named_style_weights(name: str) -> np.ndarray:
    """The row of a pinned look (``LOOKS``) or of one style (``STYLE_NAMES``, one-hot)."""
    if name in _LOOK_ROWS:
        return _LOOK_ROWS[name].copy()
    if name in STYLE_NAMES:
        row = np.zeros(STYLE_COUNT, dtype=np.float32)
        row[STYLE_NAMES.index(name)] = 1.0
        return row
    raise ValueError(f"unknown style {name!r}; allowed looks: {', '.join(LOOKS)}; "
                     f"or one of the {STYLE_COUNT} styles: {', '.join(STYLE_NAMES)}")
