"""The results folder: ``results.json``, ``results.md`` and one PNG per ``PlotSpec``.

Every section is rendered the same way, from its ``SectionResult``: a Markdown table from
``columns``/``rows``, notes as bullets, its plots, its targets; a skipped section shows
why. A final table gathers every section's targets. ``json_text`` and ``markdown_text``
are pure (same input, same bytes) so tests can pin the output; ``write_report`` writes
the files.

Conventions shared by all sections:

- A missing value, None or NaN prints as '–' in tables and is ``null`` in the JSON (which
  must stay valid JSON: no NaN or Infinity). Strings print as they are, numbers through
  their column's ``fmt``.
- A plot uses the rows that have a number for its ``y`` (and, for a line plot, for its
  ``x``), so one section can keep differently shaped rows in one table and plot each kind.
- Rows that carry a ``part`` key (``PART``) are printed as one table per part, in order
  of first appearance, each titled by the part and showing only the columns its rows
  fill; a section whose rows have no ``part`` gets its one table as before.
- Plots are drawn on ``matplotlib.figure.Figure`` objects, which render through the Agg
  canvas without pyplot: no global figure state to close, no GUI backend involved.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from runtime.bench.machine import Machine
from runtime.bench.options import BenchOptions
from runtime.bench.results import Column, PlotSpec, SectionResult, Target, to_json

MISSING = "–"
PART = "part"
"""Row key that splits a section's table into titled parts (see the module docstring)."""
MET = {True: "✅", False: "❌", None: "–"}
PLOT_KINDS = ("bar", "line")


def write_report(machine: Machine, options: BenchOptions, results: list[SectionResult],
                 wall_s: float) -> list[Path]:
    """Write results.json, results.md and the plots of every section that ran into
    ``options.out_dir``; returns the paths written. The JSON goes first, so a plot that
    cannot be drawn never costs the figures."""
    out = options.out_dir
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md"]
    written[0].write_text(json_text(machine, options, results, wall_s), encoding="utf-8")
    written[1].write_text(markdown_text(machine, options, results, wall_s), encoding="utf-8")
    for result in results:
        if result.skipped is None:
            for spec in result.plots:
                path = out / _plot_file(result, spec)
                if path in written:
                    raise ValueError(f"section {result.name!r}: plot file {spec.file!r} is already used")
                draw_plot(spec, result.rows, path)
                written.append(path)
    return written


# ------------------------------------------------------------------------------ JSON

