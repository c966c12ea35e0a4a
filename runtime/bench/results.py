"""What every benchmark section returns: rows of figures, targets met or not, plot specs.

Sections fill these plain dataclasses; ``report`` renders them all the same way (one
Markdown table per section, one PNG per ``PlotSpec``) and ``to_json`` stores them.
Rows are flat dicts of numbers and strings so the JSON stays easy to load elsewhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True, slots=True)
class Column:
    key: str
    """Row key shown in this column."""
    header: str
    """Column title in the Markdown table (units included, e.g. 'p50 ms')."""
    fmt: str = "{}"
    """``str.format`` pattern for the value; missing values print as '–'."""


@dataclass(kw_only=True, slots=True)
class Target:
    """One goal from the benchmark issue and whether this run met it."""

    name: str
    """What is compared, e.g. 'channel / raw throughput at 1.2 MB'."""
    goal: str
    """The bar, e.g. '>= 0.9x'."""
    measured: str
    """The figure this run got, with units, e.g. '0.94x (2410 vs 2560 MB/s)'."""
    met: bool | None
    """None when it could not be measured in this run (say why in ``measured``)."""


@dataclass(kw_only=True, slots=True)
class PlotSpec:
    """A chart ``report`` draws from a section's rows."""

    file: str
    """PNG file name inside the results folder."""
    title: str
    x: str
    """Row key on the x axis (categories for 'bar', numbers for 'line')."""
    y: str
    """Row key plotted."""
    series: str | None = None
    """Row key that splits rows into one bar group / line per value."""
    kind: str = "bar"
    """'bar' or 'line'."""
    ylabel: str = ""
    log_y: bool = False


@dataclass(kw_only=True, slots=True)
class SectionResult:
    name: str
    """Short id: 'pipeline', 'synthetic', 'transport', 'models', 'gpu'."""
    title: str
    columns: list[Column] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Facts a reader needs: setup, what was skipped and why, caveats."""
    plots: list[PlotSpec] = field(default_factory=list)
    skipped: str | None = None
    """Why the whole section did not run (e.g. no CUDA device); None when it ran."""
    details: dict[str, Any] = field(default_factory=dict)
    """Raw data kept in the JSON only (per-run samples, per-stage breakdowns)."""


def to_json(result: SectionResult) -> dict[str, Any]:
    return dataclasses.asdict(result)
