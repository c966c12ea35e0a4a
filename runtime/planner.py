"""Rank planning: which rank runs which stage replicas on which device, and every link.

``plan(pipeline, world_size, nnodes, gpus_per_node, transport)`` is a pure function of
the pipeline config, the torchrun layout and the transport settings, so every rank
computes the same plan without talking to the others, and ``--dry-run`` prints it
without starting any process. It is the one place that decides

* where things run: ranks are laid out node-major like torchrun (``node = rank //
  nproc_per_node``); the server rank runs the web server and the stages placed on the
  server; worker stages get ranks of their own, fixed replica counts first, then
  'auto' stages share the ranks left over. A world of one runs everything in one process.
* every link, data and control alike, with the transport that carries it and the
  backend of its payloads: in-process when both ends share a rank, a same-host socket
  with shared memory between two ranks of one node, torch.distributed between nodes or
  GPUs (NCCL when both ends have a CUDA device of their own, gloo otherwise).

Every replica of stage i is linked to every replica of stage i+1 (how a stage spreads
its outputs over those links is its ``routing``); the server rank has a control link to
every other rank and a status link back from each.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from itertools import pairwise

from comms.config import BACKENDS, TransportConfig
from comms.link_spec import Transport
from core.config import ConfigError
from runtime.pipeline_config import PipelineConfig, StageSpec

SERVER_ROLE = "server"
_SERVER_RANK = 0
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


class LinkKind(StrEnum):
    DATA = "data"
    """Stage replica to the next stage's replica."""
    CONTROL = "control"
    """The server rank to a rank: live config and stop."""
    STATUS = "status"
    """A rank to the server rank: heartbeats with metrics, events, why it leaves."""


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
    """Where this replica computes: 'cpu' or 'cuda:N'. On the server rank a server stage
    may stay on the CPU while a worker stage shares the rank's GPU (single-process mode)."""

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
    """Whether this rank runs the web server and the control hub."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Link:
    """One directed link, and how it travels."""

    name: str
    """Unique within a plan: 'vision#0->generator#1' for data, 'control:0->2', 'status:2->0'."""
    kind: LinkKind
    src_rank: int
    dst_rank: int
    src_device: str
    dst_device: str
    transport: Transport
    backend: str | None
    """What carries a torch link's payloads, 'gloo' or 'nccl'; None for the other transports."""
    src_stage: str | None = None
    """Data links: the stage replica at each end (None on control and status links)."""
    src_replica: int | None = None
    dst_stage: str | None = None
    dst_replica: int | None = None

    @property
    def local(self) -> bool:
        """Both ends in one process: an in-process queue carries it."""
        return self.transport is Transport.IN_PROCESS

    def describe_transport(self) -> str:
        return f"{self.transport} ({self.backend})" if self.backend else str(self.transport)


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
    """Data links by chain position, source replica, destination replica; then the
    control and status links of each rank."""
    backend: str
    """The default process group's backend: 'gloo', or 'nccl' (with a gloo side for CPU)."""
    backend_reason: str
    """Why ``backend`` is what it is, in one line."""
    notes: list[str]
    """Adjustments the planner made that the user should know about."""

    @property
    def single_process(self) -> bool:
        return self.world_size == 1

    def stage_ranks(self, stage: str) -> list[int]:
        """The rank of each replica of ``stage``, indexed by replica."""
        found = sorted((p.replica, a.rank) for a in self.ranks for p in a.stages if p.stage == stage)
        if not found:
            raise KeyError(f"no stage named {stage!r} in plan {self.pipeline!r}")
        return [rank for _, rank in found]

    def devices_shared(self) -> list[tuple[int, str, list[int]]]:
        """GPUs that more than one rank of a node would use, as (node, device, ranks);
        empty when every rank has its own. NCCL refuses two ranks on one GPU."""
        return _devices_shared(self.ranks)


def plan(config: PipelineConfig, world_size: int, nnodes: int = 1, gpus_per_node: int = 0,
         transport: TransportConfig | None = None) -> Plan:
    """Lay ``config`` out on ``world_size`` ranks over ``nnodes`` nodes; pure, deterministic."""
    transport = transport or TransportConfig()
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
        server = rank == _SERVER_RANK
        gpu = next((p.device for p in stages if p.device != "cpu"), None)
        role = "+".join(([SERVER_ROLE] if server else []) + [p.stage for p in stages])
        ranks.append(RankAssignment(rank=rank, node=rank // nproc_per_node, local_rank=rank % nproc_per_node,
                                    device=gpu or "cpu", stages=stages, role=role, server=server))

    backend, reason = _choose_backend(ranks, world_size, transport.backend)
    links = _data_links(config, stage_ranks, placements, ranks, backend, transport)
    links += _control_links(ranks, backend, transport)
    return Plan(pipeline=config.name, world_size=world_size, nnodes=nnodes, nproc_per_node=nproc_per_node,
                gpus_per_node=gpus_per_node, ranks=ranks, links=links, backend=backend, backend_reason=reason,
                notes=notes)


