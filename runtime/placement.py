"""Placing stage replicas on ranks: the part of planning that decides where things run.

``place_stages`` turns the pipeline's stage specs into one rank per replica for a
torchrun layout (node-major ranks: ``node = rank // nproc_per_node``): the server rank
hosts the stages placed on the server; worker stages get ranks of their own, those
pinned with ``ranks`` first, then fixed replica counts (node-limited stages claim before
stages that may go anywhere), then 'auto' stages share the ranks left over, spread over
the nodes in turn. A world of one runs everything on the server rank.

Whatever cannot be placed is refused with a ``PlanError`` that names the field to change
and says what would fit. Pure functions only; ``runtime.planner`` builds the plan on top.
"""

from __future__ import annotations

from collections.abc import Iterable

from core.config import ConfigError
from runtime.pipeline_config import PipelineConfig, StageSpec

SERVER_ROLE = "server"
SERVER_RANK = 0
"""torchrun's rank 0: the first process of the first node, where the page is served."""


class PlanError(ConfigError):
    """The pipeline cannot be laid out on this world; the path names the field to change
    (relative to the pipeline section) and the message says what would fit."""

    LAUNCH_FIELDS = ("world_size", "nnodes", "gpus_per_node")
    """Paths that name a launch parameter rather than a field of the pipeline section."""

    def in_config(self) -> ConfigError:
        """The same error with its full path from the config file's root."""
        if self.path in self.LAUNCH_FIELDS:
            return self
        return self.under("transport") if self.path == "backend" else self.under("pipeline")


