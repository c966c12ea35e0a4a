"""The emotion → style ruleset: complete, deterministic, honouring pinned styles."""

from __future__ import annotations

import pytest

from core.settings import STYLES
from stages.prompt import EMOTIONS, LOOKS, MIN_INTENSITY, MOODS, PINNED_STYLES, WARP_KINDS, style_prompt


def test_every_label_maps_to_a_complete_prompt():
    for emotion in EMOTIONS:
        p = style_prompt(emotion, 0.9)
        assert p.emotion == emotion and p.name == f"{MOODS[emotion].auto_style}/{emotion}"
        assert p.style in PINNED_STYLES and p.warp in WARP_KINDS
        assert p.text.startswith(LOOKS[p.style].subject) and MOODS[emotion].words in p.text
        assert p.negative and len(p.palette.stops) >= 2
        assert all(0 <= c <= 255 for stop in p.palette.stops + (p.palette.edge,) for c in stop)
        assert p.levels >= 2 and 0 < p.edges <= 1 and 0 < p.warp_amount <= 1 and p.speed > 0


def test_auto_gives_each_emotion_its_own_palette_and_motion():
    prompts = [style_prompt(e, 1.0) for e in EMOTIONS]
    assert len({p.palette.name for p in prompts}) == len(EMOTIONS)
    assert len({(p.warp, p.speed) for p in prompts}) == len(EMOTIONS)
    assert len({p.text for p in prompts}) == len(EMOTIONS)


def test_pinned_style_keeps_its_look_and_follows_the_emotion():
    for style in PINNED_STYLES:
        happy, sad = style_prompt("happy", 0.9, style), style_prompt("sad", 0.9, style)
        assert happy.style == sad.style == style and happy.name == f"{style}/happy"
        assert happy.palette == sad.palette == LOOKS[style].palette
        assert happy.levels == sad.levels == LOOKS[style].levels
        assert (happy.warp, sad.warp) == (MOODS["happy"].warp, MOODS["sad"].warp)
        assert happy.text != sad.text and happy.text.startswith(LOOKS[style].subject)
    assert set(PINNED_STYLES) == set(STYLES) - {"auto"} == set(LOOKS)


def test_confidence_modulates_intensity():
    weak, strong = style_prompt("angry", 0.0, "noir"), style_prompt("angry", 1.0, "noir")
    assert weak.intensity == pytest.approx(MIN_INTENSITY) and strong.intensity == pytest.approx(1.0)
    assert weak.warp_amount < strong.warp_amount and weak.speed < strong.speed and weak.edges < strong.edges
    assert "subtle" in weak.text and "intense" in strong.text
    assert style_prompt("angry", 7.0).confidence == 1.0 and style_prompt("angry", -1.0).confidence == 0.0


def test_deterministic_and_unknown_labels_read_as_neutral():
    assert style_prompt("fear", 0.42, "aurora") == style_prompt("fear", 0.42, "aurora")
    assert style_prompt("contempt", 0.8).emotion == "neutral"
    with pytest.raises(ValueError, match="style"):
        style_prompt("happy", 0.5, "vaporwave")
