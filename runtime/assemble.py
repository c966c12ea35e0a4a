"""Turning one rank's ``RankPart`` into the objects that run it.

Nothing is started here. ``assemble`` builds the control plane's hub or client and, on
the server rank, the front end (web server, front door, inbox, output sink, live
config, aggregator); ``assemble_runners`` then builds every stage (its class from the
registry, its config, a context) with its runner wired to the link ends or the front
door's ends the part names. Two steps, so that a stage that fails to construct can
still be reported to the other ranks by a control plane that already runs.
``RankRuntime`` only starts, watches and stops what these return.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from comms.links import LinkEnds
from comms.message import Message
from core.settings import RuntimeSettings
from runtime.aggregate import Aggregator
from runtime.affinity import Affinity, collect_reports, deliver_command
from runtime.availability import StageAvailability
from runtime.compose import FRONT_DOOR, RankPart, RunnerPart
from runtime.config import JobConfig
from runtime.control import ControlClient, ControlHub, config_message
from runtime.frontdoor import FrontDoor, JobStatus, ModelService, OutputSink
from runtime.lifecycle import Lifecycle
from runtime.live_config import LiveConfig
from runtime.live_view import LiveView
from runtime.gpu_stats import GpuSampler
from runtime.metrics import LinkSource, RankSnapshot, StageMetrics, StageSource
from runtime.planner import LinkKind
from runtime.rank_loss import Hosting, RankLoss, Restarts
from runtime.session_queue import SessionQueue
from runtime.stage_loop import Fallback, Inlet, Outlet, Router, StageRunner
from stages.base import Catalog, Stage, StageContext
from stages.registry import stage_class
from stages.server.ws_server import WebServer


@dataclass(kw_only=True, slots=True)
class FrontEnd:
    """The server rank's web front: the server and what it talks to."""

    server: WebServer
    door: FrontDoor
    inbox: SessionQueue | None
    """The first stage's inlet; None when the pipeline starts with a source."""
    sink: OutputSink
    """The last stage's outlet (when the page shows frames) and the route of stages' events."""
    aggregator: Aggregator
    status: JobStatus
    """What the pages are told when the job loses a rank."""


@dataclass(kw_only=True, slots=True)
class RankPieces:
    front: FrontEnd | None
    hub: ControlHub | None
    client: ControlClient | None
    snapshot: Callable[[], dict]
    """This rank's stage and link metrics, as heartbeats carry them."""
    liveness: Callable[[], dict[int, tuple[bool, float]]]
    """Rank -> (alive, seconds since last heard of): this rank, and on the server rank every rank."""
    metrics: dict[str, StageMetrics]
    """Per stage replica, filled by its runner."""
    publish_event: Callable[[Message], None]
    """Where a stage's notice for a session goes: the page, or the server rank."""
    availability: StageAvailability = field(default_factory=StageAvailability)
    """Which stages cannot serve: this process's own, and the other ranks' via the control plane."""
    runners: list[StageRunner] = field(default_factory=list)
    """Built by ``assemble_runners``."""
    stages: dict[tuple[str, int], Stage] = field(default_factory=dict)
    """This process's stage replicas by (stage name, replica), filled by ``assemble_runners``:
    their reports ride the heartbeats, commands for them are handed over here."""
    affinity: Affinity | None = None
    """On the server rank, when a stage routes by affinity: the directories of the stages it reaches."""


