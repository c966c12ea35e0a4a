"""The results folder: Markdown pinned byte for byte, valid JSON without NaN, real PNGs."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from runtime.bench.machine import Machine
from runtime.bench.options import BenchOptions
from runtime.bench.report import cell, draw_plot, json_safe, json_text, markdown_text, write_report
from runtime.bench.results import Column, PlotSpec, SectionResult, Target

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

MACHINE = Machine(date_utc="2026-11-23T14:03:12Z", cpu="AMD EPYC", logical_cores=2, usable_cores=2, ram_gib=7.5,
                  os="Debian GNU/Linux 12 (bookworm), Linux 6.1.0 x86_64", python="3.11.7", torch="2.13.0+cpu",
                  cuda=None, gpus=[], gpu_driver=None, commit="abc1234", dirty=True)


def options(out_dir: Path = Path("unused")) -> BenchOptions:
    return BenchOptions(out_dir=out_dir, quick=True, sections=("transport", "gpu"), extra={"messages": 50})


def results() -> list[SectionResult]:
    transport = SectionResult(
        name="transport", title="Transport: channel vs raw",
        columns=[Column(key="size", header="payload"), Column(key="mb_s", header="MB/s", fmt="{:.0f}"),
                 Column(key="p50_us", header="p50 µs", fmt="{:.1f}")],
        rows=[{"size": "32 KB", "mb_s": 812.4, "p50_us": 41.26},
              {"size": "1.2 MB", "mb_s": math.nan},
              {"size": "a|b", "mb_s": 2000, "p50_us": None}],
        targets=[Target(name="channel / raw at 1.2 MB", goal=">= 0.9x", measured="0.94x", met=True),
                 Target(name="channel / gRPC at 1.2 MB", goal=">= 2x", measured="1.5x", met=False),
                 Target(name="p50 at 32 KB", goal="<= 1.5x", measured="not measured: no run", met=None)],
        notes=["2 ranks on loopback.", "Median of 5 rounds."],
        plots=[PlotSpec(file="transport_mb_s.png", title="Throughput", x="size", y="mb_s")],
        details={"samples": [1.0, math.nan]})
    gpu = SectionResult(name="gpu", title="GPU", skipped="no CUDA device\non this machine",
                        plots=[PlotSpec(file="gpu.png", title="never drawn", x="a", y="b")])
    return [transport, gpu]


EXPECTED_MARKDOWN = """\
# Mind Mirror benchmark

Run 2026-11-23 14:03 UTC at commit `abc1234` with uncommitted changes; 12.3 s in all.
**Quick run** (`--quick`): tiny sizes and durations that prove every figure is produced; do not quote these figures.

| machine |  |
| --- | --- |
| CPU | AMD EPYC (2 logical cores) |
| memory | 7.5 GiB |
| OS | Debian GNU/Linux 12 (bookworm), Linux 6.1.0 x86_64 |
| Python | 3.11.7 |
| torch | 2.13.0+cpu (CPU-only build) |
| GPUs | none |

Options: sections transport, gpu; world_size 3, duration_s 20, fps 20, rounds 5; `messages=50` (with `--quick` the sections use smaller sizes, stated in their notes).

## Transport: channel vs raw

| payload | MB/s | p50 µs |
| --- | --- | --- |
| 32 KB | 812 | 41.3 |
| 1.2 MB | – | – |
| a\\|b | 2000 | – |

- 2 ranks on loopback.
- Median of 5 rounds.

![Throughput](transport_mb_s.png)

**Targets**

| target | goal | measured | met |
| --- | --- | --- | --- |
| channel / raw at 1.2 MB | >= 0.9x | 0.94x | ✅ |
| channel / gRPC at 1.2 MB | >= 2x | 1.5x | ❌ |
| p50 at 32 KB | <= 1.5x | not measured: no run | – |

## GPU

**Not measured**: no CUDA device on this machine

## Targets

| section | target | goal | measured | met |
| --- | --- | --- | --- | --- |
| transport | channel / raw at 1.2 MB | >= 0.9x | 0.94x | ✅ |
| transport | channel / gRPC at 1.2 MB | >= 2x | 1.5x | ❌ |
| transport | p50 at 32 KB | <= 1.5x | not measured: no run | – |

Not measured:

