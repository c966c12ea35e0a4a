"""Benchmark Mind Mirror; write results.json, results.md and PNG plots into a results folder.

    python launch/bench.py                         # every section at full size
    python launch/bench.py --quick --out /tmp/b    # smoke run: proves every figure is produced
    python launch/bench.py --sections transport,gpu --rounds 9 --set messages=500
    python launch/bench.py --sections models,diffusion,gpu,lipsync   # the GPU script, on a CUDA host

Sections (runtime/bench/, in this order): pipeline, synthetic, transport, models, diffusion,
gpu, lipsync, multihost (two network namespaces as hosts: needs root). A section that cannot be imported for lack of an optional third-party package is
skipped with the reason; one that fails to import otherwise (a first-party module missing included), or
raises, is recorded as failed (traceback in bench.log) and the others still run. Exit
code 1 when a section failed; a section skipped for a stated reason (e.g. no CUDA device)
is not a failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from runtime.bench.machine import describe
from runtime.bench.options import SECTIONS, BenchOptions
from runtime.bench.report import markdown_text, write_report
from runtime.bench.runner import FAILED, run_sections

DEFAULTS = {f.name: f.default for f in dataclasses.fields(BenchOptions)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run for CI: tiny sizes and durations")
    p.add_argument("--out", type=Path, help="results folder (default: bench-results/<UTC time>)")
    p.add_argument("--sections", help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--world-size", type=int,
                   help=f"ranks of the distributed pipeline run (default {DEFAULTS['world_size']})")
    p.add_argument("--duration", type=float, help=f"seconds per pipeline run (default {DEFAULTS['duration_s']:g})")
    p.add_argument("--fps", type=float, help=f"input rate of the fixed-rate runs (default {DEFAULTS['fps']:g})")
    p.add_argument("--rounds", type=int, help=f"rounds per transport figure (default {DEFAULTS['rounds']})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="section-specific knob (value read as JSON, else as text); repeatable")
    return p.parse_args(argv)


def options_from(args: argparse.Namespace) -> BenchOptions:
    """BenchOptions from the command line; ValueError says what is wrong."""
    given = {"world_size": args.world_size, "duration_s": args.duration, "fps": args.fps, "rounds": args.rounds}
    kwargs = {key: value for key, value in given.items() if value is not None}
    if args.sections is not None:
        kwargs["sections"] = tuple(name.strip() for name in args.sections.split(",") if name.strip())
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return BenchOptions(out_dir=args.out or Path("bench-results") / stamp, quick=args.quick,
                        extra=dict(parse_setting(text) for text in args.set), **kwargs)


def parse_setting(text: str) -> tuple[str, object]:
    """'messages=500' -> ('messages', 500); values that are not JSON stay text."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {text!r}: expected KEY=VALUE")
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw


def main(argv: list[str] | None = None) -> int:
    try:
        options = options_from(parse_args(argv))
    except ValueError as e:
        sys.stderr.write(f"bench: {e}\n")
        return 2
    options.out_dir.mkdir(parents=True, exist_ok=True)
    log_file = options.out_dir / "bench.log"
    handler = _log_to(log_file)
    try:
        machine = describe()
        started = time.monotonic()
        results = run_sections(options)
        wall_s = time.monotonic() - started
        write_report(machine, options, results, wall_s)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    sys.stdout.write(markdown_text(machine, options, results, wall_s))
    sys.stdout.write(f"\nResults: {options.out_dir.resolve()}\n")
    failed = [r.name for r in results if r.skipped and r.skipped.startswith(FAILED)]
    if failed:
        sys.stderr.write(f"bench: section(s) failed: {', '.join(failed)}; tracebacks in {log_file}\n")
    return 1 if failed else 0


def _log_to(path: Path) -> logging.Handler:
    """Send this process's log records (INFO and up) to ``path``; stderr keeps the progress bar."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(min(root.level, logging.INFO))
    return handler


if __name__ == "__main__":
    sys.exit(main())
