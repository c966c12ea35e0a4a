"""The benchmark's command line: a real quick run of a cheap subset of sections end to end
(subprocess, results folder, stdout), every section wired in and loadable, and how the entry
point copes with sections that cannot be imported, raise, or are skipped (stand-in sections
written to a temporary folder and swapped into its section table).

Each section's own quick run, with its figures checked, is in tests/runtime/bench/
(test_<section>_bench.py); running ``--quick`` over every section here too would measure
them all a second time (~90 s on 2 cores) for nothing the section tests do not check.
"""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from launch import bench
from runtime.bench import runner
from runtime.bench.options import SECTIONS, BenchOptions

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLI_SECTIONS = ("transport", "gpu")
"""What the end-to-end run measures: 'transport' is the cheapest section with real rows and
plots (two ranks, ~7 s quick); 'gpu' is skipped for a reason on a machine without CUDA,
which the CLI must report without failing."""


def strict_json(path: Path) -> dict:
    def refuse(token):
        raise AssertionError(f"{path.name} is not valid JSON: {token}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def numbers_of(row: dict) -> list:
    return [v for v in row.values() if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))]


def test_every_section_is_wired_in_order_and_loads(tmp_path):
    assert list(runner.SECTION_MODULES) == list(SECTIONS)
    options = BenchOptions(out_dir=tmp_path, quick=True)
    for name in SECTIONS:
        loaded = runner.load(name, options)
        assert isinstance(loaded, tuple), f"{name}: {loaded.skipped}"
        module, steps = loaded
        assert callable(module.run) and steps >= 1, name


def test_quick_run_of_a_subset_writes_the_results_folder(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, str(REPO / "launch" / "bench.py"), "--quick", "--out", str(out),
                           "--sections", ",".join(CLI_SECTIONS)],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    document = strict_json(out / "results.json")
    sections = {s["name"]: s for s in document["sections"]}
    assert list(sections) == list(CLI_SECTIONS)
    for name, section in sections.items():
        if name == "gpu" and not torch.cuda.is_available():
            assert "no CUDA device" in section["skipped"]
            continue
        assert section["skipped"] is None and section["rows"], name
        for row in section["rows"]:
            figures = numbers_of(row)
            assert None not in figures, f"{name}: a figure is missing (NaN) in {row}"
            assert all(math.isfinite(v) and v >= 0 for v in figures) and any(v > 0 for v in figures), (name, row)
        assert section["plots"], f"{name} declares no plot"
        for plot in section["plots"]:
            assert (out / plot["file"]).read_bytes()[:8] == PNG_MAGIC, plot["file"]
    markdown = (out / "results.md").read_text(encoding="utf-8")
    assert markdown.startswith("# Mind Mirror benchmark") and "**Quick run**" in markdown
    assert markdown in done.stdout and f"Results: {out}" in done.stdout


STAND_INS = {
    "bench_stand_in_ok": """
        from runtime.bench.results import Column, PlotSpec, SectionResult, Target

        def steps(options):
            return 2

        def run(options, progress):
            progress.step("one")
            progress.step("two")
            return SectionResult(name="transport", title="Stand-in", columns=[Column(key="x", header="x")],
                                 rows=[{"x": "a", "y": 1.5}, {"x": "b", "y": 2.5}],
                                 targets=[Target(name="t", goal="> 1", measured="2.5", met=True)],
                                 plots=[PlotSpec(file="stand_in.png", title="Stand-in", x="x", y="y")])
    """,
    "bench_stand_in_raises": """
        def steps(options):
            return 3

        def run(options, progress):
            progress.step()
            raise RuntimeError("boom")
    """,
    "bench_stand_in_needs_package": """
        import no_such_package_for_the_bench

        def steps(options):
            return 1
    """,
    "bench_stand_in_needs_first_party": """
        import runtime.no_such_module_for_the_bench

        def steps(options):
            return 1
    """,
    "bench_stand_in_skips": """
        from runtime.bench.results import SectionResult

        def steps(options):
            return 1

        def run(options, progress):
            progress.step()
            return SectionResult(name="gpu", title="Skips", skipped="no CUDA device here")
    """,
}


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """Swap the section table for stand-in modules in tmp_path; returns a function taking
    {section name: stand-in module name}."""
    folder = tmp_path / "stand_ins"
    folder.mkdir()
    for module, source in STAND_INS.items():
        (folder / f"{module}.py").write_text(textwrap.dedent(source))
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.syspath_prepend(str(folder))
    return lambda table: monkeypatch.setattr(runner, "SECTION_MODULES", table)


