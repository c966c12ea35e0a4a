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
from runtime.availability import StageAvailability, availability_message
from runtime.compose import FRONT_DOOR, RankPart, RunnerPart
from runtime.config import JobConfig
from runtime.control import ControlClient, ControlHub, config_message
from runtime.frontdoor import FrontDoor, OutputSink
from runtime.lifecycle import Lifecycle
from runtime.live_config import LiveConfig
from runtime.live_view import LiveView
from runtime.metrics import StageMetrics, link_snapshot
from runtime.planner import LinkKind
from runtime.session_queue import SessionQueue
from runtime.stage_loop import Fallback, Inlet, Outlet, Router, StageRunner
from stages.base import StageContext
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


def assemble(part: RankPart, config: JobConfig, links: LinkEnds, live: LiveView, lifecycle: Lifecycle,
             health: Callable[[], dict]) -> RankPieces:
    """The control plane's end and, on the server rank, the front end; no runners yet."""
    metrics = {runner.label: StageMetrics(runner.label) for runner in part.runners}
    data_links = {link.name for link in part.links if link.kind is LinkKind.DATA}
    availability = StageAvailability()

    def snapshot() -> dict:
        ends = {}
        for name in data_links:
            ends[name] = [end.stats.snapshot() for end in (links.writers.get(name), links.readers.get(name)) if end]
        return {"rank": part.rank, "role": part.role,
                "stages": {label: m.snapshot() for label, m in metrics.items()},
                "links": {name: link_snapshot(stats) for name, stats in ends.items()},
                "unavailable": availability.local()}

    def on_snapshot(rank: int, snap: dict) -> None:
        front.aggregator.on_snapshot(rank, snap)
        changed = availability.merge_rank(rank, snap.get("unavailable") or {})
        changed |= availability.merge_rank(part.rank, availability.local())  # the server rank's own stages
        if changed:
            hub.broadcast(availability_message(availability.remote()))

    hub = client = front = None
    if part.control is not None and part.control.hub:
        # The hub and the front end need each other (heartbeats feed the aggregator, config
        # changes go out through the hub): the hub's callbacks look ``front`` up when called.
        hub = ControlHub(config=config.control, roles=part.control.roles, lifecycle=lifecycle,
                         ctl={rank: links.writers[name] for rank, name in part.control.sends.items()},
                         status={rank: links.readers[name] for rank, name in part.control.receives.items()},
                         on_snapshot=on_snapshot, on_event=lambda msg: front.sink.deliver_event(msg))
    elif part.control is not None:
        (server_rank, status), = part.control.sends.items()
        client = ControlClient(config=config.control, ctl=links.readers[part.control.receives[server_rank]],
                               status=links.writers[status], live=live, snapshot=snapshot, lifecycle=lifecycle,
                               server=f"rank {server_rank} ({part.control.roles[server_rank]})",
                               on_availability=availability.set_remote)
    def liveness() -> dict[int, tuple[bool, float]]:
        return {part.rank: (lifecycle.failure is None, 0.0), **(hub.liveness() if hub is not None else {})}

    if part.front_door is not None:
        front = _front_end(part, config, live, hub, snapshot, liveness, health, availability)

    def publish_event(msg: Message) -> None:
        if front is not None:
            front.sink.deliver_event(msg)
        elif client is not None:
            client.publish_event(msg)

    return RankPieces(front=front, hub=hub, client=client, snapshot=snapshot, liveness=liveness, metrics=metrics,
                      publish_event=publish_event, availability=availability)


def assemble_runners(part: RankPart, config: JobConfig, links: LinkEnds, pieces: RankPieces, live: LiveView,
                     lifecycle: Lifecycle) -> list[StageRunner]:
    """Every stage of this rank, constructed, with its runner (not started)."""
    return [_runner(r, part, config, links, pieces, live, lifecycle) for r in part.runners]


def _front_end(part: RankPart, config: JobConfig, live: LiveView, hub: ControlHub | None,
               snapshot: Callable[[], dict], liveness: Callable[[], dict[int, tuple[bool, float]]],
               health: Callable[[], dict], availability: StageAvailability) -> FrontEnd:
    inbox = SessionQueue("sessions", config.flow.session_queue_depth) if part.front_door.feeds else None
    roles = part.control.roles if part.control is not None else {part.rank: part.role}
    def unavailable() -> dict[str, str]:
        return {**availability.remote(), **availability.local()}

    aggregator = Aggregator(roles=roles, inbox=inbox, live=live, local_snapshot=snapshot, liveness=liveness,
                            unavailable=unavailable)

    def publish_config(revision: int, settings: RuntimeSettings) -> None:
        if hub is not None:
            hub.broadcast(config_message(revision, settings))

    door = FrontDoor(pipeline=config.pipeline.name, live_config=LiveConfig(config.runtime, config.presets),
                     live_view=live, inbox=inbox, aggregator=aggregator, publish_config=publish_config,
                     health=health)
    server = WebServer(config.server, door)
    sink = OutputSink(server, aggregator, is_open=door.is_open)
    door.session_closed = sink.forget
    return FrontEnd(server=server, door=door, inbox=inbox, sink=sink, aggregator=aggregator)


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
    router = Router(outputs, runner.spec.routing, lifecycle.stopping, fallback, metrics) if outputs else None
    return StageRunner(name=runner.label, stage=stage, inputs=inputs, router=router,
                       max_batch=runner.spec.max_batch, batch_wait_ms=runner.spec.batch_wait_ms, live=live,
                       metrics=metrics, lifecycle=lifecycle, publish_event=pieces.publish_event,
                       availability=pieces.availability, stage_name=runner.spec.name)