def assemble(part: RankPart, config: JobConfig, links: LinkEnds, live: LiveView, lifecycle: Lifecycle,
             health: Callable[[], dict], hosting: Hosting | None = None, restarts: Restarts = Restarts()) -> RankPieces:
    """The control plane's end and, on the server rank, the front end; no runners yet.
    ``hosting`` (who hosts what, from the plan) lets the server rank's hub go on without
    a lost rank (``runtime.rank_loss``); without it every loss fails the job. ``restarts``
    says whether torchrun will restart a failed job, for what the pages are told."""
    metrics = {runner.label: StageMetrics(runner.label) for runner in part.runners}
    data_links = {link.name: link for link in part.links if link.kind is LinkKind.DATA}
    availability = StageAvailability()
    local_stages: dict[tuple[str, int], Stage] = {}  # filled by assemble_runners

    def queues() -> dict[str, int]:
        inbox = front.inbox if front is not None else None
        return {inbox.name: inbox.queued()} if inbox is not None else {}

    snapshot = RankSnapshot(
        rank=part.rank, role=part.role, node=part.node, pipeline=config.pipeline.name,
        stages={r.label: StageSource(r.spec.name, r.spec.kind, metrics[r.label]) for r in part.runners},
        links={name: LinkSource(link.src_rank, link.dst_rank, links.writers.get(name), links.readers.get(name))
               for name, link in data_links.items()},
        gpus=GpuSampler([part.device, *(runner.device for runner in part.runners)]), queues=queues,
        unavailable=availability.local, reports=lambda: collect_reports(local_stages))
    """What a heartbeat carries (``runtime.metrics.RankSnapshot``)."""

    def on_snapshot(rank: int, snap: dict) -> None:
        front.aggregator.on_snapshot(rank, snap)
        if affinity is not None:
            affinity.on_reports(snap.get("reports") or {})
        changed = availability.merge_rank(rank, snap.get("unavailable") or {})
        changed |= availability.merge_rank(part.rank, availability.local())  # the server rank's own stages
        if changed:
            hub.broadcast(availability.message())

    hub = client = front = None
    if part.control is not None and part.control.hub:
        # The hub and the front end need each other (heartbeats feed the aggregator, config
        # changes go out through the hub): the hub's callbacks look ``front`` up when called.
        on_lost = None
        if hosting is not None:
            on_lost = RankLoss(hosting=hosting, policy=config.control.on_rank_loss, restarts=restarts,
                               availability=availability, broadcast=lambda msg: hub.broadcast(msg),
                               announce=lambda *status: front.status.announce(*status), lifecycle=lifecycle)
        hub = ControlHub(config=config.control, roles=part.control.roles, lifecycle=lifecycle,
                         ctl={rank: links.writers[name] for rank, name in part.control.sends.items()},
                         status={rank: links.readers[name] for rank, name in part.control.receives.items()},
                         on_snapshot=on_snapshot, on_event=lambda msg: front.sink.deliver_event(msg),
                         on_lost=on_lost)
    elif part.control is not None:
        (server_rank, status), = part.control.sends.items()
        client = ControlClient(config=config.control, ctl=links.readers[part.control.receives[server_rank]],
                               status=links.writers[status], live=live, snapshot=snapshot, lifecycle=lifecycle,
                               server=f"rank {server_rank} ({part.control.roles[server_rank]})",
                               on_availability=availability.set_remote,
                               on_command=lambda meta: deliver_command(local_stages, meta))
    def liveness() -> dict[int, tuple[bool, float]]:
        return {part.rank: (lifecycle.failure is None, 0.0), **(hub.liveness() if hub is not None else {})}

    affinity = _affinity(part, config, hub, local_stages)
    if part.front_door is not None:
        front = _front_end(part, config, live, hub, snapshot, liveness, health, availability, affinity)

    def publish_event(msg: Message) -> None:
        if front is not None:
            front.sink.deliver_event(msg)
        elif client is not None:
            client.publish_event(msg)

    return RankPieces(front=front, hub=hub, client=client, snapshot=snapshot, liveness=liveness, metrics=metrics,
                      publish_event=publish_event, availability=availability, stages=local_stages,
                      affinity=affinity)


def assemble_runners(part: RankPart, config: JobConfig, links: LinkEnds, pieces: RankPieces, live: LiveView,
                     lifecycle: Lifecycle) -> list[StageRunner]:
    """Every stage of this rank, constructed, with its runner (not started)."""
    runners = [_runner(r, part, config, links, pieces, live, lifecycle) for r in part.runners]
    for part_runner, runner in zip(part.runners, runners):
        pieces.stages[part_runner.spec.name, part_runner.replica] = runner.stage
    return runners


def _affinity(part: RankPart, config: JobConfig, hub: ControlHub | None,
              local_stages: dict[tuple[str, int], Stage]) -> Affinity | None:
    """The directories of the stages this rank's runners reach by ``routing: affinity``."""
    directories = {}
    for runner in part.runners:
        if runner.spec.routing != "affinity" or runner.next_stage is None or runner.next_stage in directories:
            continue
        target = config.pipeline.stage(runner.next_stage)
        directory = stage_class(target.kind).directory(config.stage_config(target), len(runner.outputs))
        if directory is None:
            raise ValueError(f"stage {runner.spec.name!r} routes by affinity, but stage {target.name!r} "
                             f"({target.kind}) keeps no directory of what its replicas hold; use another routing")
        directories[runner.next_stage] = directory
    if not directories:
        return None
    return Affinity(directories, local_stages=lambda: local_stages,
                    send=hub.broadcast if hub is not None else lambda msg: None)

