"""Typed config from plain dicts: the one place YAML becomes dataclasses.

Every config section is a ``@dataclass(kw_only=True, slots=True)`` whose defaults live
on its fields. ``build(cls, data, path)`` turns a dict (from YAML or JSON) into that
dataclass, recursively, and rejects what does not fit with a ``ConfigError`` naming the
field's dotted path and what is allowed:

    pipeline.stages[1].replicas: expected an integer >= 1 or 'auto', got 'two'
    vision.detect_widht: unknown key; allowed: detect_every, detect_width, ...

Sections validate their own values in ``__post_init__`` by raising ``ConfigError``
through ``check`` / ``check_choice``; ``build`` prefixes those errors with the path.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from enum import Enum
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the field and the allowed values."""

    def __init__(self, message: str, path: str = "") -> None:
        self.path = path
        self.reason = message
        super().__init__(f"{path}: {message}" if path else message)

    def under(self, prefix: str) -> "ConfigError":
        """The same error, located under a parent field."""
        if not prefix:
            return self
        path = f"{prefix}.{self.path}" if self.path and not self.path.startswith("[") else f"{prefix}{self.path}"
        return ConfigError(self.reason, path)


def check(condition: bool, field_name: str, message: str) -> None:
    """Raise ``ConfigError`` for ``field_name`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message, field_name)


def check_range(value: float, field_name: str, low: float, high: float) -> None:
    """Raise ``ConfigError`` for ``field_name`` unless ``low <= value <= high``."""
    if not low <= value <= high:
        raise ConfigError(f"must be within {_number(low)}..{_number(high)}, got {_number(value)}", field_name)


def _number(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) and abs(x) < 1e6 else str(x)


def check_choice(value: Any, field_name: str, allowed: typing.Iterable[Any]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"got {value!r}; allowed: {', '.join(map(repr, allowed))}", field_name)


def build(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data`` (a mapping or None for all defaults)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of fields, got {type(data).__name__}", path)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ConfigError(f"unknown key; allowed: {', '.join(sorted(fields))}", where)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        field_path = f"{path}.{name}" if path else name
        kwargs[name] = _convert(hints[name], value, field_path)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.under(path) from None


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
        errors = []
        for option in get_args(tp):
            try:
                return _convert(option, value, path)
            except ConfigError as e:
                errors.append(e)
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
        items = [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {value!r}", path)
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_convert(key_tp, k, path): _convert(val_tp, v, f"{path}.{k}") for k, v in value.items()}
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
