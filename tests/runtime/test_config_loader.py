"""The generic YAML -> dataclass loader: types, unknown keys, error paths."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from runtime.config_loader import ConfigError, build, check, to_dict


@dataclass(kw_only=True, slots=True)
class Inner:
    size: int = 4
    mode: Literal["fast", "slow"] = "fast"
    ratio: float = 0.5
    count: int | Literal["auto"] = 1

    def __post_init__(self) -> None:
        check(self.size > 0, "size", f"must be > 0, got {self.size}")


@dataclass(kw_only=True, slots=True)
class Outer:
    name: str = "x"
    enabled: bool = True
    inner: Inner = field(default_factory=Inner)
    items: list[Inner] = field(default_factory=list)
    tags: dict[str, int] = field(default_factory=dict)
    nodes: list[int] | None = None


def test_defaults_and_nested_values():
    cfg = build(Outer, {"inner": {"size": 8, "ratio": 1}, "items": [{"count": "auto"}], "nodes": [0, 1]})
    assert cfg.inner.size == 8 and cfg.inner.ratio == 1.0 and isinstance(cfg.inner.ratio, float)
    assert cfg.items[0].count == "auto" and cfg.nodes == [0, 1]
    assert build(Outer, None) == Outer()


def test_round_trip_through_plain_data():
    cfg = build(Outer, {"items": [{"size": 2, "mode": "slow"}], "tags": {"a": 1}})
    assert build(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize("data, match", [
    ({"inner": {"sise": 1}}, r"^inner\.sise: unknown key; allowed: count, mode, ratio, size$"),
    ({"inner": {"size": 0}}, r"^inner\.size: must be > 0, got 0$"),
    ({"items": [{}, {"mode": "medium"}]}, r"^items\[1\]\.mode: got 'medium'; allowed: 'fast', 'slow'$"),
    ({"enabled": "yes"}, r"^enabled: expected true or false, got 'yes'$"),
    ({"inner": {"size": 1.5}}, r"^inner\.size: expected an integer, got 1\.5$"),
    ({"inner": {"count": "many"}}, r"^inner\.count: expected int or one of 'auto', got 'many'$"),
    ({"inner": 3}, r"^inner: expected a mapping of fields, got int$"),
    ({"tags": {"a": "b"}}, r"^tags\.a: expected an integer"),
    ({"nodes": "0"}, r"^nodes: expected a list of int or null"),
])
def test_errors_name_the_field_and_what_is_allowed(data, match):
    with pytest.raises(ConfigError, match=match):
        build(Outer, data)


def test_bool_is_not_an_integer():
    with pytest.raises(ConfigError, match="inner.size: expected an integer, got True"):
        build(Outer, {"inner": {"size": True}})
