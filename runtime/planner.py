"""Rank planning: which rank runs which stage replicas on which device, and every link.

``plan(pipeline, world_size, nnodes, gpus_per_node, transport)`` is a pure function of
the pipeline config, the torchrun layout and the transport settings, so every rank
computes the same plan without talking to the others, and ``--dry-run`` prints it
without starting any process. It is the one place that decides

* where things run (``runtime.placement``): ranks node-major like torchrun, the server
  rank with the web server and the stages placed on the server, every worker replica on
  a rank of its own; a world of one runs everything in one process.
* every link, data and control alike, with the transport that carries it and the
  backend of its payloads: in-process when both ends share a rank, a same-host socket
  with shared memory between two ranks of one node, a TCP connection between two nodes,
  and torch.distributed where a payload travels between GPUs (NCCL when both ends have
  a CUDA device of their own, gloo where one end is on the CPU; or between nodes, when
  ``transport.between_nodes`` is 'gloo').

Every replica of stage i is linked to every replica of stage i+1 (how a stage spreads
its outputs over those links is its ``routing``); the server rank has a control link to
every other rank and a status link back from each.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import StrEnum
from itertools import pairwise

from comms.config import BACKENDS, TransportConfig
from comms.link_spec import Transport
from runtime.pipeline_config import PipelineConfig, StageSpec
from runtime.placement import SERVER_RANK, SERVER_ROLE, PlanError, place_stages, ranks_text, stage_device


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
    stage_ranks, notes = place_stages(config, world_size, nnodes, gpus_per_node)
    nproc_per_node = world_size // nnodes

    placements: dict[tuple[str, int], StagePlacement] = {}
    hosted: dict[int, list[StagePlacement]] = {rank: [] for rank in range(world_size)}
    for spec in config.stages:
        for replica, rank in enumerate(stage_ranks[spec.name]):
            device = stage_device(spec, rank % nproc_per_node, gpus_per_node)
            placement = StagePlacement(stage=spec.name, kind=spec.kind, replica=replica, device=device)
            placements[spec.name, replica] = placement
            hosted[rank].append(placement)

    ranks = []
    for rank in range(world_size):
        stages = hosted[rank]
        server = rank == SERVER_RANK
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
    for src, dst in _data_edges(config):
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


def _data_edges(config: PipelineConfig) -> list[tuple[StageSpec, StageSpec]]:
    """Every (from, to) stage pair data flows along: the chain, plus each fallback wired
    like the stage it stands in for (from that stage's predecessor, to its successor)."""
    edges = []
    for src, dst in pairwise(config.chain):
        edges.append((src, dst))
        if (dst_fallback := config.fallback_of(dst.name)) is not None:
            edges.append((src, dst_fallback))
        if (src_fallback := config.fallback_of(src.name)) is not None:
            edges.append((src_fallback, dst))
    return edges


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
    # Between nodes, CPU payloads take a TCP connection of their own rather than gloo:
    # the same bytes on the wire, without gloo's receiving thread and hand-off.
    if src.node != dst.node and payloads == "gloo" and transport.between_nodes == "tcp":
        return Transport.TCP, None
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
        problems.append(f"worker rank(s) {ranks_text(on_cpu)} have no CUDA device")
    for node, device, sharing in _devices_shared(ranks):
        problems.append(f"ranks {ranks_text(sharing)} share {device} on node {node}")
    if problems:
        if requested == "nccl":
            raise PlanError("'nccl' needs a CUDA device of its own on every worker rank, but "
                            + "; ".join(problems) + "; use backend: gloo or auto", "backend")
        return "gloo", f"{requested}: " + "; ".join(problems)
    reason = f"{requested}: every worker rank has its own CUDA device"
    cpu_ends = sorted(a.rank for a in ranks if not _is_cuda(a.device))
    if cpu_ends:
        reason += f"; links to rank(s) {ranks_text(cpu_ends)} on the CPU use gloo"
    return "nccl", reason


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
        lines.append(f"shared GPU: {device} on node {node} is used by ranks {ranks_text(ranks)}")

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