def _front_end(part: RankPart, config: JobConfig, live: LiveView, hub: ControlHub | None,
               snapshot: Callable[[], dict], liveness: Callable[[], dict[int, tuple[bool, float]]],
               health: Callable[[], dict], availability: StageAvailability, affinity: Affinity | None) -> FrontEnd:
    takes = part.front_door.takes or "camera"
    depth = config.flow.audio_queue_depth if takes == "audio" else config.flow.session_queue_depth
    inbox = SessionQueue("sessions", depth) if part.front_door.feeds else None
    roles = part.control.roles if part.control is not None else {part.rank: part.role}
    def unavailable() -> dict[str, str]:
        return {**availability.remote(), **availability.local()}

    aggregator = Aggregator(roles=roles, inbox=inbox, live=live, local_snapshot=snapshot, liveness=liveness,
                            unavailable=unavailable)

    def publish_config(revision: int, settings: RuntimeSettings) -> None:
        if hub is not None:
            hub.broadcast(config_message(revision, settings))

    models = None
    if affinity is not None:
        (stage, _), = affinity.directories.items()  # one keyed stage per pipeline today
        models = ModelService(stage=stage, affinity=affinity)
    door = FrontDoor(pipeline=config.pipeline.name, live_config=LiveConfig(config.runtime, config.presets),
                     live_view=live, inbox=inbox, aggregator=aggregator, publish_config=publish_config,
                     health=health, takes=takes, catalog=_catalog(config), models=models)
    server = WebServer(config.server, door)
    sink = OutputSink(server, aggregator, is_open=door.is_open)
    door.session_closed = sink.forget
    status = JobStatus(server)
    door.status = status.current
    return FrontEnd(server=server, door=door, inbox=inbox, sink=sink, aggregator=aggregator, status=status)


def _catalog(config: JobConfig) -> Catalog | None:
    """What sessions may select: the avatars, when a stage kind of the pipeline offers a
    catalog (``Stage.catalog``)."""
    for spec in config.pipeline.chain:
        catalog = stage_class(spec.kind).catalog(config.stage_config(spec))
        if catalog is not None:
            return catalog
    return None


def _runner(runner: RunnerPart, part: RankPart, config: JobConfig, links: LinkEnds, pieces: RankPieces,
            live: LiveView, lifecycle: Lifecycle) -> StageRunner:
    front, metrics = pieces.front, pieces.metrics[runner.label]
    inputs: list[Inlet] = [front.inbox if name == FRONT_DOOR else links.readers[name] for name in runner.inputs]
    outputs: list[Outlet] = [front.sink if name == FRONT_DOOR else links.writers[name] for name in runner.outputs]
    fallback = None
    if runner.fallback_outputs:
        fallback = Fallback(outlets=[links.writers[name] for name in runner.fallback_outputs],
                            stage=runner.next_stage, wait_s=runner.fallback_after_ms / 1000.0,
                            availability=pieces.availability)
    context = StageContext(rank=part.rank, role=part.role, replica=runner.replica,
                           device=torch.device(runner.device), logger=logging.getLogger(f"stages.{runner.label}"),
                           runtime=live.get, publish_event=pieces.publish_event)
    stage = stage_class(runner.spec.kind)(config.stage_config(runner.spec), context)
    placer = None
    if runner.spec.routing == "affinity" and pieces.affinity is not None and runner.next_stage is not None:
        placer = pieces.affinity.placer(runner.next_stage)
    # Which replica each outlet leads to, so the router skips those the hub declared lost.
    replica_of = {link.name: f"{link.dst_stage}#{link.dst_replica}"
                  for link in part.links if link.kind is LinkKind.DATA}
    availability = pieces.availability

    def gone(outlet: str) -> bool:
        return outlet in replica_of and availability.is_lost(replica_of[outlet])

    router = (Router(outputs, runner.spec.routing, lifecycle.stopping, fallback, metrics, placer, gone=gone,
                     name=runner.label) if outputs else None)
    return StageRunner(name=runner.label, stage=stage, inputs=inputs, router=router,
                       max_batch=runner.spec.max_batch, batch_wait_ms=runner.spec.batch_wait_ms, live=live,
                       metrics=metrics, lifecycle=lifecycle, publish_event=pieces.publish_event,
                       availability=pieces.availability, stage_name=runner.spec.name)
