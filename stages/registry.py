"""Stage kinds by the name configs use for them, filled by the stage modules themselves.

A stage module registers its class where it defines it::

    @register_stage
    class ToneStage(Stage):
        kind = "tone"
        ...

and nothing central lists the kinds. ``stage_class(kind)`` finds a kind

1. among the kinds registered so far (which includes every plugin the config names:
   ``pipeline.plugins`` lists module names or ``.py`` files, imported by
   ``load_plugins`` before the config's stage sections are read);
2. else in the built-in stage module of that name, imported on first use: kind
   ``vision`` is registered by importing ``stages.vision``;
3. else in any built-in stage package (``stages.lipsync`` registers ``speech``,
   ``lipsync``, ``composite`` and ``present``).

So a new pipeline is its stage files plus a YAML block that names them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path
from typing import TypeVar

import stages
from stages.base import Stage

StageClass = TypeVar("StageClass", bound=type[Stage])

_KINDS: dict[str, type[Stage]] = {}


class UnknownStageKind(LookupError):
    """No stage module registers this kind."""


def register_stage(cls: StageClass) -> StageClass:
    """Class decorator: make ``cls`` the stage of kind ``cls.kind``."""
    for attribute in ("kind", "Config", "accepts", "emits"):
        if not hasattr(cls, attribute):
            raise TypeError(f"stage class {cls.__qualname__} must set {attribute!r} to be registered")
    if not dataclasses.is_dataclass(cls.Config):
        raise TypeError(f"{cls.__qualname__}.Config must be a dataclass (its fields are the kind's config section)")
    known = _KINDS.get(cls.kind)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise TypeError(f"stage kind {cls.kind!r} is registered twice: by {known.__module__}.{known.__qualname__} "
                        f"and {cls.__module__}.{cls.__qualname__}")
    _KINDS[cls.kind] = cls
    return cls


def stage_class(kind: str) -> type[Stage]:
    """The class registered for ``kind``; ``UnknownStageKind`` names the kinds there are."""
    if kind not in _KINDS:
        _import_builtin(kind)
    if kind not in _KINDS:
        known_kinds()  # a package may register several kinds (stages.lipsync: speech, lipsync, ...)
    if kind not in _KINDS:
        raise UnknownStageKind(
            f"no stage module registers kind {kind!r}; known kinds: {', '.join(known_kinds())}. A stage "
            "outside stages/ is found when the config lists its module or .py file in pipeline.plugins")
    return _KINDS[kind]


def known_kinds() -> list[str]:
    """Every kind registered so far, after importing every built-in stage module."""
    for module in pkgutil.iter_modules(stages.__path__):
        _import_builtin(module.name)
    return sorted(_KINDS)


def load_plugins(entries: list[str], base_dir: Path | None = None) -> None:
    """Import each plugin so its stage classes register: a module name
    (``my_project.stages``) or a ``.py`` file (relative to ``base_dir``, usually the
    config file's folder). Raises ``ImportError`` naming the entry that failed."""
    for entry in entries:
        if entry.endswith(".py"):
            _import_file(Path(entry) if base_dir is None else base_dir / entry)
        else:
            try:
                importlib.import_module(entry)
            except ImportError as e:
                raise ImportError(f"cannot import plugin module {entry!r}: {e}") from e


def _import_builtin(name: str) -> None:
    try:
        importlib.import_module(f"{stages.__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{stages.__name__}.{name}":
            raise  # the module exists but needs something that is missing: say so


def _import_file(path: Path) -> None:
    path = path.resolve()
    if not path.is_file():
        raise ImportError(f"plugin file {str(path)!r} does not exist")
    # Named after the file and its folder, so two plugins called stages.py do not clash
    # (and neither shadows the ``stages`` package).
    name = f"mm_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ImportError(f"cannot import plugin file {str(path)!r}: {type(e).__name__}: {e}") from e
