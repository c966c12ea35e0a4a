"""Running the benchmark's sections behind one progress bar, each isolated from the others.

A section is a module with ``steps(options) -> int`` and ``run(options, progress) ->
SectionResult``. One that cannot be imported for lack of an optional third-party package
is skipped with the reason; one that fails to import otherwise (a missing first-party
module is a bug, not a missing install), or raises, is recorded as failed (``skipped``
starts with ``FAILED``, traceback in the log) and the others still run.
"""

from __future__ import annotations

import importlib
import logging
import time

from runtime.bench.options import BenchOptions
from runtime.bench.progress import Progress
from runtime.bench.results import SectionResult

log = logging.getLogger("bench")

SECTION_MODULES = {
    "pipeline": "runtime.bench.pipeline",
    "synthetic": "runtime.bench.synthetic",
    "transport": "runtime.bench.transport",
    "models": "runtime.bench.models",
    "diffusion": "runtime.bench.diffusion",
    "gpu": "runtime.bench.gpu",
    "lipsync": "runtime.bench.lipsync",
    "multihost": "runtime.bench.multihost",
}
FAILED = "failed: "
"""Prefix of ``SectionResult.skipped`` for a section that broke (versus one skipped for a reason)."""
FIRST_PARTY = frozenset({"runtime", "comms", "stages", "launch"})
"""Top-level packages of this repository: one of their modules missing is never fixed by a pip install."""


def load(name: str, options: BenchOptions):
    """(module, its step count), or the SectionResult saying why the section cannot run."""
    path = SECTION_MODULES[name]
    try:
        module = importlib.import_module(path)
        return module, module.steps(options)
    except ModuleNotFoundError as e:
        if _is_optional_package(e.name, path):
            return SectionResult(name=name, title=name, skipped=f"needs the '{e.name}' package: "
                                 "pip install -e '.[bench]'")
        return _failed(name, e)
    except Exception as e:
        return _failed(name, e)


def _is_optional_package(missing: str | None, path: str) -> bool:
    """Whether the module that could not be found is a third-party package the section needs,
    as opposed to the section itself (or one of its parents) or first-party code."""
    if not missing or missing == path or path.startswith(missing + "."):
        return False
    return missing.partition(".")[0] not in FIRST_PARTY


def run_section(name: str, module, options: BenchOptions, progress: Progress) -> SectionResult:
    """``module.run``'s result, or a failed one; the section's wall time goes into its details."""
    started = time.monotonic()
    try:
        result = module.run(options, progress)
        if not isinstance(result, SectionResult) or result.name != name:
            raise TypeError(f"{module.__name__}.run must return a SectionResult named {name!r}, got "
                            f"{type(result).__name__} {getattr(result, 'name', '')!r}")
    except Exception as e:
        progress.note(f"{name} failed: {type(e).__name__}: {e} (traceback in bench.log)")
        result = _failed(name, e)
    result.details.setdefault("wall_s", time.monotonic() - started)
    return result


def _failed(name: str, error: Exception) -> SectionResult:
    log.error("section %s failed", name, exc_info=error)
    return SectionResult(name=name, title=name, skipped=f"{FAILED}{type(error).__name__}: {error}")


def run_sections(options: BenchOptions) -> list[SectionResult]:
    """Every section of ``options.sections`` in order, behind one progress bar."""
    loaded = {name: load(name, options) for name in options.sections}
    progress = Progress(sum(entry[1] for entry in loaded.values() if isinstance(entry, tuple)))
    results, planned = [], 0
    for name, entry in loaded.items():
        if isinstance(entry, SectionResult):
            results.append(entry)
            continue
        module, steps = entry
        results.append(run_section(name, module, options, progress))
        planned += steps
        progress.done = max(progress.done, planned)  # a section that stopped early leaves its steps
    progress.close()
    return results