- gpu: no CUDA device on this machine
"""


def test_markdown_is_pinned_byte_for_byte():
    assert markdown_text(MACHINE, options(), results(), 12.34) == EXPECTED_MARKDOWN


def test_markdown_names_gpus_and_a_clean_commit():
    machine = dataclasses.replace(MACHINE, dirty=False, usable_cores=1, cuda="12.6",
                                  gpus=["NVIDIA H100 80GB HBM3 (79.2 GiB)"], gpu_driver="550.54")
    text = markdown_text(machine, BenchOptions(out_dir=Path("x")), [], 1.0)
    assert "at commit `abc1234`; 1.0 s in all.\n\n| machine" in text  # no quick-run warning either
    assert "| CPU | AMD EPYC (2 logical cores, 1 usable by this process) |" in text
    assert "| torch | 2.13.0+cpu (CUDA 12.6 build) |" in text
    assert "| GPUs | NVIDIA H100 80GB HBM3 (79.2 GiB); driver 550.54 |" in text
    assert text.endswith("## Targets\n\nNo section measured a target.\n")


def test_json_is_valid_with_nan_as_null_and_keeps_everything():
    text = json_text(MACHINE, options(), results(), 12.34)

    def refuse(token):
        raise AssertionError(f"not valid JSON: {token}")

    document = json.loads(text, parse_constant=refuse)
    assert document["machine"]["commit"] == "abc1234" and document["wall_s"] == 12.34
    assert document["options"] == {"quick": True, "sections": ["transport", "gpu"], "world_size": 3,
                                   "duration_s": 20.0, "fps": 20.0, "rounds": 5, "extra": {"messages": 50}}
    transport, gpu = document["sections"]
    assert transport["rows"][1] == {"size": "1.2 MB", "mb_s": None}
    assert transport["details"]["samples"] == [1.0, None]
    assert transport["targets"][2]["met"] is None and transport["plots"][0]["file"] == "transport_mb_s.png"
    assert gpu["skipped"] == "no CUDA device\non this machine" and gpu["rows"] == []


def test_json_safe_converts_numpy_infinities_tuples_and_paths_and_refuses_the_rest():
    assert json_safe({1: (np.float32(0.5), np.int64(3), math.inf, -math.inf, Path("a/b"), True)}) == \
        {"1": [0.5, 3, None, None, "a/b", True]}
    with pytest.raises(TypeError, match="cannot hold a object"):
        json_safe({"x": object()})


def test_cells():
    assert [cell(None), cell(math.nan), cell("n/a"), cell(3.14159, "{:.2f}"), cell(2, "{:.1f}x")] == \
        ["–", "–", "n/a", "3.14", "2.0x"]
    assert cell("two\nlines | here") == "two lines \\| here"


def test_write_report_writes_json_markdown_and_a_png_per_plot_of_sections_that_ran(tmp_path):
    rows = [{"x": "a", "n": 1, "v": 1.0, "s": "one"}, {"x": "a", "n": 2, "v": 2.0, "s": "two"},
            {"x": "b", "n": 3, "v": 3.0, "s": "one"}, {"x": "b", "n": 4, "v": math.nan, "s": "two"},
            {"x": "c", "n": 5, "s": "one"}]
    ran = SectionResult(name="ran", title="Ran", rows=rows, plots=[
        PlotSpec(file="bars.png", title="Bars", x="x", y="v", series="s", ylabel="value", log_y=True),
        PlotSpec(file="lines.png", title="Lines", x="n", y="v", series="s", kind="line"),
        PlotSpec(file="single.png", title="One series", x="x", y="v")])
    written = write_report(MACHINE, options(tmp_path / "out"), [ran, *results()[1:]], 3.0)
    out = tmp_path / "out"
    assert [p.name for p in written] == ["results.json", "results.md", "bars.png", "lines.png", "single.png"]
    for name in ("bars.png", "lines.png", "single.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert not (out / "gpu.png").exists()  # the skipped section's plot
    assert json.loads((out / "results.json").read_text())["sections"][1]["name"] == "gpu"
    assert "![Bars](bars.png)" in (out / "results.md").read_text()


def test_a_plot_without_data_still_gets_its_file(tmp_path):
    draw_plot(PlotSpec(file="empty.png", title="Empty", x="x", y="y", kind="line"),
              [{"x": "not a number", "y": 1.0}, {"x": 1, "y": None}], tmp_path / "empty.png")
    assert (tmp_path / "empty.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("plots, error", [
    ([PlotSpec(file="p.png", title="t", x="x", y="y", kind="pie")], "kind must be one of"),
    ([PlotSpec(file="../p.png", title="t", x="x", y="y")], "plain '.png' file name"),
    ([PlotSpec(file="p.png", title="t", x="x", y="y"), PlotSpec(file="p.png", title="u", x="x", y="y")],
     "already used"),
])
def test_bad_plot_specs_are_refused_after_the_figures_are_saved(tmp_path, plots, error):
    section = SectionResult(name="s", title="S", rows=[{"x": "a", "y": 1.0}], plots=plots)
    with pytest.raises(ValueError, match=error):
        write_report(MACHINE, options(tmp_path), [section], 1.0)
    assert json.loads((tmp_path / "results.json").read_text())["sections"][0]["name"] == "s"