# ------------------------------------------------------------------------ links

def _data_links(config: PipelineConfig, stage_ranks: dict[str, list[int]],
                placements: dict[tuple[str, int], StagePlacement], ranks: list[RankAssignment],
                backend: str, transport: TransportConfig) -> list[Link]:
    links = []
    for src, dst in pairwise(config.stages):
        for src_replica, src_rank in enumerate(stage_ranks[src.name]):
            for dst_replica, dst_rank in enumerate(stage_ranks[dst.name]):
                src_device = placements[src.name, src_replica].device
                dst_device = placements[dst.name, dst_replica].device
                carrier, payloads = _carrier(ranks[src_rank], ranks[dst_rank], src_device, dst_device,
                                             backend, transport)
                links.append(Link(
                    name=f"{src.name}#{src_replica}->{dst.name}#{dst_replica}", kind=LinkKind.DATA,
                    src_rank=src_rank, dst_rank=dst_rank, src_device=src_device, dst_device=dst_device,
                    transport=carrier, backend=payloads, src_stage=src.name, src_replica=src_replica,
                    dst_stage=dst.name, dst_replica=dst_replica))
    return links


def _control_links(ranks: list[RankAssignment], backend: str, transport: TransportConfig) -> list[Link]:
    """A control link from the server rank to every other rank and a status link back:
    small JSON messages, always on the CPU."""
    server = next(a for a in ranks if a.server)
    links = []
    for other in ranks:
        if other.server:
            continue
        for kind, src, dst in ((LinkKind.CONTROL, server, other), (LinkKind.STATUS, other, server)):
            carrier, payloads = _carrier(src, dst, "cpu", "cpu", backend, transport)
            links.append(Link(name=f"{kind}:{src.rank}->{dst.rank}", kind=kind, src_rank=src.rank,
                              dst_rank=dst.rank, src_device="cpu", dst_device="cpu", transport=carrier,
                              backend=payloads))
    return links


def _carrier(src: RankAssignment, dst: RankAssignment, src_device: str, dst_device: str, backend: str,
             transport: TransportConfig) -> tuple[Transport, str | None]:
    """The transport of one link and, for a torch link, its payload backend."""
    if src.rank == dst.rank:
        return Transport.IN_PROCESS, None
    # NCCL only where the process group has it and both ends compute on a GPU; a CPU
    # end (the server's codecs, the control plane) needs gloo.
    payloads = "nccl" if backend == "nccl" and _is_cuda(src_device) and _is_cuda(dst_device) else "gloo"
    # Same-host links use abstract Unix sockets and memfd segments, which are Linux's;
    # both ends must also share a network namespace, which ranks of one torchrun node do.
    if src.node == dst.node and payloads == "gloo" and transport.shared_memory and sys.platform == "linux":
        return Transport.SAME_HOST, None
    return Transport.TORCH, payloads


def _is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def _devices_shared(ranks: list[RankAssignment]) -> list[tuple[int, str, list[int]]]:
    users: dict[tuple[int, str], list[int]] = {}
    for a in ranks:
        if _is_cuda(a.device):
            users.setdefault((a.node, a.device), []).append(a.rank)
    return [(node, device, ranks) for (node, device), ranks in sorted(users.items()) if len(ranks) > 1]


def _choose_backend(ranks: list[RankAssignment], world_size: int, requested: str) -> tuple[str, str]:
    """'nccl' when every worker rank has a CUDA device of its own (and it was not refused),
    else 'gloo'; with the reason in one line."""
    if requested not in BACKENDS:
        raise PlanError(f"got {requested!r}; allowed: {', '.join(map(repr, BACKENDS))}", "backend")
    if requested == "gloo":
        return "gloo", "requested"
    if world_size == 1:
        return "gloo", "single process: no link crosses ranks, so no NCCL communicator is needed"
    on_cpu = [a.rank for a in ranks if not a.server and not _is_cuda(a.device)]
    problems = []
    if on_cpu:
        problems.append(f"worker rank(s) {_ranks_text(on_cpu)} have no CUDA device")
    for node, device, sharing in _devices_shared(ranks):
        problems.append(f"ranks {_ranks_text(sharing)} share {device} on node {node}")
    if problems:
        if requested == "nccl":
            raise PlanError("'nccl' needs a CUDA device of its own on every worker rank, but "
                            + "; ".join(problems) + "; use backend: gloo or auto", "backend")
        return "gloo", f"{requested}: " + "; ".join(problems)
    reason = f"{requested}: every worker rank has its own CUDA device"
    cpu_ends = sorted(a.rank for a in ranks if not _is_cuda(a.device))
    if cpu_ends:
        reason += f"; links to rank(s) {_ranks_text(cpu_ends)} on the CPU use gloo"
    return "nccl", reason