def json_text(machine: Machine, options: BenchOptions, results: list[SectionResult], wall_s: float) -> str:
    """results.json: the machine, the options, the wall time and every section in full."""
    settings = dataclasses.asdict(options)
    del settings["out_dir"]  # the file lives in it
    document = {"machine": dataclasses.asdict(machine), "options": settings, "wall_s": wall_s,
                "sections": [to_json(result) for result in results]}
    return json.dumps(json_safe(document), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as None, tuples as lists, numpy scalars as Python
    numbers and paths as strings; anything else JSON cannot hold raises TypeError."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"results.json cannot hold a {type(value).__name__}: {value!r}")


# -------------------------------------------------------------------------- Markdown

def markdown_text(machine: Machine, options: BenchOptions, results: list[SectionResult], wall_s: float) -> str:
    """results.md: header (date, commit, machine, settings), one part per section, then
    every target in one table."""
    parts = [_header(machine, options, wall_s)]
    parts += [section_markdown(result) for result in results]
    parts.append(_all_targets(results))
    return "\n\n".join(parts) + "\n"


def cell(value: Any, fmt: str = "{}") -> str:
    """One table cell: '–' for missing/None/NaN, strings as given, numbers through ``fmt``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    text = value if isinstance(value, str) else fmt.format(value)
    return text.replace("|", "\\|").replace("\n", " ")


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; cells must already be text (see ``cell``)."""
    lines = [_table_line(headers), _table_line(["---"] * len(headers))]
    lines += [_table_line(row) for row in rows]
    return "\n".join(lines)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _table_line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(machine: Machine, options: BenchOptions, wall_s: float) -> str:
    date = f"{machine.date_utc[:10]} {machine.date_utc[11:16]} UTC"
    changes = " with uncommitted changes" if machine.dirty else ""
    lines = ["# Mind Mirror benchmark", "",
             f"Run {date} at commit `{machine.commit}`{changes}; {wall_s:.1f} s in all."]
    if options.quick:
        lines.append("**Quick run** (`--quick`): tiny sizes and durations that prove every figure "
                     "is produced; do not quote these figures.")
    lines += ["", _machine_table(machine), "", _settings(options)]
    return "\n".join(lines)


def _machine_table(machine: Machine) -> str:
    cores = f"{machine.logical_cores} logical cores"
    if machine.usable_cores != machine.logical_cores:
        cores += f", {machine.usable_cores} usable by this process"
    build = f"CUDA {machine.cuda} build" if machine.cuda else "CPU-only build"
    gpus = ", ".join(machine.gpus) if machine.gpus else "none"
    if machine.gpu_driver:
        gpus += f"; driver {machine.gpu_driver}"
    rows = [["CPU", f"{machine.cpu} ({cores})"], ["memory", f"{machine.ram_gib:.1f} GiB"], ["OS", machine.os],
            ["Python", machine.python], ["torch", f"{machine.torch} ({build})"], ["GPUs", gpus]]
    return table(["machine", ""], [[cell(key), cell(value)] for key, value in rows])


def _settings(options: BenchOptions) -> str:
    text = (f"Options: sections {', '.join(options.sections)}; world_size {options.world_size}, duration_s "
            f"{options.duration_s:g}, fps {options.fps:g}, rounds {options.rounds}")
    if options.extra:
        text += "; " + ", ".join(f"`{key}={value}`" for key, value in options.extra.items())
    if options.quick:
        text += " (with `--quick` the sections use smaller sizes, stated in their notes)"
    return text + "."


def section_markdown(result: SectionResult) -> str:
    """One section as the report shows it: title, table, notes, plot links, targets."""
    parts = [f"## {result.title or result.name}"]
    if result.skipped is not None:
        parts.append(f"**Not measured**: {_one_line(result.skipped)}")
    elif result.columns:
        parts.append(_rows_table(result.columns, result.rows))
    if result.notes:
        parts.append("\n".join(f"- {note}" for note in result.notes))
    if result.skipped is None and result.plots:
        parts.append("\n".join(f"![{spec.title}]({_plot_file(result, spec)})" for spec in result.plots))
    if result.targets:
        parts.append("**Targets**\n\n" + _targets_table(result.targets))
    return "\n\n".join(parts)


def _rows_table(columns: list[Column], rows: list[dict[str, Any]]) -> str:
    if not any(PART in row for row in rows):
        return table([c.header for c in columns], [[cell(row.get(c.key), c.fmt) for c in columns] for row in rows])
    parts: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        parts.setdefault(row.get(PART), []).append(row)
    out = []
    for part, group in parts.items():
        cells = [[cell(row.get(c.key), c.fmt) for c in columns] for row in group]
        used = [i for i in range(len(columns)) if any(line[i] != MISSING for line in cells)]
        text = table([columns[i].header for i in used], [[line[i] for i in used] for line in cells])
        out.append(text if part is None else f"**{cell(part)}**\n\n{text}")
    return "\n\n".join(out)


def _targets_table(targets: list[Target]) -> str:
    return table(["target", "goal", "measured", "met"],
                 [[cell(t.name), cell(t.goal), cell(t.measured), MET[t.met]] for t in targets])


def _all_targets(results: list[SectionResult]) -> str:
    rows = [[cell(r.name), cell(t.name), cell(t.goal), cell(t.measured), MET[t.met]]
            for r in results for t in r.targets]
    parts = ["## Targets",
             table(["section", "target", "goal", "measured", "met"], rows) if rows else "No section measured a target."]
    skipped = [f"- {r.name}: {_one_line(r.skipped)}" for r in results if r.skipped is not None]
    if skipped:
        parts.append("Not measured:\n\n" + "\n".join(skipped))
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- plots

def draw_plot(spec: PlotSpec, rows: list[dict[str, Any]], path: Path) -> None:
    """Draw ``spec`` from ``rows`` into the PNG ``path``.

    bar: one group per distinct ``x`` (order of first appearance), one bar per ``series``
    value in each group. line: one line per ``series`` value, points sorted by ``x``.
    Without ``series`` there is a single group / line. A plot with no usable rows still
    gets a file, saying so, so every plot a section declares exists."""
    if spec.kind not in PLOT_KINDS:
        raise ValueError(f"plot {spec.file!r}: kind must be one of {PLOT_KINDS}, got {spec.kind!r}")
    points = [row for row in rows if _number(row.get(spec.y)) is not None and row.get(spec.x) is not None
              and (spec.kind == "bar" or _number(row.get(spec.x)) is not None)]
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in points:
        groups.setdefault(str(row.get(spec.series)) if spec.series else spec.y, []).append(row)

    figure = Figure(figsize=(7.5, 4.5), layout="constrained")
    axes = figure.subplots()
    if spec.kind == "bar":
        _bars(axes, spec, points, groups)
    else:
        _lines(axes, spec, groups)
    axes.set_title(spec.title)
    axes.set_xlabel(spec.x)
    axes.set_ylabel(spec.ylabel or spec.y)
    if spec.log_y and points:
        axes.set_yscale("log")
    if spec.series and points:
        axes.legend(title=spec.series)
    if not points:
        axes.text(0.5, 0.5, "no data in this run", transform=axes.transAxes, ha="center", va="center")
    axes.grid(axis="y", alpha=0.3)
    figure.savefig(path, dpi=110)


def _bars(axes, spec: PlotSpec, points: list[dict[str, Any]], groups: dict[str, list[dict[str, Any]]]) -> None:
    categories = list(dict.fromkeys(str(row[spec.x]) for row in points))
    width = 0.8 / max(1, len(groups))
    for i, (label, group) in enumerate(groups.items()):
        offset = (i - (len(groups) - 1) / 2) * width
        axes.bar([categories.index(str(row[spec.x])) + offset for row in group],
                 [_number(row[spec.y]) for row in group], width, label=label)
    axes.set_xticks(range(len(categories)), categories)


def _lines(axes, spec: PlotSpec, groups: dict[str, list[dict[str, Any]]]) -> None:
    for label, group in groups.items():
        group = sorted(group, key=lambda row: _number(row[spec.x]))
        axes.plot([_number(row[spec.x]) for row in group], [_number(row[spec.y]) for row in group],
                  marker="o", label=label)


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, NaN, infinite, not a number)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _plot_file(result: SectionResult, spec: PlotSpec) -> str:
    """``spec.file`` after checking it names a PNG inside the results folder."""
    name = spec.file
    if Path(name).name != name or not name.endswith(".png"):
        raise ValueError(f"section {result.name!r}: plot file must be a plain '.png' file name, got {name!r}")
    return name
