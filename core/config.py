"""Typed config from plain dicts: the one place YAML becomes dataclasses.

Every config section is a ``@dataclass(kw_only=True, slots=True)`` whose defaults live
on its fields. ``build(cls, data, path)`` turns a dict (from YAML or JSON) into that
dataclass, recursively, and rejects what does not fit with a ``ConfigError`` naming the
field's dotted path and what is allowed:

    pipeline.stages[1].replicas: expected an integer >= 1 or 'auto', got 'two'
    vision.detect_evrey: unknown key; allowed: box_smoothing, cut_threshold, detect_every, ...

Sections validate their own values in ``__post_init__`` with ``check`` /
``check_range`` / ``check_choice``. Called directly, a failed check raises at once.
Inside ``build`` the checks are collected instead, so one ``ConfigError`` reports every
problem of a file together (unknown keys, wrong types, values out of range), each
prefixed with its path.
"""

from __future__ import annotations

import contextvars
import dataclasses
import types
import typing
from contextlib import contextmanager
from enum import Enum
from typing import Any, Iterator, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class Problem:
    """One config value that cannot be used: where it is and why."""

    path: str
    reason: str

    def under(self, prefix: str) -> "Problem":
        """The same problem, located under a parent field."""
        if not prefix:
            return self
        if not self.path:
            return Problem(prefix, self.reason)
        joined = f"{prefix}{self.path}" if self.path.startswith("[") else f"{prefix}.{self.path}"
        return Problem(joined, self.reason)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


class ConfigError(ValueError):
    """Config values that cannot be used; each problem names its field and what is allowed."""

    def __init__(self, message: str = "", path: str = "", *, problems: list[Problem] | None = None) -> None:
        self.problems = list(problems) if problems else [Problem(path, message)]
        super().__init__(_describe_problems(self.problems))

    @property
    def path(self) -> str:
        """The first problem's field."""
        return self.problems[0].path

    @property
    def reason(self) -> str:
        """The first problem's explanation."""
        return self.problems[0].reason

    def under(self, prefix: str) -> "ConfigError":
        """The same error, every problem located under a parent field."""
        return ConfigError(problems=[p.under(prefix) for p in self.problems])


def _describe_problems(problems: list[Problem]) -> str:
    if len(problems) == 1:
        return str(problems[0])
    return f"{len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems)


_collector: contextvars.ContextVar[list[Problem] | None] = contextvars.ContextVar("config_problems", default=None)


@contextmanager
def collecting() -> Iterator[list[Problem]]:
    """Within this block failed checks are appended to the yielded list instead of raising."""
    found: list[Problem] = []
    token = _collector.set(found)
    try:
        yield found
    finally:
        _collector.reset(token)


def report(field_name: str, message: str) -> None:
    """A problem with ``field_name``: raised, or collected while ``build`` runs."""
    found = _collector.get()
    if found is None:
        raise ConfigError(message, field_name)
    found.append(Problem(field_name, message))


def check(condition: bool, field_name: str, message: str) -> bool:
    """Report ``message`` for ``field_name`` unless ``condition`` holds; returns ``condition``
    so a later check that only makes sense on a valid value can be skipped."""
    if not condition:
        report(field_name, message)
    return bool(condition)


def check_range(value: float, field_name: str, low: float, high: float) -> bool:
    """Report a problem for ``field_name`` unless ``low <= value <= high``."""
    return check(low <= value <= high, field_name,
                 f"must be within {_number(low)}..{_number(high)}, got {_number(value)}")


def _number(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) and abs(x) < 1e6 else str(x)


def check_choice(value: Any, field_name: str, allowed: typing.Iterable[Any]) -> bool:
    allowed = list(allowed)
    return check(value in allowed, field_name, f"got {value!r}; allowed: {', '.join(map(repr, allowed))}")


def build(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data`` (a mapping, or None for all defaults).

    Raises one ``ConfigError`` listing every problem found: unknown keys, values of the
    wrong type, and what the section's own checks refuse."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of fields, got {type(data).__name__}", path)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    problems = [Problem(_join(path, str(key)), f"unknown key; allowed: {', '.join(sorted(fields))}")
                for key in data if key not in fields]
    hints = typing.get_type_hints(cls)
    kwargs, bad = {}, set()
    for name, value in data.items():
        if name not in fields:
            continue
        try:
            kwargs[name] = _convert(hints[name], value, _join(path, name))
        except ConfigError as e:
            problems += e.problems
            bad.add(name)
    # The section's own checks run on what converted (defaults stand in for the rest), so a
    # file with a typo in one field still hears about an out-of-range value in another.
    with collecting() as found:
        try:
            built = cls(**kwargs)
        except ConfigError as e:  # raised outside a check, e.g. by a nested ``build``
            found += e.problems
        except (TypeError, ValueError):
            if not found and not problems:
                raise
    problems += [p.under(path) for p in found if p.path.split(".")[0].split("[")[0] not in bad]
    if problems:
        raise ConfigError(problems=problems)
    return built


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if isinstance(tp, type) and issubclass(tp, Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        return f"a list of {_describe(get_args(tp)[0])}" if get_args(tp) else "a list"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _convert(option, value, path)
            except ConfigError:
                continue
        raise ConfigError(f"expected {_describe(tp)}, got {value!r}", path)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"expected null, got {value!r}", path)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"got {value!r}; allowed: {', '.join(repr(a) for a in get_args(tp))}", path)
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"got {value!r}; allowed: {', '.join(repr(m.value) for m in tp)}", path) from None
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"expected {_describe(tp)}, got {value!r}", path)
        (item_tp, *_) = get_args(tp) or (Any,)
        return _convert_all(origin, [(f"{path}[{i}]", item_tp, v) for i, v in enumerate(value)])
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {value!r}", path)
        key_tp, val_tp = get_args(tp) or (Any, Any)
        keys = [_convert(key_tp, k, path) for k in value]
        values = _convert_all(list, [(f"{path}.{k}", val_tp, v) for k, v in value.items()])
        return dict(zip(keys, values))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"expected true or false, got {value!r}", path)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"expected an integer, got {value!r}", path)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"expected a number, got {value!r}", path)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"expected a string, got {value!r}", path)
    raise ConfigError(f"unsupported field type {tp!r}", path)


def _convert_all(container: type, items: list[tuple[str, Any, Any]]) -> Any:
    """Convert every item, reporting the problems of all of them together."""
    out, problems = [], []
    for path, tp, value in items:
        try:
            out.append(_convert(tp, value, path))
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems=problems)
    return tuple(out) if container is tuple else out


def to_dict(obj: Any) -> Any:
    """The plain-data form of a config (what YAML or JSON would hold)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Enum):
        return obj.value
    return obj
