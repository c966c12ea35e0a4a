"""Settings shared by every benchmark section (from ``launch/bench.py``'s arguments)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

SECTIONS = ("pipeline", "synthetic", "transport", "models", "diffusion", "gpu", "lipsync", "multihost")


@dataclass(kw_only=True, slots=True)
class BenchOptions:
    out_dir: Path
    """Results folder: JSON, Markdown, PNGs and the runs' logs go here."""
    quick: bool = False
    """Smoke run for CI (well under a minute in all): tiny sizes and durations; it proves
    the harness produces every figure, not that the figures are good."""
    sections: tuple[str, ...] = SECTIONS
    """Which sections run, in this order."""
    world_size: int = 3
    """Ranks of the distributed pipeline run (section 'pipeline')."""
    duration_s: float = 20.0
    """Seconds of input per pipeline run (fixed rate and as fast as possible each)."""
    fps: float = 20.0
    """Input rate of the fixed-rate pipeline runs."""
    rounds: int = 5
    """Interleaved rounds per transport measurement; the median is reported."""
    extra: dict = field(default_factory=dict)
    """Section-specific knobs from the command line (``--set key=value``), for experiments."""

    def __post_init__(self) -> None:
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown:
            raise ValueError(f"sections: unknown {unknown}; allowed: {', '.join(SECTIONS)}")
        if self.world_size < 2:
            raise ValueError(f"world_size: the distributed run needs >= 2 ranks, got {self.world_size}")
        for name in ("duration_s", "fps"):  # nan would slip past "> 0"; inf never ends a run
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a finite number > 0, got {value}")
        if self.rounds < 1:
            raise ValueError(f"rounds: must be >= 1, got {self.rounds}")
