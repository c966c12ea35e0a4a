"""Per-stage ``options``: fields of a kind's config section overridden for one stage alone."""

import pytest

from core.config import ConfigError, build, to_dict
from runtime.config import config_from_dict, load_config
from stages.registry import known_kinds, stage_class


def chain(*middle: dict) -> dict:
    return {"pipeline": {"stages": [{"name": "ingest", "placement": "server"}, *middle,
                                    {"name": "display", "placement": "server"}]}}


def test_each_stage_gets_its_section_with_its_own_options_applied():
    data = chain({"name": "fast", "kind": "synthetic", "options": {"cost_ms": 5}},
                 {"name": "slow", "kind": "synthetic", "options": {"cost_ms": 40, "mode": "busy"}},
                 {"name": "plain", "kind": "synthetic"})
    data["synthetic"] = {"cost_ms": 20, "iterations_per_ms": 1500}
    config = config_from_dict(data)
    fast, slow, plain = (config.stage_config(config.pipeline.stage(n)) for n in ("fast", "slow", "plain"))
    assert (fast.mode, fast.cost_ms, fast.iterations_per_ms) == ("sleep", 5.0, 1500.0)
    assert (slow.mode, slow.cost_ms, slow.iterations_per_ms) == ("busy", 40.0, 1500.0)
    section = config.kind_sections["synthetic"]
    assert plain is section  # no options: the section itself
    assert section.cost_ms == 20.0  # the section is left as it was


def test_options_work_for_the_mirror_stages_too():
    config = config_from_dict({"pipeline": {"stages": [
        {"name": "ingest", "placement": "server"},
        {"name": "vision", "options": {"detect_every": 5}},
        {"name": "generator"},
        {"name": "display", "placement": "server", "options": {"quality_override": 70}}]}})
    assert config.stage_config(config.pipeline.stage("vision")).detect_every == 5
    assert config.stage_config(config.pipeline.stage("display")).quality_override == 70


def test_every_stage_section_survives_a_round_trip_through_plain_data():
    """``options`` rebuild a section from its plain form, so every section must allow it."""
    kinds = known_kinds()
    assert {"ingest", "vision", "generator", "display", "synthetic"} <= set(kinds)
    for kind in kinds:
        section = build(stage_class(kind).Config, None)
        assert build(stage_class(kind).Config, to_dict(section)) == section


@pytest.mark.parametrize("options, match", [
    ({"cost": 5}, r"^pipeline\.stages\[1\]\.options\.cost: unknown key; allowed: cost_ms, iterations_per_ms, "
                  r"mode$"),
    ({"cost_ms": "fast"}, r"^pipeline\.stages\[1\]\.options\.cost_ms: expected a number, got 'fast'$"),
    ({"cost_ms": -2}, r"^pipeline\.stages\[1\]\.options\.cost_ms: must be within 0\.\.10000, got -2$"),
    ({"mode": "busy"}, r"^pipeline\.stages\[1\]\.options\.iterations_per_ms: mode 'busy' needs"),
])
def test_bad_options_name_the_stage_and_field(options, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(chain({"name": "s1", "kind": "synthetic", "options": options}))


def test_an_unknown_kind_is_reported_with_the_kinds_there_are():
    with pytest.raises(ConfigError, match=r"^pipeline\.stages\[1\]\.kind: no stage module registers kind 'warp'; "
                                          r"known kinds: .*generator.*synthetic.*vision.*pipeline\.plugins"):
        config_from_dict(chain({"name": "s1", "kind": "warp", "options": {"x": 1}}))


def test_a_top_level_key_must_be_a_section_or_a_stage_kind():
    config = config_from_dict({"synthetic": {"cost_ms": 3}})  # a kind the pipeline does not use
    assert config.kind_sections["synthetic"].cost_ms == 3.0
    with pytest.raises(ConfigError, match=r"^visoin: unknown key; allowed: pipeline, server, transport, control, "
                                          r"compute, flow, runtime, presets, or the section of a stage kind"):
        config_from_dict({"visoin": {"detect_every": 2}})


def test_options_load_from_a_yaml_file(tmp_path):
    path = tmp_path / "chain.yaml"
    path.write_text("pipeline:\n  stages:\n    - {name: ingest, placement: server}\n"
                    "    - {name: s1, kind: synthetic, replicas: 2, options: {cost_ms: 12.5}}\n"
                    "    - {name: display, placement: server}\n")
    config = load_config(path)
    assert config.stage_config(config.pipeline.stage("s1")).cost_ms == 12.5
