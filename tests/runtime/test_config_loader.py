"""The generic YAML -> dataclass loader: types, unknown keys, error paths."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from core.config import ConfigError, build, check, to_dict


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


@dataclass(kw_only=True, slots=True)
class Ranged:
    low: int = 1
    high: int = 10

    def __post_init__(self) -> None:
        check(self.low >= 0, "low", f"must be >= 0, got {self.low}")
        if check(self.high >= 1, "high", f"must be >= 1, got {self.high}"):
            check(self.low <= self.high, "low", f"must not exceed high ({self.high}), got {self.low}")


@dataclass(kw_only=True, slots=True)
class Root:
    a: Ranged = field(default_factory=Ranged)
    b: Inner = field(default_factory=Inner)


def test_every_problem_is_reported_at_once_with_its_path():
    with pytest.raises(ConfigError) as info:
        build(Root, {"a": {"low": -1, "high": 0}, "b": {"size": 0, "mode": "medium", "colour": 1}, "c": 2})
    paths = [p.path for p in info.value.problems]
    assert sorted(paths) == ["a.high", "a.low", "b.colour", "b.mode", "b.size", "c"], paths
    text = str(info.value)
    assert text.startswith("6 problems:\n")
    assert "  b.mode: got 'medium'; allowed: 'fast', 'slow'" in text
    assert "  a.low: must be >= 0, got -1" in text


def test_a_check_that_depends_on_a_valid_value_is_skipped_when_it_is_not():
    # high < 1 is reported; "low must not exceed high" would only repeat it.
    with pytest.raises(ConfigError) as info:
        build(Ranged, {"low": 5, "high": 0})
    assert [str(p) for p in info.value.problems] == ["high: must be >= 1, got 0"]
    with pytest.raises(ConfigError, match=r"^low: must not exceed high \(3\), got 5$"):
        build(Ranged, {"low": 5, "high": 3})


def test_checks_outside_build_raise_at_the_first_problem():
    with pytest.raises(ConfigError, match=r"^low: must be >= 0, got -1$") as info:
        Ranged(low=-1, high=0)
    assert len(info.value.problems) == 1


def test_a_section_with_a_bad_type_still_reports_its_other_checks():
    with pytest.raises(ConfigError) as info:
        build(Ranged, {"low": "x", "high": 0})
    assert [p.path for p in info.value.problems] == ["low", "high"]
