"""Per-stage ``options``: fields of a kind's config section overridden for one stage alone."""

import pytest

from runtime.config import MirrorConfig, load_config
from runtime.config_loader import ConfigError, build, to_dict
from runtime.registry import STAGE_KINDS


def chain(*middle: dict) -> dict:
    return {"pipeline": {"stages": [{"name": "ingest", "placement": "server"}, *middle,
                                    {"name": "display", "placement": "server"}]}}


def test_each_stage_gets_its_section_with_its_own_options_applied():
    data = chain({"name": "fast", "kind": "synthetic", "options": {"cost_ms": 5}},
                 {"name": "slow", "kind": "synthetic", "options": {"cost_ms": 40, "mode": "busy"}},
                 {"name": "plain", "kind": "synthetic"})
    data["synthetic"] = {"cost_ms": 20, "iterations_per_ms": 1500}
    config = build(MirrorConfig, data)
    fast, slow, plain = (config.stage_config(config.pipeline.stage(n)) for n in ("fast", "slow", "plain"))
    assert (fast.mode, fast.cost_ms, fast.iterations_per_ms) == ("sleep", 5.0, 1500.0)
    assert (slow.mode, slow.cost_ms, slow.iterations_per_ms) == ("busy", 40.0, 1500.0)
    assert plain is config.synthetic  # no options: the section itself
    assert config.synthetic.cost_ms == 20.0  # the section is left as it was


def test_options_work_for_the_mirror_stages_too():
    config = build(MirrorConfig, {"pipeline": {"stages": [
        {"name": "ingest", "placement": "server"},
        {"name": "vision", "options": {"detect_every": 5}},
        {"name": "generator"},
        {"name": "display", "placement": "server", "options": {"quality_override": 70}}]}})
    assert config.stage_config(config.pipeline.stage("vision")).detect_every == 5
    assert config.stage_config(config.pipeline.stage("display")).quality_override == 70


def test_every_stage_section_survives_a_round_trip_through_plain_data():
    """``options`` rebuild a section from its plain form, so every section must allow it."""
    config = MirrorConfig()
    for kind, stage_class in STAGE_KINDS.items():
        section = getattr(config, kind)
        assert isinstance(section, stage_class.Config)
        assert build(stage_class.Config, to_dict(section)) == section


@pytest.mark.parametrize("options, match", [
    ({"cost": 5}, r"^pipeline\.stages\[1\]\.options\.cost: unknown key; allowed: cost_ms, iterations_per_ms, "
                  r"mode$"),
    ({"cost_ms": "fast"}, r"^pipeline\.stages\[1\]\.options\.cost_ms: expected a number, got 'fast'$"),
    ({"cost_ms": -2}, r"^pipeline\.stages\[1\]\.options\.cost_ms: must be within 0\.\.10000, got -2$"),
    ({"mode": "busy"}, r"^pipeline\.stages\[1\]\.options\.iterations_per_ms: mode 'busy' needs"),
])
def test_bad_options_name_the_stage_and_field(options, match):
    with pytest.raises(ConfigError, match=match):
        build(MirrorConfig, chain({"name": "s1", "kind": "synthetic", "options": options}))


def test_options_of_an_unknown_kind_report_the_kind():
    with pytest.raises(ConfigError, match=r"^pipeline\.stages\[1\]\.kind: got 'warp'"):
        build(MirrorConfig, chain({"name": "s1", "kind": "warp", "options": {"x": 1}}))


def test_options_load_from_a_yaml_file(tmp_path):
    path = tmp_path / "chain.yaml"
    path.write_text("pipeline:\n  stages:\n    - {name: ingest, placement: server}\n"
                    "    - {name: s1, kind: synthetic, replicas: 2, options: {cost_ms: 12.5}}\n"
                    "    - {name: display, placement: server}\n")
    config = load_config(path)
    assert config.stage_config(config.pipeline.stage("s1")).cost_ms == 12.5
