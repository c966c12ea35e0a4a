"""The pipeline section: building from plain dicts and the generic rules it enforces."""

import pytest

from core.config import ConfigError, build, to_dict
from runtime.pipeline_config import PipelineConfig, StageSpec


def stages(*specs: dict) -> dict:
    return {"stages": list(specs)}


def test_defaults_are_the_mirror_chain():
    config = build(PipelineConfig, None)
    assert config.name == "mirror"
    assert [s.name for s in config.stages] == ["ingest", "vision", "generator", "display"]
    assert [s.placement for s in config.stages] == ["server", "worker", "worker", "server"]
    assert config.stage("generator").replicas == "auto"
    assert config.share_server_rank is False


def test_stage_defaults_and_kind_follows_name():
    spec = build(StageSpec, {"name": "vision"})
    assert (spec.kind, spec.replicas, spec.placement, spec.device) == ("vision", 1, "worker", "auto")
    assert (spec.max_batch, spec.batch_wait_ms, spec.routing) == (1, 0.0, "round_robin")
    assert spec.nodes is None and spec.ranks is None
    assert build(StageSpec, {"name": "gen-a", "kind": "generator"}).kind == "generator"


def test_full_stage_round_trips_through_to_dict():
    data = stages({"name": "ingest", "placement": "server"},
                  {"name": "generator", "kind": "generator", "replicas": "auto", "nodes": [0, 1],
                   "device": "cuda", "max_batch": 8, "batch_wait_ms": 4, "routing": "least_loaded"})
    config = build(PipelineConfig, data)
    assert config.stages[1].batch_wait_ms == 4.0
    assert build(PipelineConfig, to_dict(config)) == config


def test_unknown_key_names_field_and_allowed_keys():
    with pytest.raises(ConfigError, match=r"^pipeline\.stages\[0\]\.replica: unknown key; allowed: .*replicas"):
        build(PipelineConfig, stages({"name": "vision", "replica": 2}), "pipeline")
    with pytest.raises(ConfigError, match=r"^pipeline\.stage: unknown key; allowed: name, plugins, share_server_rank, stages"):
        build(PipelineConfig, {"stage": []}, "pipeline")


@pytest.mark.parametrize("value", ["two", 0, -1, "AUTO"])
def test_bad_replicas_value(value):
    with pytest.raises(ConfigError, match=r"^pipeline\.stages\[1\]\.replicas: expected an integer >= 1 or 'auto'"):
        build(PipelineConfig, stages({"name": "a"}, {"name": "b", "replicas": value}), "pipeline")


def test_replicas_rejects_booleans_and_floats():
    for value in (True, 1.5):
        with pytest.raises(ConfigError, match=r"stages\[0\]\.replicas"):
            build(PipelineConfig, stages({"name": "a", "replicas": value}))


def test_duplicate_names():
    with pytest.raises(ConfigError, match=r"^stages\[2\]\.name: duplicate stage name 'vision' \(also stages\[1\]\)"):
        build(PipelineConfig, stages({"name": "ingest"}, {"name": "vision"}, {"name": "vision"}))


def test_server_placement_needs_one_replica():
    with pytest.raises(ConfigError, match=r"stages\[0\]\.replicas: must be 1 for placement 'server'.*got 2"):
        build(PipelineConfig, stages({"name": "ingest", "placement": "server", "replicas": 2}))
    with pytest.raises(ConfigError, match=r"stages\[0\]\.replicas: must be 1 for placement 'server'"):
        build(PipelineConfig, stages({"name": "ingest", "placement": "server", "replicas": "auto"}))


def test_affinity_routing_only_from_the_server_rank():
    with pytest.raises(ConfigError, match=r"stages\[0\]\.routing: 'affinity' needs placement 'server'"):
        build(PipelineConfig, stages({"name": "speech", "routing": "affinity"}))
    build(PipelineConfig, stages({"name": "speech", "placement": "server", "routing": "affinity"}))


