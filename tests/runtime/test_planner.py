"""The rank planner (and the placement under it) as pure functions: layouts, devices, links,
transports, backend and errors."""

import re

import pytest

from comms.config import TransportConfig
from comms.link_spec import Transport
from core.config import ConfigError, build, to_dict
from runtime.pipeline_config import PipelineConfig
from runtime.placement import PlanError
from runtime.planner import LinkKind, Plan, format_plan, plan


def pipeline(*specs: dict, **extra) -> PipelineConfig:
    return build(PipelineConfig, {"stages": list(specs), **extra})


SERVER_IN = {"name": "ingest", "placement": "server"}
SERVER_OUT = {"name": "display", "placement": "server"}


def mirror(vision=1, generator="auto") -> PipelineConfig:
    return pipeline(SERVER_IN, {"name": "vision", "replicas": vision},
                    {"name": "generator", "replicas": generator}, SERVER_OUT)


def roles(p: Plan) -> list[str]:
    return [a.role for a in p.ranks]


def data_links(p: Plan):
    return [link for link in p.links if link.kind is LinkKind.DATA]


LAYOUTS = [(w, n) for w in range(1, 17) for n in (1, 2, 4) if w % n == 0 and w != 2]


@pytest.mark.parametrize("world_size, nnodes", LAYOUTS)
def test_default_pipeline_invariants(world_size, nnodes):
    config = PipelineConfig()
    p = plan(config, world_size, nnodes)
    assert (p.world_size, p.nnodes, p.nproc_per_node) == (world_size, nnodes, world_size // nnodes)
    assert [a.rank for a in p.ranks] == list(range(world_size))
    names = {s.name for s in config.stages}
    for a in p.ranks:
        # torchrun's node-major layout.
        assert (a.node, a.local_rank) == divmod(a.rank, p.nproc_per_node)
        assert a.role, f"rank {a.rank} has nothing to run"
        # Roles are names joined by '+', never rank arithmetic.
        parts = a.role.split("+")
        assert set(parts) <= names | {"server"}
        assert ("server" in parts) == a.server == (a.rank == 0)
        assert parts[int(a.server):] == [s.stage for s in a.stages]
        assert a.device == "cpu"
    for spec in config.stages:
        ranks = p.stage_ranks(spec.name)
        assert len(ranks) >= 1
        if spec.placement == "server":
            assert ranks == [0]
        if spec.nodes is not None:
            assert {p.ranks[r].node for r in ranks} <= set(spec.nodes)
    chain = [len(p.stage_ranks(s.name)) for s in config.stages]
    assert len(data_links(p)) == sum(a * b for a, b in zip(chain, chain[1:]))
    assert len({link.name for link in p.links}) == len(p.links)
    # The server rank has a control link to every other rank and a status link back.
    control = sorted((link.kind, link.src_rank, link.dst_rank) for link in p.links if link.kind is not LinkKind.DATA)
    assert control == sorted([(LinkKind.CONTROL, 0, r) for r in range(1, world_size)]
                             + [(LinkKind.STATUS, r, 0) for r in range(1, world_size)])
    if world_size > 1:
        # Every rank but the server's runs exactly one worker replica here.
        assert all(len(a.stages) == 1 for a in p.ranks[1:])
        assert len(p.stage_ranks("generator")) == world_size - 2
        # Auto replicas reach every node that has a free rank.
        assert {p.ranks[r].node for r in p.stage_ranks("generator")} == {
            a.node for a in p.ranks if a.rank not in (0, p.stage_ranks("vision")[0])}


def test_default_pipeline_needs_three_ranks_when_distributed():
    with pytest.raises(PlanError, match=r"not enough ranks for stage 'generator'.*needs at least 3 ranks"
                                        r".*world size is 2\. Run with world size 3"):
        plan(PipelineConfig(), 2)


def test_single_process_runs_everything_on_rank_zero():
    p = plan(mirror(vision=3), 1)
    assert p.single_process
    assert roles(p) == ["server+ingest+vision+generator+display"]
    assert [s.replica for s in p.ranks[0].stages] == [0, 0, 0, 0]
    assert all(link.local for link in p.links) and len(p.links) == 3  # no control links in one process
    assert any("replicas forced to 1: vision (3), generator (auto)" in note for note in p.notes)


def test_single_process_ignores_placement_constraints_with_a_note():
    p = plan(pipeline({"name": "a", "nodes": [3]}, {"name": "b", "ranks": [5]}), 1)
    assert roles(p) == ["server+a+b"]
    assert any("constraints ignored: a, b" in note for note in p.notes)


def test_world_three_gives_each_worker_a_rank():
    p = plan(PipelineConfig(), 3)
    assert roles(p) == ["server+ingest+display", "vision", "generator"]
    assert [(l.name, l.src_rank, l.dst_rank) for l in data_links(p)] == [
        ("ingest#0->vision#0", 0, 1), ("vision#0->generator#0", 1, 2), ("generator#0->display#0", 2, 0)]
    assert [l.name for l in p.links if l.kind is not LinkKind.DATA] == [
        "control:0->1", "status:1->0", "control:0->2", "status:2->0"]
    assert not any(link.local for link in p.links)


def test_auto_generator_spreads_over_two_nodes():
    p = plan(mirror(vision=2), 8, nnodes=2)
    assert p.stage_ranks("vision") == [1, 4]  # one per node
    gen = p.stage_ranks("generator")
    assert gen == [2, 3, 5, 6, 7]
    assert {p.ranks[r].node for r in gen} == {0, 1}
    assert len(data_links(p)) == 1 * 2 + 2 * 5 + 5 * 1


def test_auto_stages_share_leftover_evenly_earlier_first():
    p = plan(mirror(vision="auto"), 8)
    assert len(p.stage_ranks("vision")) == 4 and len(p.stage_ranks("generator")) == 3
    p = plan(mirror(vision="auto"), 9)
    assert len(p.stage_ranks("vision")) == 4 and len(p.stage_ranks("generator")) == 4


def test_fixed_replicas_round_robin_over_allowed_nodes():
    p = plan(mirror(vision=3, generator=8), 12, nnodes=3)
    assert p.stage_ranks("vision") == [1, 4, 8]
    assert sorted(p.ranks[r].node for r in p.stage_ranks("generator")) == [0, 0, 1, 1, 1, 2, 2, 2]
    # With fewer replicas than nodes, each replica still lands on a different node.
    p = plan(pipeline(SERVER_IN, {"name": "vision", "replicas": 2}, {"name": "generator", "replicas": 3},
                      {"name": "refine", "replicas": "auto"}, SERVER_OUT), 12, nnodes=3)
    assert [p.ranks[r].node for r in p.stage_ranks("vision")] == [0, 1]
    assert [p.ranks[r].node for r in p.stage_ranks("generator")] == [0, 1, 2]


def test_node_constraint_is_honoured():
    config = pipeline(SERVER_IN, {"name": "vision", "replicas": 2, "nodes": [1]},
                      {"name": "generator", "replicas": "auto"}, SERVER_OUT)
    p = plan(config, 8, nnodes=2)
    assert p.stage_ranks("vision") == [4, 5]
    assert p.stage_ranks("generator") == [1, 2, 3, 6, 7]


def test_node_limited_stage_claims_before_unlimited_one():
    # Generator comes first in the chain but may go anywhere; vision fits only on node 1.
    config = pipeline(SERVER_IN, {"name": "generator", "replicas": 3},
                      {"name": "vision", "replicas": 2, "nodes": [1]}, SERVER_OUT)
    p = plan(config, 6, nnodes=2)
    assert p.stage_ranks("vision") == [3, 4]
    assert p.stage_ranks("generator") == [1, 2, 5]


def test_node_out_of_range():
    config = pipeline(SERVER_IN, {"name": "vision", "nodes": [0, 2]}, {"name": "generator", "replicas": "auto"})
    with pytest.raises(PlanError, match=r"^stages\[1\]\.nodes\[1\]: stage 'vision' allows node 2, "
                                        r"but this run has 2 node\(s\) \(indices 0\.\.1\); list only those, "
                                        r"or run with --nnodes 3$"):
        plan(config, 4, nnodes=2)


def test_node_without_enough_free_ranks():
    config = pipeline(SERVER_IN, {"name": "vision", "replicas": 3, "nodes": [0]},
                      {"name": "generator", "replicas": "auto"})
    with pytest.raises(PlanError, match=r"^stages\[1\]\.nodes: stage 'vision' needs 3 ranks on node 0, but only 2 "
                                        r"are free there: the server and the stages placed before it use the "
                                        r"others\. To fix: allow more nodes \(e\.g\. nodes: \[0, 1\]\), or run "
                                        r"more processes per node \(--nproc-per-node\), or lower its replicas to 2$"):
        plan(config, 6, nnodes=2)


def test_auto_stage_limited_to_a_full_node_is_told_so():
    config = pipeline(SERVER_IN, {"name": "vision", "replicas": 2, "nodes": [0]},
                      {"name": "generator", "replicas": "auto", "nodes": [0]}, {"name": "rest", "replicas": "auto"})
    # 5 ranks are left for the two auto stages: generator's share is 3, node 0 has 1.
    with pytest.raises(PlanError, match=r"^stages\[2\]\.nodes: stage 'generator' needs 3 ranks \(its share of the "
                                        r"ranks left for replicas: auto\) on node 0, but only 1 is free there: .*"
                                        r"To fix: allow more nodes \(e\.g\. nodes: \[0, 1\]\), or run more "
                                        r"processes per node \(--nproc-per-node\)$"):
        plan(config, 8, nnodes=2)


def test_too_few_ranks_names_the_stage_and_suggests_a_size():
    with pytest.raises(PlanError, match=r"^stages\[2\]\.replicas: not enough ranks for stage 'generator': "
                                        r"this pipeline needs at least 6 ranks .*vision x3; generator x2.* "
                                        r"but world size is 4\. Run with world size 6 \(--nproc-per-node 6\)"):
        plan(mirror(vision=3, generator=2), 4)
    with pytest.raises(PlanError, match=r"world size 8 \(--nnodes 2 --nproc-per-node 4\)"):
        plan(mirror(vision=5, generator=2), 6, nnodes=2)


def test_too_few_ranks_for_auto_stage():
    with pytest.raises(PlanError, match=r"stages\[2\]\.replicas: not enough ranks for stage 'generator'.*"
                                        r"generator x1\+ \(auto\)"):
        plan(mirror(vision=2), 3)


def test_idle_ranks_without_auto_stage():
    with pytest.raises(PlanError, match=r"^stages: rank\(s\) 3, 4 would sit idle: the stages use 3 of 5 ranks.*"
                                        r"set `replicas: auto` on a worker stage \(e\.g\. 'generator'\).*"
                                        r"or run with world size 3"):
        plan(mirror(generator=1), 5)
    with pytest.raises(PlanError, match=r"rank\(s\) 4 \(node 1\), 5 \(node 1\) would sit idle.*world size 4$"):
        plan(mirror(generator=2), 6, nnodes=2)
    with pytest.raises(PlanError, match=r"set `replicas: auto` on a worker stage \(e\.g\. 'vision'\)"):
        plan(pipeline(SERVER_IN, {"name": "vision"}), 3)
    with pytest.raises(PlanError, match=r"add a worker stage with `replicas: auto`"):
        plan(pipeline(SERVER_IN, SERVER_OUT), 2)


def test_explicit_ranks_share_one_process():
    config = pipeline(SERVER_IN, {"name": "vision", "ranks": [1]}, {"name": "generator", "ranks": [1]}, SERVER_OUT)
    p = plan(config, 2)
    assert roles(p) == ["server+ingest+display", "vision+generator"]
    local = {link.name: link.local for link in data_links(p)}
    assert local == {"ingest#0->vision#0": False, "vision#0->generator#0": True, "generator#0->display#0": False}
    assert [link.name for link in p.links if link.dst_rank == 0] == ["generator#0->display#0", "status:1->0"]


def test_explicit_ranks_mixed_with_dedicated_and_auto():
    config = pipeline(SERVER_IN, {"name": "vision", "replicas": 2, "ranks": [3, 1]},
                      {"name": "generator", "replicas": "auto"}, SERVER_OUT)
    p = plan(config, 6)
    assert p.stage_ranks("vision") == [3, 1]  # replica order is the order given
    assert p.stage_ranks("generator") == [2, 4, 5]


def test_explicit_rank_out_of_range():
    config = pipeline(SERVER_IN, {"name": "vision", "replicas": 2, "ranks": [1, 4]})
    with pytest.raises(PlanError, match=r"^stages\[1\]\.ranks\[1\]: stage 'vision' is pinned to rank 4, "
                                        r"but world size 4 has ranks 0\.\.3"):
        plan(config, 4)


def test_explicit_rank_zero_needs_share_server_rank():
    specs = (SERVER_IN, {"name": "vision", "ranks": [0]}, {"name": "generator", "replicas": "auto"})
    with pytest.raises(PlanError, match=r"^stages\[1\]\.ranks\[0\]: stage 'vision' is pinned to rank 0, "
                                        r"the server rank.*share_server_rank: true"):
        plan(pipeline(*specs), 3)
    p = plan(pipeline(*specs, share_server_rank=True), 3)
    assert roles(p) == ["server+ingest+vision", "generator", "generator"]


def test_explicit_rank_outside_its_nodes():
    config = pipeline(SERVER_IN, {"name": "vision", "ranks": [1], "nodes": [1]}, {"name": "g", "replicas": "auto"})
    with pytest.raises(PlanError, match=r"stages\[1\]\.ranks\[0\]: stage 'vision' is pinned to rank 1 on node 0, "
                                        r"outside its nodes \[1\]"):
        plan(config, 4, nnodes=2)


def test_world_size_must_split_over_nodes():
    with pytest.raises(PlanError, match=r"^world_size: world size 6 does not split evenly over 4 nodes"):
        plan(PipelineConfig(), 6, nnodes=4)
    with pytest.raises(PlanError, match=r"^world_size: a job needs at least one process, got world size 0"):
        plan(PipelineConfig(), 0)


def test_plan_error_is_a_config_error_with_a_path():
    with pytest.raises(ConfigError) as info:
        plan(PipelineConfig(), 2)
    assert str(info.value.under("pipeline")).startswith("pipeline.stages[2].replicas: not enough ranks")


@pytest.mark.parametrize("gpus, expected", [
    (0, ["cpu", "cpu", "cpu", "cpu", "cpu", "cpu", "cpu", "cpu"]),
    (1, ["cpu"] + ["cuda:0"] * 7),
    (4, ["cpu", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1", "cuda:2", "cuda:3"]),
    (8, ["cpu"] + [f"cuda:{i}" for i in range(1, 8)]),
])
def test_devices_per_gpu_count(gpus, expected):
    p = plan(PipelineConfig(), 8, gpus_per_node=gpus)
    assert [a.device for a in p.ranks] == expected
    assert all(s.device == "cpu" for s in p.ranks[0].stages)


def test_devices_follow_local_rank_on_each_node():
    p = plan(PipelineConfig(), 8, nnodes=2, gpus_per_node=4)
    assert [a.device for a in p.ranks] == ["cpu", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    link = next(l for l in p.links if l.name == "ingest#0->vision#0")
    assert (link.src_device, link.dst_device) == ("cpu", "cuda:1")


def test_explicit_cpu_and_cuda_devices():
    config = pipeline({"name": "ingest", "placement": "server", "device": "cuda"},
                      {"name": "vision", "device": "cpu"}, {"name": "generator", "replicas": "auto"})
    p = plan(config, 4, gpus_per_node=2)
    assert [a.device for a in p.ranks] == ["cuda:0", "cpu", "cuda:0", "cuda:1"]


def test_cuda_without_gpus_is_an_error():
    config = pipeline(SERVER_IN, {"name": "vision", "device": "cuda"}, {"name": "generator", "replicas": "auto"})
    with pytest.raises(PlanError, match=r"^stages\[1\]\.device: stage 'vision' asks for 'cuda' but the nodes "
                                        r"have no GPU"):
        plan(config, 3, gpus_per_node=0)
    with pytest.raises(PlanError, match=r"stages\[1\]\.device"):
        plan(config, 1)


def test_single_process_on_a_gpu_keeps_codecs_on_cpu():
    p = plan(PipelineConfig(), 1, gpus_per_node=1)
    assert p.ranks[0].device == "cuda:0"
    assert {s.stage: s.device for s in p.ranks[0].stages} == {
        "ingest": "cpu", "vision": "cuda:0", "generator": "cuda:0", "display": "cpu"}


def requesting(backend: str) -> TransportConfig:
    return TransportConfig(backend=backend)


def test_backend_choice():
    assert plan(PipelineConfig(), 1, gpus_per_node=1).backend == "gloo"
    assert plan(PipelineConfig(), 4).backend == "gloo"
    own = plan(PipelineConfig(), 8, nnodes=2, gpus_per_node=4)
    assert own.backend == "nccl" and own.devices_shared() == []
    assert "links to rank(s) 0 on the CPU use gloo" in own.backend_reason
    assert plan(PipelineConfig(), 8, nnodes=2, gpus_per_node=4, transport=requesting("gloo")).backend == "gloo"
    shared = plan(PipelineConfig(), 8, gpus_per_node=4)
    assert shared.devices_shared() == [(0, "cuda:1", [1, 5]), (0, "cuda:2", [2, 6]), (0, "cuda:3", [3, 7])]
    assert shared.backend == "gloo"
    assert "ranks 1, 5 share cuda:1 on node 0" in shared.backend_reason
    with pytest.raises(PlanError, match=r"^backend: 'nccl' needs a CUDA device of its own.*ranks 1, 5 share"):
        plan(PipelineConfig(), 8, gpus_per_node=4, transport=requesting("nccl"))
    with pytest.raises(PlanError, match=r"^backend: 'nccl' needs .*worker rank\(s\) 1, 2, 3 have no CUDA device"):
        plan(PipelineConfig(), 4, transport=requesting("nccl"))
    with pytest.raises(ConfigError, match=r"^backend: got 'mpi'; allowed: 'auto', 'gloo', 'nccl'"):
        requesting("mpi")


def test_a_backend_refusal_points_at_the_transport_section():
    with pytest.raises(PlanError) as info:
        plan(PipelineConfig(), 4, transport=requesting("nccl"))
    assert str(info.value.in_config()).startswith("transport.backend: 'nccl' needs")


def transports(p: Plan) -> dict[str, str]:
    return {link.name: link.describe_transport() for link in p.links}


def test_each_link_gets_its_transport_and_backend_once():
    # 2 nodes x 4, a GPU per worker rank: NCCL between GPU stages, a TCP link between
    # nodes where an end is on the CPU, a same-host socket within a node unless NCCL
    # carries it.
    p = plan(mirror(vision=2), 8, nnodes=2, gpus_per_node=4)
    links = {link.name: link for link in p.links}
    assert (links["ingest#0->vision#0"].transport, links["ingest#0->vision#0"].backend) == (Transport.SAME_HOST, None)
    assert (links["ingest#0->vision#1"].transport, links["ingest#0->vision#1"].backend) == (Transport.TCP, None)
    assert links["vision#0->generator#0"].describe_transport() == "torch (nccl)"  # same node, GPU to GPU
    assert links["vision#0->generator#2"].describe_transport() == "torch (nccl)"  # across nodes
    assert links["generator#2->display#0"].describe_transport() == "tcp"  # node 1 GPU -> server CPU
    assert links["control:0->1"].describe_transport() == "same-host"
    assert links["status:4->0"].describe_transport() == "tcp"
    # The same layout without GPUs, with and without shared memory.
    cpu = plan(mirror(vision=2), 8, nnodes=2)
    assert transports(cpu)["vision#0->generator#0"] == "same-host"
    assert transports(cpu)["vision#0->generator#2"] == "tcp"
    no_shm = plan(mirror(vision=2), 8, nnodes=2, transport=TransportConfig(shared_memory=False))
    assert set(transports(no_shm).values()) == {"torch (gloo)", "tcp"}
    assert transports(no_shm)["vision#0->generator#0"] == "torch (gloo)"  # same node, no shared memory
    # Between nodes on gloo, as before TCP links: every cross-node CPU link a torch link.
    on_gloo = plan(mirror(vision=2), 8, nnodes=2, transport=TransportConfig(between_nodes="gloo"))
    assert "tcp" not in set(transports(on_gloo).values())
    assert transports(on_gloo)["vision#0->generator#2"] == "torch (gloo)"
    assert transports(on_gloo)["vision#0->generator#0"] == "same-host"


def test_ranks_sharing_one_gpu_never_get_nccl_links():
    # 3 ranks on a 1-GPU node: vision and generator both on cuda:0, where NCCL refuses.
    p = plan(PipelineConfig(), 3, gpus_per_node=1)
    assert p.backend == "gloo"
    assert "nccl" not in set(transports(p).values())
    assert transports(p)["vision#0->generator#0"] == "same-host"  # staged through host memory anyway
    assert transports(plan(PipelineConfig(), 3, gpus_per_node=2))["vision#0->generator#0"] == "torch (nccl)"


def test_server_on_gpu_shares_it_with_a_worker():
    config = pipeline({"name": "ingest", "placement": "server", "device": "cuda"},
                      {"name": "generator", "replicas": "auto"})
    p = plan(config, 3, gpus_per_node=2)
    assert p.devices_shared() == [(0, "cuda:0", [0, 2])]
    assert p.backend == "gloo"


def test_plan_is_deterministic_and_pure():
    config = mirror(vision=2)
    before = to_dict(config)
    assert plan(config, 8, 2, 4) == plan(config, 8, 2, 4)
    assert to_dict(config) == before


@pytest.mark.parametrize("world_size, nnodes, gpus", [(1, 1, 0), (3, 1, 0), (8, 2, 4), (16, 4, 8)])
def test_format_plan_lists_every_rank_and_link(world_size, nnodes, gpus):
    p = plan(mirror(vision=min(2, max(1, world_size - 2))), world_size, nnodes, gpus)
    text = format_plan(p)
    lines = text.splitlines()
    assert lines[0].startswith(f"pipeline 'mirror': world size {world_size} = {nnodes} node(s)")
    for a in p.ranks:
        row = next(line for line in lines if re.match(rf"{a.rank}\s+{a.node}\s+{a.local_rank}\s+{re.escape(a.device)}\s", line))
        assert a.role in row
        for s in a.stages:
            assert s.label in row
    for link in p.links:
        row = next(line for line in lines if re.match(rf"  {link.kind}\s+{re.escape(link.name)}\s", line))
        assert f"{link.src_rank} -> {link.dst_rank}" in row and row.endswith(link.describe_transport())
    controls = 2 * (world_size - 1)
    assert f"links ({len(p.links)}: {len(p.links) - controls} data, {controls // 2} control, {controls // 2} status):" in text
    assert re.search(r"^process group: (gloo|nccl) \(", text, re.M)


def test_format_plan_marks_local_links_and_shared_gpus():
    config = pipeline(SERVER_IN, {"name": "vision", "ranks": [1]}, {"name": "generator", "ranks": [1]},
                      {"name": "refine", "replicas": "auto"}, SERVER_OUT)
    text = format_plan(plan(config, 4, gpus_per_node=1))
    assert re.search(r"^  data\s+vision#0->generator#0\s+1 -> 1\s+cuda:0 -> cuda:0\s+in-process$", text, re.M)
    assert re.search(r"^  data\s+ingest#0->vision#0\s+0 -> 1\s+cpu -> cuda:0\s+same-host$", text, re.M)
    assert re.search(r"^  control\s+control:0->3\s+0 -> 3\s+cpu -> cpu\s+same-host$", text, re.M)
    assert "shared GPU: cuda:0 on node 0 is used by ranks 1, 2, 3" in text
    assert "process group: gloo (auto: ranks 1, 2, 3 share cuda:0 on node 0)" in text


def test_format_plan_shows_notes_and_replica_devices():
    text = format_plan(plan(PipelineConfig(), 1, gpus_per_node=1))
    assert "ingest#0 @cpu, vision#0, generator#0, display#0 @cpu" in text
    assert "note: single-process mode: every stage runs on rank 0" in text


def test_links_cover_every_replica_pair():
    p = plan(mirror(vision=3), 8)
    vision, gen = p.stage_ranks("vision"), p.stage_ranks("generator")
    pairs = {(l.src_replica, l.dst_replica) for l in p.links if l.src_stage == "vision"}
    assert pairs == {(a, b) for a in range(len(vision)) for b in range(len(gen))}
    assert len(pairs) == len(vision) * len(gen)
    for link in data_links(p):
        assert link.src_rank == p.stage_ranks(link.src_stage)[link.src_replica]
        assert link.dst_rank == p.stage_ranks(link.dst_stage)[link.dst_replica]
