"""Rank planning: which rank runs which stage replicas, on which device, linked to whom.

``plan(config, world_size, nnodes, gpus_per_node)`` is a pure function of the pipeline
config and the torchrun layout, so every rank computes the same plan without talking to
the others, and ``--dry-run`` can print it without starting any process.

Ranks are laid out node-major like torchrun: ``node = rank // nproc_per_node``,
``local_rank = rank % nproc_per_node``. Rank 0 always runs the web server and hosts the
stages placed on the server; worker stages get ranks of their own, fixed replica counts
first, then 'auto' stages share the ranks left over. A world of one process runs the
whole chain on rank 0 (single-process mode).

Every replica of stage i is linked to every replica of stage i+1; how a stage spreads its
outputs over those links is its ``routing``. A link whose two ends share a rank is local
(an in-process queue, no transport).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise

from runtime.config_loader import ConfigError
from runtime.pipeline_config import PipelineConfig, StageSpec

SERVER_ROLE = "server"
BACKENDS = ("auto", "gloo", "nccl")


class PlanError(ConfigError):
    """The pipeline cannot be laid out on this world; the path names the field to change
    (relative to the pipeline section) and the message says what would fit."""

    LAUNCH_FIELDS = ("world_size", "nnodes", "gpus_per_node")
    """Paths that name a launch parameter rather than a field of the pipeline section."""

    def in_config(self) -> ConfigError:
        """The same error with its full path from the config file's root."""
        return self if self.path in self.LAUNCH_FIELDS else self.under("pipeline")


@dataclass(frozen=True, kw_only=True, slots=True)
class StagePlacement:
    """One replica of one stage, as hosted by a rank."""

    stage: str
    """Stage name (``StageSpec.name``)."""
    kind: str
    """Stage class key (``StageSpec.kind``)."""
    replica: int
    """Replica index within the stage, 0-based."""
    device: str
    """Where this replica computes: 'cpu' or 'cuda:N'. On rank 0 a server stage may stay on
    the CPU while a worker stage shares the rank's GPU (single-process mode)."""

    @property
    def label(self) -> str:
        return f"{self.stage}#{self.replica}"