def place_stages(config: PipelineConfig, world_size: int, nnodes: int,
                 gpus_per_node: int) -> tuple[dict[str, list[int]], list[str]]:
    """The rank of each replica of each stage (by stage name, indexed by replica) and
    notes on what was adjusted; raises ``PlanError`` when the pipeline does not fit."""
    _check_layout(world_size, nnodes, gpus_per_node)
    _check_devices(config, gpus_per_node)
    if world_size == 1:
        return _single_process(config)
    return _distribute(config, world_size, nnodes, world_size // nnodes)


def stage_device(spec: StageSpec, local_rank: int, gpus_per_node: int) -> str:
    """Where one replica computes: 'cuda:N' by its local rank when it wants a GPU and the
    node has some, else 'cpu'."""
    # 'auto' keeps server stages on the CPU: they are codecs next to the web server, and
    # leaving the server rank off the GPU keeps every GPU for the worker ranks.
    wants_gpu = spec.device == "cuda" or (spec.device == "auto" and spec.placement == "worker")
    if wants_gpu and gpus_per_node > 0:
        return f"cuda:{local_rank % gpus_per_node}"
    return "cpu"


def _check_layout(world_size: int, nnodes: int, gpus_per_node: int) -> None:
    if world_size < 1:
        raise PlanError(f"a job needs at least one process, got world size {world_size}", "world_size")
    if nnodes < 1:
        raise PlanError(f"a job needs at least one node, got {nnodes}", "nnodes")
    if world_size % nnodes:
        raise PlanError(f"world size {world_size} does not split evenly over {nnodes} nodes; torchrun runs the "
                        f"same number of processes on every node, so use a multiple of {nnodes}", "world_size")
    if gpus_per_node < 0:
        raise PlanError(f"a node has 0 or more GPUs, got {gpus_per_node}", "gpus_per_node")


def _check_devices(config: PipelineConfig, gpus_per_node: int) -> None:
    for i, spec in enumerate(config.stages):
        if spec.device == "cuda" and gpus_per_node == 0:
            raise PlanError(f"stage {spec.name!r} asks for 'cuda' but the nodes have no GPU (gpus_per_node 0); "
                            "use device: auto or cpu", f"stages[{i}].device")


def _single_process(config: PipelineConfig) -> tuple[dict[str, list[int]], list[str]]:
    notes = ["single-process mode: every stage runs on rank 0"]
    forced = [f"{s.name} ({s.replicas})" for s in config.stages if s.replicas != 1]
    if forced:
        notes.append("replicas forced to 1: " + ", ".join(forced))
    ignored = [s.name for s in config.stages
               if s.nodes is not None or (s.ranks is not None and s.ranks != [SERVER_RANK])]
    if ignored:
        notes.append("nodes/ranks constraints ignored: " + ", ".join(ignored))
    return {spec.name: [SERVER_RANK] for spec in config.stages}, notes


def _distribute(config: PipelineConfig, world_size: int, nnodes: int,
                nproc_per_node: int) -> tuple[dict[str, list[int]], list[str]]:
    """Rank lists per stage for world_size > 1; raises PlanError when they cannot fit."""
    stages = list(enumerate(config.stages))
    all_nodes = list(range(nnodes))
    node_of = {rank: rank // nproc_per_node for rank in range(world_size)}

    for i, spec in stages:
        for j, node in enumerate(spec.nodes or []):
            if node >= nnodes:
                raise PlanError(f"stage {spec.name!r} allows node {node}, but this run has {nnodes} node(s) "
                                f"(indices 0..{nnodes - 1}); list only those, or run with --nnodes {node + 1}",
                                f"stages[{i}].nodes[{j}]")

    stage_ranks: dict[str, list[int]] = {}
    for i, spec in stages:
        if spec.placement == "server":
            stage_ranks[spec.name] = [SERVER_RANK]
        elif spec.ranks is not None:
            _check_pinned(config, i, spec, world_size, node_of)
            stage_ranks[spec.name] = list(spec.ranks)

    pinned = {rank for ranks in stage_ranks.values() for rank in ranks}
    free = {node: [r for r in range(world_size) if node_of[r] == node and r not in pinned and r != SERVER_RANK]
            for node in all_nodes}
    fixed = [(i, s) for i, s in stages if s.name not in stage_ranks and not s.is_auto]
    auto = [(i, s) for i, s in stages if s.name not in stage_ranks and s.is_auto]
    _check_enough(config, world_size, nnodes, pinned, fixed, auto)

    # Stages limited to some nodes claim ranks first, so a stage that may go anywhere
    # cannot take the only ranks a node-limited one may use. Stage order within each group.
    def claim_order(group: list[tuple[int, StageSpec]]) -> list[tuple[int, StageSpec]]:
        return sorted(group, key=lambda item: (item[1].nodes is None, item[0]))

    for i, spec in claim_order(fixed):
        stage_ranks[spec.name] = _claim(free, spec, i, spec.replicas, nnodes, node_of)

    if auto:
        leftover = sum(len(ranks) for ranks in free.values())
        share, extra = divmod(leftover, len(auto))
        counts = {spec.name: share + (1 if k < extra else 0) for k, (_, spec) in enumerate(auto)}
        for i, spec in claim_order(auto):
            stage_ranks[spec.name] = _claim(free, spec, i, counts[spec.name], nnodes, node_of)

    idle = sorted(r for ranks in free.values() for r in ranks)
    if idle:
        raise PlanError(_idle_message(config, world_size, nnodes, idle, node_of), "stages")
    return stage_ranks, []


def _check_pinned(config: PipelineConfig, i: int, spec: StageSpec, world_size: int,
                  node_of: dict[int, int]) -> None:
    for j, rank in enumerate(spec.ranks or []):
        where = f"stages[{i}].ranks[{j}]"
        if rank >= world_size:
            raise PlanError(f"stage {spec.name!r} is pinned to rank {rank}, but world size {world_size} "
                            f"has ranks 0..{world_size - 1}; pin it to one of those, or run more processes", where)
        if rank == SERVER_RANK and not config.share_server_rank:
            raise PlanError(f"stage {spec.name!r} is pinned to rank {rank}, the server rank; use placement: "
                            "server, or set share_server_rank: true to allow worker stages there", where)
        if spec.nodes is not None and node_of[rank] not in spec.nodes:
            raise PlanError(f"stage {spec.name!r} is pinned to rank {rank} on node {node_of[rank]}, "
                            f"outside its nodes {spec.nodes}; pin it to a rank of those nodes, or allow node "
                            f"{node_of[rank]}", where)


def _check_enough(config: PipelineConfig, world_size: int, nnodes: int, pinned: set[int],
                  fixed: list[tuple[int, StageSpec]], auto: list[tuple[int, StageSpec]]) -> None:
    """Fail early, naming the first stage that gets no rank and the world size that fits."""
    server_stages = [s.name for s in config.stages if s.placement == "server"]
    demand = [(f"rank {SERVER_RANK}: " + ", ".join([SERVER_ROLE] + server_stages), 1, None)]
    workers_pinned = sorted(pinned - {SERVER_RANK})
    if workers_pinned:
        demand.append((f"pinned ranks {workers_pinned}", len(workers_pinned), None))
    demand += [(f"{s.name} x{s.replicas}", s.replicas, i) for i, s in fixed]
    demand += [(f"{s.name} x1+ (auto)", 1, i) for i, s in auto]
    needed = sum(count for _, count, _ in demand)
    if needed <= world_size:
        return
    used = 0
    for _, count, index in demand:
        used += count
        if used > world_size:
            break
    spec = config.stages[index]
    fits = -(-needed // nnodes) * nnodes
    how = f"--nproc-per-node {fits}" if nnodes == 1 else f"--nnodes {nnodes} --nproc-per-node {fits // nnodes}"
    raise PlanError(
        f"not enough ranks for stage {spec.name!r}: this pipeline needs at least {needed} ranks "
        f"({'; '.join(what for what, _, _ in demand)}) but world size is {world_size}. "
        f"Run with world size {fits} ({how}), or lower replicas",
        f"stages[{index}].replicas")


def _claim(free: dict[int, list[int]], spec: StageSpec, i: int, count: int, nnodes: int,
           node_of: dict[int, int]) -> list[int]:
    """Take ``count`` free ranks for ``spec``, one per allowed node in turn (lowest rank first)."""
    nodes = spec.nodes if spec.nodes is not None else list(range(nnodes))
    available = sum(len(free[node]) for node in nodes)
    if available < count:
        raise PlanError(_short_message(spec, count, nodes, nnodes, available, node_of),
                        f"stages[{i}].nodes" if spec.nodes is not None else f"stages[{i}].replicas")
    taken: list[int] = []
    cursor = 0
    while len(taken) < count:
        for step in range(len(nodes)):
            node = nodes[(cursor + step) % len(nodes)]
            if free[node]:
                taken.append(free[node].pop(0))
                cursor = (cursor + step + 1) % len(nodes)
                break
    # Which ranks is decided round-robin; numbering replicas in rank order keeps the table readable.
    return sorted(taken)


def _short_message(spec: StageSpec, count: int, nodes: list[int], nnodes: int, available: int,
                   node_of: dict[int, int]) -> str:
    where = f"node {nodes[0]}" if len(nodes) == 1 else f"nodes {ranks_text(nodes)}"
    wants = f"{count} rank{'s' if count != 1 else ''}"
    if spec.is_auto:
        wants += " (its share of the ranks left for replicas: auto)"
    free_text = "none is free" if available == 0 else f"only {available} {'is' if available == 1 else 'are'} free"
    fixes = []
    if spec.nodes is not None and len(nodes) < nnodes:
        others = [n for n in range(nnodes) if n not in nodes]
        fixes.append(f"allow more nodes (e.g. nodes: {sorted(nodes + others[:1])})")
    fixes.append("run more processes per node (--nproc-per-node)")
    if not spec.is_auto and available > 0:
        fixes.append(f"lower its replicas to {available}")
    return (f"stage {spec.name!r} needs {wants} on {where}, but {free_text} there: the server and the stages "
            f"placed before it use the others. To fix: {', or '.join(fixes)}")


def _idle_message(config: PipelineConfig, world_size: int, nnodes: int, idle: list[int],
                  node_of: dict[int, int]) -> str:
    used = world_size - len(idle)
    candidates = [s.name for s in config.stages if s.placement == "worker" and s.ranks is None]
    suggestion = (f"set `replicas: auto` on a worker stage (e.g. {candidates[-1]!r}) so it shares them"
                  if candidates else "add a worker stage with `replicas: auto` to use them")
    if used % nnodes == 0:
        suggestion += f", or run with world size {used}"
    where = ", ".join(f"{r} (node {node_of[r]})" for r in idle) if nnodes > 1 else ranks_text(idle)
    return (f"rank(s) {where} would sit idle: the stages use {used} of {world_size} ranks and none has "
            f"replicas: auto; {suggestion}")


def ranks_text(ranks: Iterable[int]) -> str:
    return ", ".join(str(r) for r in ranks)