def test_a_failing_section_is_recorded_the_others_still_run_and_the_exit_code_says_so(stand_ins, tmp_path, capsys):
    stand_ins({"pipeline": "bench_stand_in_raises", "synthetic": "bench_stand_in_needs_package",
               "transport": "bench_stand_in_ok", "gpu": "runtime.bench.no_such_section"})
    out = tmp_path / "out"
    # The four sections the stand-in table replaces ('models' has no stand-in).
    assert bench.main(["--quick", "--out", str(out), "--sections", "pipeline,synthetic,transport,gpu"]) == 1
    sections = {s["name"]: s for s in strict_json(out / "results.json")["sections"]}
    assert sections["pipeline"]["skipped"] == "failed: RuntimeError: boom"
    assert sections["synthetic"]["skipped"] == ("needs the 'no_such_package_for_the_bench' package: "
                                                "pip install -e '.[bench]'")
    assert sections["transport"]["skipped"] is None and sections["transport"]["details"]["wall_s"] >= 0
    assert sections["gpu"]["skipped"].startswith("failed: ModuleNotFoundError: No module named 'runtime.bench.no_such")
    log = (out / "bench.log").read_text()
    assert "section pipeline failed" in log and "Traceback" in log and "RuntimeError: boom" in log
    assert (out / "stand_in.png").read_bytes()[:8] == PNG_MAGIC
    captured = capsys.readouterr()
    assert "## Stand-in" in captured.out and f"Results: {out.resolve()}" in captured.out
    assert "pipeline failed: RuntimeError: boom" in captured.err
    assert "section(s) failed: pipeline, gpu" in captured.err


def test_a_missing_first_party_module_is_a_failure_not_a_missing_package(stand_ins, tmp_path):
    stand_ins({"pipeline": "bench_stand_in_needs_first_party"})
    result = runner.load("pipeline", bench.BenchOptions(out_dir=tmp_path))
    assert result.skipped == ("failed: ModuleNotFoundError: "
                              "No module named 'runtime.no_such_module_for_the_bench'")


def test_sections_skipped_for_a_reason_are_not_failures(stand_ins, tmp_path):
    stand_ins({"transport": "bench_stand_in_ok", "gpu": "bench_stand_in_skips"})
    out = tmp_path / "out"
    assert bench.main(["--sections", "transport,gpu", "--out", str(out), "--set", "messages=500",
                       "--set", "mode=fast", "--rounds", "2"]) == 0
    document = strict_json(out / "results.json")
    assert [s["name"] for s in document["sections"]] == ["transport", "gpu"]
    assert document["options"]["extra"] == {"messages": 500, "mode": "fast"} and document["options"]["rounds"] == 2
    assert "**Not measured**: no CUDA device here" in (out / "results.md").read_text()


@pytest.mark.parametrize("args, error", [
    (["--sections", "pipeline,nope"], "sections: unknown ['nope']"),
    (["--set", "no-equals-sign"], "--set 'no-equals-sign': expected KEY=VALUE"),
    (["--world-size", "1"], "world_size: the distributed run needs >= 2 ranks"),
    (["--fps", "nan"], "fps: must be a finite number > 0, got nan"),
    (["--duration", "inf"], "duration_s: must be a finite number > 0, got inf"),
    (["--duration", "0"], "duration_s: must be a finite number > 0, got 0.0"),
    (["--rounds", "0"], "rounds: must be >= 1, got 0"),
])
def test_bad_arguments_are_refused_with_the_reason(args, error, tmp_path, capsys):
    assert bench.main([*args, "--out", str(tmp_path / "out")]) == 2
    assert error in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
