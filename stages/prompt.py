"""The emotion → style ruleset: what a portrait should look like for a detected mood.

Pure data and one function, ``style_prompt(emotion, confidence, style)``, so the same
rules drive the low-fi generator today and a diffusion stage later: a ``StylePrompt``
holds both the text prompt (for a text-to-image model) and the parameters of the
low-fi look (palette, posterize levels, edges, warp, animation speed).

Two tables decide the result:

* ``MOODS`` — one per FER label (angry, disgust, fear, happy, sad, surprise, neutral):
  the adjectives of the prompt and the motion (warp kind, amount, speed). The motion
  always follows the emotion, whatever the style.
* ``LOOKS`` — one per pinned style (neon, ink, pop, noir, aurora): the palette, the
  posterize levels, edges and colour keeping.

With ``style="auto"`` the emotion picks the look (``Mood.auto_style``) *and* its own
palette, so every emotion reads differently; with a pinned style the look and palette
stay fixed and only the motion and prompt wording follow the emotion. In both cases the
emotion's confidence scales how strongly the mood shows (``intensity``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from core.settings import STYLES

EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
"""The FER-2013 labels, in the order of the usual classifier outputs."""

PINNED_STYLES = tuple(s for s in STYLES if s != "auto")

WARP_KINDS = ("none", "swirl", "ripple", "bulge", "melt", "shiver", "wave")
"""Warps ``stages.generator.lowfi`` knows; a mood names one of them."""

MIN_INTENSITY = 0.35
"""Intensity at zero confidence: an uncertain emotion still moves a little, so the
portrait never freezes when the classifier hesitates between two labels."""

RGB = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class Palette:
    """A gradient map from shadows to highlights, plus the colour drawn on edges."""

    name: str
    stops: tuple[RGB, ...]
    """Colours from darkest to lightest luminance, at least two, 0..255 each."""
    edge: RGB
    """Colour of the Sobel edge overlay."""


@dataclass(frozen=True, slots=True)
class Mood:
    """How one emotion moves and is described."""

    words: str
    """Adjectives for the text prompt."""
    warp: str
    """Warp kind (one of ``WARP_KINDS``)."""
    warp_amount: float
    """Warp strength at full confidence and full runtime strength, 0..1."""
    speed: float
    """Animation speed relative to the generator's base ``animation_hz``."""
    auto_style: str
    """Look used when the runtime style is 'auto'."""
    auto_palette: Palette
    """Palette used when the runtime style is 'auto' (each emotion has its own)."""


@dataclass(frozen=True, slots=True)
class Look:
    """How one pinned style renders, whatever the emotion."""

    subject: str
    """Opening of the text prompt."""
    palette: Palette
    levels: int
    """Posterize levels of the luminance before the gradient map."""
    edges: float
    """Edge overlay strength at full intensity, 0..1."""
    keep_colour: float
    """Share of the (saturated, posterized) photo colours mixed into the palette, 0..1."""
    cycle: float
    """How far the palette slides along the gradient over one animation period."""
    vignette: float
    """Darkening of the corners, 0..1."""


@dataclass(frozen=True, slots=True)
class StylePrompt:
    """Everything the generator needs for one portrait; the result of ``style_prompt``."""

    name: str
    """'<style>/<emotion>', e.g. 'pop/happy'."""
    style: str
    emotion: str
    confidence: float
    intensity: float
    """How strongly the mood shows, from the confidence: MIN_INTENSITY..1."""
    text: str
    """Prompt for a text-to-image stage."""
    negative: str
    """Negative prompt for a text-to-image stage."""
    palette: Palette
    levels: int
    edges: float
    keep_colour: float
    cycle: float
    vignette: float
    warp: str
    warp_amount: float
    """Already scaled by intensity; the generator multiplies by the runtime strength."""
    speed: float


def _palette(name: str, edge: RGB, *stops: RGB) -> Palette:
    return Palette(name=name, stops=stops, edge=edge)


NEGATIVE = "blurry, deformed face, extra limbs, text, watermark, lowres"

LOOKS: dict[str, Look] = {
    "neon": Look(
        subject="surreal neon portrait, glowing rim light, synthwave",
        palette=_palette("neon", (40, 255, 255), (8, 0, 24), (70, 0, 140), (255, 20, 170), (40, 230, 255),
                         (250, 250, 255)),
        levels=6, edges=0.9, keep_colour=0.0, cycle=0.35, vignette=0.35),
    "ink": Look(
        subject="ink wash portrait, sumi-e brush strokes on rice paper",
        palette=_palette("ink", (15, 12, 10), (20, 18, 22), (90, 82, 78), (190, 178, 160), (245, 238, 220)),
        levels=4, edges=1.0, keep_colour=0.0, cycle=0.0, vignette=0.15),
    "pop": Look(
        subject="pop art portrait, bold flat colours, screen print, halftone",
        palette=_palette("pop", (10, 10, 30), (20, 30, 110), (230, 30, 60), (255, 210, 0), (255, 170, 210)),
        levels=4, edges=0.7, keep_colour=0.3, cycle=0.2, vignette=0.0),
    "noir": Look(
        subject="film noir portrait, hard shadows, venetian blind light, grain",
        palette=_palette("noir", (0, 0, 0), (0, 0, 0), (60, 60, 64), (150, 150, 150), (255, 255, 250)),
        levels=5, edges=0.5, keep_colour=0.0, cycle=0.0, vignette=0.6),
    "aurora": Look(
        subject="ethereal aurora portrait, northern lights, soft iridescent glow",
        palette=_palette("aurora", (200, 255, 230), (5, 10, 40), (0, 110, 120), (60, 220, 140), (170, 110, 255),
                         (255, 210, 240)),
        levels=8, edges=0.4, keep_colour=0.15, cycle=0.3, vignette=0.3),
}