def test_server_placement_cannot_leave_rank_zero():
    with pytest.raises(ConfigError, match=r"stages\[0\]\.ranks: placement 'server' runs on rank 0"):
        build(PipelineConfig, stages({"name": "ingest", "placement": "server", "ranks": [1]}))
    with pytest.raises(ConfigError, match=r"stages\[0\]\.nodes: placement 'server' runs on rank 0"):
        build(PipelineConfig, stages({"name": "ingest", "placement": "server", "nodes": [1]}))


def test_at_least_one_stage():
    with pytest.raises(ConfigError, match=r"^stages: must list at least one stage"):
        build(PipelineConfig, {"stages": []})


@pytest.mark.parametrize("field, value, pattern", [
    ("name", "", r"name: must be a non-empty name"),
    ("name", "Vision", r"name: must be a non-empty name of a-z"),
    ("name", "a#b", r"name: must be a non-empty name"),
    ("kind", "gen erator", r"kind: must be a non-empty name"),
    ("placement", "gpu", r"placement: got 'gpu'; allowed: 'server', 'worker'"),
    ("device", "tpu", r"device: got 'tpu'; allowed: 'auto', 'cpu', 'cuda'"),
    ("routing", "random", r"routing: got 'random'; allowed: 'round_robin', 'least_loaded', 'session'"),
    ("max_batch", 0, r"max_batch: must be within 1\.\.64, got 0"),
    ("max_batch", 65, r"max_batch: must be within 1\.\.64, got 65"),
    ("batch_wait_ms", -1, r"batch_wait_ms: must be within 0\.\.1000"),
    ("nodes", [], r"nodes: must list at least one node index"),
    ("nodes", [0, -1], r"nodes\[1\]: must be a node index >= 0"),
    ("nodes", [1, 1], r"nodes: lists a node twice"),
    ("ranks", [1, 1], r"ranks: lists a rank twice"),
    ("ranks", [-2], r"ranks\[0\]: must be a rank >= 0"),
])
def test_stage_field_validation(field, value, pattern):
    data = {"name": "vision", field: value}
    if field == "ranks" and len(value) == 2:
        data["replicas"] = 2
    with pytest.raises(ConfigError, match=r"^pipeline\.stages\[0\]\." + pattern):
        build(PipelineConfig, stages(data), "pipeline")


def test_explicit_ranks_must_match_replicas():
    with pytest.raises(ConfigError, match=r"stages\[0\]\.ranks: has 2 entries but replicas is 1"):
        build(PipelineConfig, stages({"name": "vision", "ranks": [1, 2]}))
    with pytest.raises(ConfigError, match=r"stages\[0\]\.replicas: must be 2 \(the length of ranks\), not 'auto'"):
        build(PipelineConfig, stages({"name": "vision", "replicas": "auto", "ranks": [1, 2]}))
    assert build(PipelineConfig, stages({"name": "vision", "replicas": 2, "ranks": [1, 2]})).stages[0].ranks == [1, 2]


def test_bad_pipeline_name():
    with pytest.raises(ConfigError, match=r"^pipeline\.name: must be a non-empty name"):
        build(PipelineConfig, {"name": "my pipeline"}, "pipeline")


def test_stage_lookup():
    config = PipelineConfig()
    assert config.stage("vision").name == "vision"
    with pytest.raises(KeyError, match="no stage named 'audio'"):
        config.stage("audio")


def test_stage_options_default_empty_and_round_trip():
    assert build(StageSpec, {"name": "vision"}).options == {}
    config = build(PipelineConfig, stages({"name": "ingest", "placement": "server"},
                                          {"name": "s1", "kind": "synthetic", "options": {"cost_ms": 40}}))
    assert config.stages[1].options == {"cost_ms": 40}
    assert build(PipelineConfig, to_dict(config)) == config


def test_stage_options_must_be_a_mapping():
    with pytest.raises(ConfigError, match=r"^pipeline\.stages\[0\]\.options: expected a mapping, got \[1\]$"):
        build(PipelineConfig, stages({"name": "s1", "options": [1]}), "pipeline")