@dataclass(frozen=True, kw_only=True, slots=True)
class RankAssignment:
    """Everything one rank runs."""

    rank: int
    node: int
    local_rank: int
    device: str
    """The rank's device: 'cuda:N' when any of its replicas computes on a GPU, else 'cpu'."""
    stages: list[StagePlacement]
    """Replicas hosted here, in chain order."""
    role: str
    """'+'-joined names of what runs here, e.g. 'server+ingest+display' or 'vision+generator'."""
    server: bool
    """Whether this rank runs the web server (rank 0)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Link:
    """One directed edge from a replica of stage i to a replica of stage i+1."""

    name: str
    """'src#replica->dst#replica', e.g. 'vision#0->generator#1'; unique within a plan."""
    src_rank: int
    dst_rank: int
    src_stage: str
    dst_stage: str
    src_replica: int
    dst_replica: int
    src_device: str
    dst_device: str

    @property
    def local(self) -> bool:
        """Both ends in one process: an in-process queue carries it, no transport."""
        return self.src_rank == self.dst_rank


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """The layout of one run; identical on every rank."""

    pipeline: str
    world_size: int
    nnodes: int
    nproc_per_node: int
    gpus_per_node: int
    ranks: list[RankAssignment]
    """Indexed by rank."""
    links: list[Link]
    """Grouped by chain position, then source replica, then destination replica."""
    notes: list[str]
    """Adjustments the planner made that the user should know about."""

    @property
    def single_process(self) -> bool:
        return self.world_size == 1

    def assignment(self, rank: int) -> RankAssignment:
        return self.ranks[rank]

    def stage_ranks(self, stage: str) -> list[int]:
        """The rank of each replica of ``stage``, indexed by replica."""
        found = sorted((p.replica, a.rank) for a in self.ranks for p in a.stages if p.stage == stage)
        if not found:
            raise KeyError(f"no stage named {stage!r} in plan {self.pipeline!r}")
        return [rank for _, rank in found]

    def links_from(self, rank: int) -> list[Link]:
        return [link for link in self.links if link.src_rank == rank]

    def links_to(self, rank: int) -> list[Link]:
        return [link for link in self.links if link.dst_rank == rank]

    def devices_shared(self) -> list[tuple[int, str, list[int]]]:
        """GPUs that more than one rank of a node would use, as (node, device, ranks);
        empty when every rank has its own. NCCL refuses two ranks on one GPU."""
        users: dict[tuple[int, str], list[int]] = {}
        for a in self.ranks:
            if a.device.startswith("cuda"):
                users.setdefault((a.node, a.device), []).append(a.rank)
        return [(node, device, ranks) for (node, device), ranks in sorted(users.items()) if len(ranks) > 1]

    def backend(self, requested: str = "auto") -> str:
        """The torch.distributed backend for this plan: 'gloo' or 'nccl'.

        'auto' picks NCCL when every worker rank has a CUDA device of its own, else gloo.
        'nccl' raises ``PlanError`` when that does not hold. With NCCL, links to a rank on
        the CPU (usually rank 0) still need a gloo group; ``backend_reason`` says so."""
        return _choose_backend(self, requested)[0]

    def backend_reason(self, requested: str = "auto") -> str:
        """Why ``backend(requested)`` chose what it chose, in one line."""
        return _choose_backend(self, requested)[1]


def plan(config: PipelineConfig, world_size: int, nnodes: int = 1, gpus_per_node: int = 0) -> Plan:
    """Lay ``config`` out on ``world_size`` ranks over ``nnodes`` nodes; pure, deterministic."""
    _check_layout(world_size, nnodes, gpus_per_node)
    _check_devices(config, gpus_per_node)
    nproc_per_node = world_size // nnodes
    if world_size == 1:
        stage_ranks, notes = _single_process(config)
    else:
        stage_ranks, notes = _distribute(config, world_size, nnodes, nproc_per_node)

    placements: dict[tuple[str, int], StagePlacement] = {}
    hosted: dict[int, list[StagePlacement]] = {rank: [] for rank in range(world_size)}
    for spec in config.stages:
        for replica, rank in enumerate(stage_ranks[spec.name]):
            device = _stage_device(spec, rank % nproc_per_node, gpus_per_node)
            placement = StagePlacement(stage=spec.name, kind=spec.kind, replica=replica, device=device)
            placements[spec.name, replica] = placement
            hosted[rank].append(placement)

    ranks = []
    for rank in range(world_size):
        stages = hosted[rank]
        server = rank == 0
        gpu = next((p.device for p in stages if p.device != "cpu"), None)
        role = "+".join(([SERVER_ROLE] if server else []) + [p.stage for p in stages])
        ranks.append(RankAssignment(rank=rank, node=rank // nproc_per_node, local_rank=rank % nproc_per_node,
                                    device=gpu or "cpu", stages=stages, role=role, server=server))

    links = []
    for src, dst in pairwise(config.stages):
        for src_replica, src_rank in enumerate(stage_ranks[src.name]):
            for dst_replica, dst_rank in enumerate(stage_ranks[dst.name]):
                links.append(Link(
                    name=f"{src.name}#{src_replica}->{dst.name}#{dst_replica}",
                    src_rank=src_rank, dst_rank=dst_rank,
                    src_stage=src.name, dst_stage=dst.name,
                    src_replica=src_replica, dst_replica=dst_replica,
                    src_device=placements[src.name, src_replica].device,
                    dst_device=placements[dst.name, dst_replica].device,
                ))

    return Plan(pipeline=config.name, world_size=world_size, nnodes=nnodes, nproc_per_node=nproc_per_node,
                gpus_per_node=gpus_per_node, ranks=ranks, links=links, notes=notes)


def _check_layout(world_size: int, nnodes: int, gpus_per_node: int) -> None:
    if world_size < 1:
        raise PlanError(f"must be >= 1, got {world_size}", "world_size")
    if nnodes < 1:
        raise PlanError(f"must be >= 1, got {nnodes}", "nnodes")
    if world_size % nnodes:
        raise PlanError(f"world size {world_size} does not split evenly over {nnodes} nodes; torchrun runs the "
                        f"same number of processes on every node, so use a multiple of {nnodes}", "world_size")
    if gpus_per_node < 0:
        raise PlanError(f"must be >= 0, got {gpus_per_node}", "gpus_per_node")


def _check_devices(config: PipelineConfig, gpus_per_node: int) -> None:
    for i, spec in enumerate(config.stages):
        if spec.device == "cuda" and gpus_per_node == 0:
            raise PlanError(f"stage {spec.name!r} asks for 'cuda' but the nodes have no GPU (gpus_per_node 0); "
                            "use device: auto or cpu", f"stages[{i}].device")


def _stage_device(spec: StageSpec, local_rank: int, gpus_per_node: int) -> str:
    # 'auto' keeps server stages on the CPU: they are codecs next to the web server, and
    # leaving rank 0 off the GPU keeps every GPU for the worker ranks.
    wants_gpu = spec.device == "cuda" or (spec.device == "auto" and spec.placement == "worker")
    if wants_gpu and gpus_per_node > 0:
        return f"cuda:{local_rank % gpus_per_node}"
    return "cpu"


def _single_process(config: PipelineConfig) -> tuple[dict[str, list[int]], list[str]]:
    notes = ["single-process mode: every stage runs on rank 0"]
    forced = [f"{s.name} ({s.replicas})" for s in config.stages if s.replicas != 1]
    if forced:
        notes.append("replicas forced to 1: " + ", ".join(forced))
    ignored = [s.name for s in config.stages if s.nodes is not None or (s.ranks is not None and s.ranks != [0])]
    if ignored:
        notes.append("nodes/ranks constraints ignored: " + ", ".join(ignored))
    return {spec.name: [0] for spec in config.stages}, notes


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
                                f"(indices 0..{nnodes - 1})", f"stages[{i}].nodes[{j}]")

    stage_ranks: dict[str, list[int]] = {}
    for i, spec in stages:
        if spec.placement == "server":
            stage_ranks[spec.name] = [0]
        elif spec.ranks is not None:
            _check_pinned(config, i, spec, world_size, node_of)
            stage_ranks[spec.name] = list(spec.ranks)

    pinned = {rank for ranks in stage_ranks.values() for rank in ranks}
    free = {node: [r for r in range(1, world_size) if node_of[r] == node and r not in pinned] for node in all_nodes}
    fixed = [(i, s) for i, s in stages if s.name not in stage_ranks and not s.is_auto]
    auto = [(i, s) for i, s in stages if s.name not in stage_ranks and s.is_auto]
    _check_enough(config, world_size, nnodes, pinned, fixed, auto)

    # Stages limited to some nodes claim ranks first, so a stage that may go anywhere
    # cannot take the only ranks a node-limited one may use. Stage order within each group.
    def claim_order(group: list[tuple[int, StageSpec]]) -> list[tuple[int, StageSpec]]:
        return sorted(group, key=lambda item: (item[1].nodes is None, item[0]))

    for i, spec in claim_order(fixed):
        stage_ranks[spec.name] = _claim(free, spec, i, spec.replicas, nnodes, "replicas")

    if auto:
        leftover = sum(len(ranks) for ranks in free.values())
        share, extra = divmod(leftover, len(auto))
        counts = {spec.name: share + (1 if k < extra else 0) for k, (_, spec) in enumerate(auto)}
        for i, spec in claim_order(auto):
            stage_ranks[spec.name] = _claim(free, spec, i, counts[spec.name], nnodes, "auto share")

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
                            f"has ranks 0..{world_size - 1}", where)
        if rank == 0 and not config.share_server_rank:
            raise PlanError(f"stage {spec.name!r} is pinned to rank 0, the server rank; use placement: server, "
                            "or set share_server_rank: true to allow worker stages there", where)
        if spec.nodes is not None and node_of[rank] not in spec.nodes:
            raise PlanError(f"stage {spec.name!r} is pinned to rank {rank} on node {node_of[rank]}, "
                            f"outside its nodes {spec.nodes}", where)


def _check_enough(config: PipelineConfig, world_size: int, nnodes: int, pinned: set[int],
                  fixed: list[tuple[int, StageSpec]], auto: list[tuple[int, StageSpec]]) -> None:
    """Fail early, naming the first stage that gets no rank and the world size that fits."""
    server_stages = [s.name for s in config.stages if s.placement == "server"]
    demand = [("rank 0: " + ", ".join([SERVER_ROLE] + server_stages), 1, None)]
    if pinned - {0}:
        demand.append((f"pinned ranks {sorted(pinned - {0})}", len(pinned - {0}), None))
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


def _claim(free: dict[int, list[int]], spec: StageSpec, i: int, count: int, nnodes: int, what: str) -> list[int]:
    """Take ``count`` free ranks for ``spec``, one per allowed node in turn (lowest rank first)."""
    nodes = spec.nodes if spec.nodes is not None else list(range(nnodes))
    taken: list[int] = []
    cursor = 0
    while len(taken) < count:
        for step in range(len(nodes)):
            node = nodes[(cursor + step) % len(nodes)]
            if free[node]:
                taken.append(free[node].pop(0))
                cursor = (cursor + step + 1) % len(nodes)
                break
        else:
            remaining = sorted(r for node in nodes for r in free[node])
            taken_text = _ranks_text(taken) if taken else "none"
            raise PlanError(
                f"stage {spec.name!r} needs {count} rank(s) ({what}) on nodes {nodes} but got only "
                f"{len(taken)} ({taken_text}); the other ranks there already run earlier stages. "
                f"Allow more nodes, use more processes per node, or lower replicas"
                + (f" (free there: {_ranks_text(remaining)})" if remaining else ""),
                f"stages[{i}].nodes" if spec.nodes is not None else f"stages[{i}].replicas")
    # Which ranks is decided round-robin; numbering replicas in rank order keeps the table readable.
    return sorted(taken)


def _idle_message(config: PipelineConfig, world_size: int, nnodes: int, idle: list[int],
                  node_of: dict[int, int]) -> str:
    used = world_size - len(idle)
    candidates = [s.name for s in config.stages if s.placement == "worker" and s.ranks is None]
    suggestion = (f"set `replicas: auto` on a worker stage (e.g. {candidates[-1]!r}) so it shares them"
                  if candidates else "add a worker stage with `replicas: auto` to use them")
    if used % nnodes == 0:
        suggestion += f", or run with world size {used}"
    where = ", ".join(f"{r} (node {node_of[r]})" for r in idle) if nnodes > 1 else _ranks_text(idle)
    return (f"rank(s) {where} would sit idle: the stages use {used} of {world_size} ranks and none has "
            f"replicas: auto; {suggestion}")


def _ranks_text(ranks: Iterable[int]) -> str:
    return ", ".join(str(r) for r in ranks)


def _choose_backend(plan: Plan, requested: str) -> tuple[str, str]:
    if requested not in BACKENDS:
        raise PlanError(f"got {requested!r}; allowed: {', '.join(map(repr, BACKENDS))}", "backend")
    if requested == "gloo":
        return "gloo", "requested"
    if plan.single_process:
        return "gloo", "single process: no link crosses ranks, so no NCCL communicator is needed"
    workers = [a for a in plan.ranks if not a.server]
    on_cpu = [a.rank for a in workers if not a.device.startswith("cuda")]
    shared = plan.devices_shared()
    problems = []
    if on_cpu:
        problems.append(f"worker rank(s) {_ranks_text(on_cpu)} have no CUDA device")
    for node, device, ranks in shared:
        problems.append(f"ranks {_ranks_text(ranks)} share {device} on node {node}")
    if problems:
        if requested == "nccl":
            raise PlanError("'nccl' needs a CUDA device of its own on every worker rank, but "
                            + "; ".join(problems) + "; use backend: gloo or auto", "backend")
        return "gloo", f"{requested}: " + "; ".join(problems)
    reason = f"{requested}: every worker rank has its own CUDA device"
    cpu_ends = sorted({a.rank for a in plan.ranks if not a.device.startswith("cuda")})
    if cpu_ends:
        reason += f"; links to rank(s) {_ranks_text(cpu_ends)} on the CPU need a gloo group"
    return "nccl", reason


def format_plan(plan: Plan, backend: str = "auto") -> str:
    """A readable table of ``plan`` for ``--dry-run``: ranks, links, backend, notes."""
    lines = [f"pipeline {plan.pipeline!r}: world size {plan.world_size} = {plan.nnodes} node(s) x "
             f"{plan.nproc_per_node} process(es), {plan.gpus_per_node} GPU(s) per node"]

    def replicas(a: RankAssignment) -> str:
        # A replica's device is shown only where it differs from its rank's.
        return ", ".join(p.label + (f" @{p.device}" if p.device != a.device else "") for p in a.stages) or "-"

    header = ("rank", "node", "local", "device", "role", "replicas")
    rows = [(str(a.rank), str(a.node), str(a.local_rank), a.device, a.role, replicas(a)) for a in plan.ranks]
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header) - 1)]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])

    lines.append(f"links ({len(plan.links)}, {sum(link.local for link in plan.links)} local):")
    link_rows = [(link.name, f"rank {link.src_rank} -> {link.dst_rank}", f"{link.src_device} -> {link.dst_device}",
                  "local" if link.local else "") for link in plan.links]
    widths = [max((len(row[c]) for row in link_rows), default=0) for c in range(3)]
    for row in link_rows:
        lines.append(("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]).rstrip())

    try:
        lines.append(f"backend: {plan.backend(backend)} ({plan.backend_reason(backend)})")
    except PlanError as e:
        lines.append(f"backend: unusable: {e}")
    for node, device, ranks in plan.devices_shared():
        lines.append(f"shared GPU: {device} on node {node} is used by ranks {_ranks_text(ranks)}")
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)