# ---------------------------------------------------------------- placing stages

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


def _stage_device(spec: StageSpec, local_rank: int, gpus_per_node: int) -> str:
    # 'auto' keeps server stages on the CPU: they are codecs next to the web server, and
    # leaving the server rank off the GPU keeps every GPU for the worker ranks.
    wants_gpu = spec.device == "cuda" or (spec.device == "auto" and spec.placement == "worker")
    if wants_gpu and gpus_per_node > 0:
        return f"cuda:{local_rank % gpus_per_node}"
    return "cpu"


def _single_process(config: PipelineConfig) -> tuple[dict[str, list[int]], list[str]]:
    notes = ["single-process mode: every stage runs on rank 0"]
    forced = [f"{s.name} ({s.replicas})" for s in config.stages if s.replicas != 1]
    if forced:
        notes.append("replicas forced to 1: " + ", ".join(forced))
    ignored = [s.name for s in config.stages
               if s.nodes is not None or (s.ranks is not None and s.ranks != [_SERVER_RANK])]
    if ignored:
        notes.append("nodes/ranks constraints ignored: " + ", ".join(ignored))
    return {spec.name: [_SERVER_RANK] for spec in config.stages}, notes


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
            stage_ranks[spec.name] = [_SERVER_RANK]
        elif spec.ranks is not None:
            _check_pinned(config, i, spec, world_size, node_of)
            stage_ranks[spec.name] = list(spec.ranks)

    pinned = {rank for ranks in stage_ranks.values() for rank in ranks}
    free = {node: [r for r in range(world_size) if node_of[r] == node and r not in pinned and r != _SERVER_RANK]
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
        if rank == _SERVER_RANK and not config.share_server_rank:
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
    demand = [(f"rank {_SERVER_RANK}: " + ", ".join([SERVER_ROLE] + server_stages), 1, None)]
    workers_pinned = sorted(pinned - {_SERVER_RANK})
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
    where = f"node {nodes[0]}" if len(nodes) == 1 else f"nodes {_ranks_text(nodes)}"
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
    where = ", ".join(f"{r} (node {node_of[r]})" for r in idle) if nnodes > 1 else _ranks_text(idle)
    return (f"rank(s) {where} would sit idle: the stages use {used} of {world_size} ranks and none has "
            f"replicas: auto; {suggestion}")


def _ranks_text(ranks: Iterable[int]) -> str:
    return ", ".join(str(r) for r in ranks)


# ------------------------------------------------------------------------ output

def format_plan(plan: Plan) -> str:
    """A readable table of ``plan`` for ``--dry-run``: ranks, backend, every link, notes."""
    lines = [f"pipeline {plan.pipeline!r}: world size {plan.world_size} = {plan.nnodes} node(s) x "
             f"{plan.nproc_per_node} process(es), {plan.gpus_per_node} GPU(s) per node"]

    def replicas(a: RankAssignment) -> str:
        # A replica's device is shown only where it differs from its rank's.
        return ", ".join(p.label + (f" @{p.device}" if p.device != a.device else "") for p in a.stages) or "-"

    rows = [(str(a.rank), str(a.node), str(a.local_rank), a.device, a.role, replicas(a)) for a in plan.ranks]
    lines += _table(("rank", "node", "local", "device", "role", "replicas"), rows)
    lines.append(f"process group: {plan.backend} ({plan.backend_reason})")
    for node, device, ranks in plan.devices_shared():
        lines.append(f"shared GPU: {device} on node {node} is used by ranks {_ranks_text(ranks)}")

    counts = {kind: sum(link.kind is kind for link in plan.links) for kind in LinkKind}
    lines.append(f"links ({len(plan.links)}: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()) + "):")
    rows = [(link.kind, link.name, f"{link.src_rank} -> {link.dst_rank}", f"{link.src_device} -> {link.dst_device}",
             link.describe_transport()) for link in plan.links]
    lines += ["  " + row for row in _table(("kind", "link", "ranks", "devices", "transport"), rows)]
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header) - 1)]
    return [("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]).rstrip()
            for row in [header, *rows]]