MOODS: dict[str, Mood] = {
    "angry": Mood(
        words="furious, clenched jaw, smouldering embers, red heat haze",
        warp="shiver", warp_amount=0.9, speed=1.6, auto_style="neon",
        auto_palette=_palette("ember", (255, 230, 80), (10, 0, 0), (120, 0, 10), (230, 40, 10), (255, 160, 0),
                              (255, 240, 170))),
    "disgust": Mood(
        words="repulsed, curled lip, sickly acid green, oily swirls",
        warp="swirl", warp_amount=0.7, speed=0.6, auto_style="ink",
        auto_palette=_palette("bile", (40, 10, 50), (25, 5, 35), (80, 60, 20), (130, 160, 30), (210, 240, 90))),
    "fear": Mood(
        words="frightened, wide eyes, cold blue shadows, trembling",
        warp="ripple", warp_amount=0.7, speed=1.3, auto_style="noir",
        auto_palette=_palette("abyss", (150, 230, 255), (0, 0, 8), (5, 20, 70), (30, 90, 160), (170, 220, 255))),
    "happy": Mood(
        words="joyful, radiant smile, warm sunburst, confetti",
        warp="wave", warp_amount=0.6, speed=0.9, auto_style="pop",
        auto_palette=_palette("sunburst", (255, 60, 140), (90, 0, 70), (240, 40, 120), (255, 150, 20),
                              (255, 230, 60), (255, 250, 220))),
    "sad": Mood(
        words="melancholic, downcast eyes, rain on glass, muted blue",
        warp="melt", warp_amount=0.8, speed=0.3, auto_style="ink",
        auto_palette=_palette("rain", (20, 30, 60), (10, 15, 35), (45, 60, 100), (110, 130, 165), (200, 210, 225))),
    "surprise": Mood(
        words="astonished, raised brows, electric sparks, burst of light",
        warp="bulge", warp_amount=1.0, speed=1.1, auto_style="neon",
        auto_palette=_palette("electric", (255, 255, 255), (20, 0, 60), (140, 0, 255), (255, 40, 200),
                              (0, 240, 255), (255, 255, 255))),
    "neutral": Mood(
        words="calm, serene gaze, gentle drifting light",
        warp="swirl", warp_amount=0.3, speed=0.4, auto_style="aurora",
        auto_palette=LOOKS["aurora"].palette),
}


def _intensity_word(intensity: float) -> str:
    if intensity < 0.55:
        return "subtle"
    if intensity < 0.85:
        return "expressive"
    return "intense"


def style_prompt(emotion: str, confidence: float, style: str = "auto") -> StylePrompt:
    """The style for one face: ``emotion`` a FER label (unknown labels read as neutral,
    so a new classifier label degrades gracefully), ``confidence`` its probability
    (clamped to 0..1), ``style`` the runtime setting ('auto' or a pinned style)."""
    if style not in LOOKS and style != "auto":
        raise ValueError(f"unknown style {style!r}; allowed: {', '.join(STYLES)}")
    label = emotion if emotion in MOODS else "neutral"
    mood = MOODS[label]
    confidence = min(1.0, max(0.0, float(confidence)))
    intensity = MIN_INTENSITY + (1.0 - MIN_INTENSITY) * confidence
    if style == "auto":
        look_name = mood.auto_style
        look = dataclasses.replace(LOOKS[look_name], palette=mood.auto_palette)
    else:
        look_name = style
        look = LOOKS[style]
    text = f"{look.subject}, {mood.words}, {_intensity_word(intensity)} expression, detailed face"
    return StylePrompt(
        name=f"{look_name}/{label}",
        style=look_name,
        emotion=label,
        confidence=confidence,
        intensity=intensity,
        text=text,
        negative=NEGATIVE,
        palette=look.palette,
        levels=look.levels,
        # Edges carry the drawing; keep most of them even for a hesitant emotion.
        edges=look.edges * (0.6 + 0.4 * intensity),
        keep_colour=look.keep_colour,
        cycle=look.cycle * intensity,
        vignette=look.vignette,
        warp=mood.warp,
        warp_amount=mood.warp_amount * intensity,
        # A hesitant mood also moves slower, so a flickering label does not strobe.
        speed=mood.speed * (0.5 + 0.5 * intensity),
    )
