"""Composing one rank: what it runs and how its pieces connect, as plain data.

``compose(plan, rank, config)`` is pure: from the plan (where everything runs, every
link) and the config it returns this rank's part, a ``RankPart``:

* its stage runners, each with the links (or the front door's ends) it reads from and
  writes to, its routing and micro-batching;
* on the server rank, the front door: which replica the page's frames feed and which
  replica's outputs the page shows (either may be absent: a pipeline may begin with a
  source stage and end with a sink);
* its control-plane ends: the hub on the server rank, a client elsewhere;
* every link it is an end of.

Before that, ``check_payloads`` makes sure every stage emits what the next one accepts
and that the pipeline's two ends fit the front door, so a miswired pipeline is refused
with both stage names before a process group exists. ``runtime.assemble`` turns a
``RankPart`` into running objects; ``format_part`` prints it for ``--dry-run``.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import ConfigError
from runtime.config import JobConfig
from runtime.pipeline_config import PipelineConfig, StageSpec
from runtime.planner import Link, LinkKind, Plan
from stages.base import ANY, SAME, Payload
from stages.registry import stage_class
from stages.server.hooks import AUDIO_PCM, CAMERA_JPEG, OUTPUT_JPEG

FRONT_DOOR = "front door"
"""The name a runner's input or output has when it is the page: camera frames or audio
in, or frames shown on the page."""
PAGE_INPUTS = {"camera": CAMERA_JPEG, "audio": AUDIO_PCM}
"""What the page can feed a pipeline, by the name the server and the page use for it."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RunnerPart:
    """One stage replica on this rank."""

    label: str
    """'vision#0': stage name and replica index."""
    spec: StageSpec
    replica: int
    device: str
    accepts: Payload | None
    emits: Payload | None
    """What it takes and makes, as checked against its neighbours (``SAME`` resolved)."""
    inputs: tuple[str, ...]
    """Link names it reads from, or ``FRONT_DOOR``; empty for a source."""
    outputs: tuple[str, ...]
    """Link names it writes to, or ``FRONT_DOOR``; empty for a sink."""
    fallback_outputs: tuple[str, ...] = ()
    """Links to the next stage's fallback: its frames go there whenever the next stage
    cannot take them (``StageSpec.fallback``)."""
    fallback_after_ms: float = 0.0
    """How long a frame waits for the next stage before going to its fallback."""
    next_stage: str | None = None
    """The stage ``outputs`` lead to (whose availability decides the route), if any."""
    next_kind: str | None = None
    """That stage's kind (whose ``directory`` places keys for ``routing: affinity``)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class FrontDoorPart:
    """The page's ends of the pipeline, on the server rank."""

    feeds: str | None
    """The replica the page's camera frames (or audio) go to; None when the pipeline starts with a source."""
    takes: str | None = None
    """What the page sends: 'camera' or 'audio' (a key of ``PAGE_INPUTS``); None with ``feeds``."""
    shows: str | None
    """The replica whose outputs the page shows; None when the pipeline ends in a sink."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ControlPart:
    """This rank's control-plane ends, by peer rank."""

    hub: bool
    """True on the server rank (it fans out config and stop, and watches every rank)."""
    sends: dict[int, str]
    """Link this rank writes to each peer: control links from the hub, a status link from a client."""
    receives: dict[int, str]
    """Link this rank reads from each peer."""
    roles: dict[int, str]
    """Every rank's role, for naming ranks in messages."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RankPart:
    rank: int
    node: int
    role: str
    device: str
    runners: list[RunnerPart]
    front_door: FrontDoorPart | None
    """Only on the server rank."""
    control: ControlPart | None
    """None in a single process: there is no other rank to control."""
    links: list[Link]
    """Every link this rank is an end of (both ends, for an in-process link)."""


class CompositionError(ConfigError):
    """Stages whose payloads do not fit together, or do not fit the front door."""


def compose(plan: Plan, rank: int, config: JobConfig) -> RankPart:
    """What ``rank`` runs under ``plan``; raises ``CompositionError`` for a miswired pipeline."""
    pipeline = config.pipeline
    payloads = check_payloads(pipeline)
    me = plan.ranks[rank]
    specs = {spec.name: spec for spec in pipeline.stages}
    chain = pipeline.chain
    first, last = chain[0].name, chain[-1].name
    # Where each stage's outputs go: the next chain stage (for a fallback: its primary's).
    successor = {a.name: b.name for a, b in zip(chain, chain[1:])}
    for spec in chain:
        if (fallback := pipeline.fallback_of(spec.name)) is not None and spec.name in successor:
            successor[fallback.name] = successor[spec.name]
    data = [link for link in plan.links if link.kind is LinkKind.DATA]
    runners = []
    for placement in me.stages:
        spec = specs[placement.stage]
        accepts, emits = payloads[spec.name]
        inputs = [link.name for link in data
                  if link.dst_stage == spec.name and link.dst_replica == placement.replica]
        mine = [link for link in data if link.src_stage == spec.name and link.src_replica == placement.replica]
        nxt = successor.get(spec.name)
        outputs = [link.name for link in mine if link.dst_stage == nxt]
        nxt_fallback = pipeline.fallback_of(nxt) if nxt is not None else None
        fallback_outputs = [link.name for link in mine
                            if nxt_fallback is not None and link.dst_stage == nxt_fallback.name]
        if spec.name == first and accepts is not None:
            inputs = [FRONT_DOOR]
        if spec.name == last and emits is not None:
            outputs = [FRONT_DOOR]
        runners.append(RunnerPart(label=placement.label, spec=spec, replica=placement.replica,
                                  device=placement.device, accepts=accepts, emits=emits,
                                  inputs=tuple(inputs), outputs=tuple(outputs),
                                  fallback_outputs=tuple(fallback_outputs),
                                  fallback_after_ms=specs[nxt].fallback_after_ms if nxt_fallback else 0.0,
                                  next_stage=nxt, next_kind=specs[nxt].kind if nxt is not None else None))
    front_door = None
    if me.server:
        taken = payloads[first][0]
        front_door = FrontDoorPart(feeds=f"{first}#0" if taken is not None else None,
                                   takes=next((name for name, p in PAGE_INPUTS.items() if p == taken), None),
                                   shows=f"{last}#0" if payloads[last][1] is not None else None)
    return RankPart(rank=rank, node=me.node, role=me.role, device=me.device, runners=runners,
                    front_door=front_door, control=_control_part(plan, rank),
                    links=[link for link in plan.links if rank in (link.src_rank, link.dst_rank)])


def _control_part(plan: Plan, rank: int) -> ControlPart | None:
    if plan.single_process:
        return None
    control = [link for link in plan.links if link.kind is not LinkKind.DATA]
    return ControlPart(
        hub=plan.ranks[rank].server,
        sends={link.dst_rank: link.name for link in control if link.src_rank == rank},
        receives={link.src_rank: link.name for link in control if link.dst_rank == rank},
        roles={a.rank: a.role for a in plan.ranks})


def check_payloads(pipeline: PipelineConfig) -> dict[str, tuple[Payload | None, Payload | None]]:
    """Each stage's (accepted, emitted) payload, after checking that every stage takes what
    the one before it makes, and that the first and last stages fit the front door: the
    first takes the page's camera frames (``CAMERA_JPEG``) or audio (``AUDIO_PCM``), on the
    server rank, or is a source; the last makes frames for the page (``OUTPUT_JPEG``, on the server rank) or is
    a sink. A fallback must take and make what the stage it stands in for does."""
    stages = pipeline.chain
    resolved: dict[str, tuple[Payload | None, Payload | None]] = {}
    flowing: Payload | None = None
    for i, spec in enumerate(stages):
        cls = stage_class(spec.kind)
        accepts, emits = cls.accepts, cls.emits
        where = f"pipeline.stages[{i}].kind"
        if i == 0:
            page_input = next((p for p in PAGE_INPUTS.values() if accepts is not None and p.fits(accepts)), None)
            if accepts is not None and page_input is None:
                raise CompositionError(
                    f"stage {spec.name!r} ({spec.kind}) comes first, so it must take the page's camera frames "
                    f"({CAMERA_JPEG.describe()}) or audio ({AUDIO_PCM.describe()}), or be a source (accept "
                    f"nothing); it accepts {accepts.describe()}", where)
            flowing = page_input
            what = "audio" if page_input is AUDIO_PCM else "camera frames"
            _check_server_end(spec, i, accepts is not None, f"takes the page's {what}")
        elif accepts is None:
            raise CompositionError(
                f"stage {spec.name!r} ({spec.kind}) is a source (accepts nothing), but it follows stage "
                f"{stages[i - 1].name!r}; a source can only come first", where)
        elif flowing is None:
            raise CompositionError(
                f"stage {spec.name!r} ({spec.kind}) accepts {accepts.describe()}, but stage "
                f"{stages[i - 1].name!r} before it is a sink (emits nothing)", where)
        elif not flowing.fits(accepts):
            raise CompositionError(
                f"stage {spec.name!r} ({spec.kind}) accepts {accepts.describe()}, but stage "
                f"{stages[i - 1].name!r} before it emits {flowing.describe()}", where)
        taken = flowing if accepts is ANY else accepts
        flowing = taken if emits is SAME else emits
        resolved[spec.name] = (taken, flowing)
    last = stages[-1]
    if flowing is not None:
        if not flowing.fits(OUTPUT_JPEG):
            raise CompositionError(
                f"stage {last.name!r} ({last.kind}) comes last, so it must make frames for the page "
                f"({OUTPUT_JPEG.describe()}) or be a sink (emit nothing); it emits {flowing.describe()}",
                f"pipeline.stages[{len(stages) - 1}].kind")
        _check_server_end(last, len(stages) - 1, True, "shows its frames on the page")
    for i, spec in enumerate(pipeline.stages):
        if spec.fallback is None:
            continue
        fallback = pipeline.stage(spec.fallback)
        cls = stage_class(fallback.kind)
        taken, made = resolved[spec.name]
        accepts = taken if cls.accepts is ANY else cls.accepts
        emits = accepts if cls.emits is SAME else cls.emits
        if accepts is None or emits is None or not taken.fits(accepts) or not emits.fits(made):
            raise CompositionError(
                f"stage {fallback.name!r} ({fallback.kind}) is the fallback of {spec.name!r}, so it must take "
                f"{taken.describe()} and make {made.describe()}; it takes "
                f"{accepts.describe() if accepts else 'nothing'} and makes {emits.describe() if emits else 'nothing'}",
                f"pipeline.stages[{i}].fallback")
        resolved[fallback.name] = (taken, made)
    return resolved


def _check_server_end(spec: StageSpec, index: int, at_front_door: bool, what: str) -> None:
    if at_front_door and spec.placement != "server":
        raise CompositionError(f"stage {spec.name!r} {what}, so it must run on the server rank next to the web "
                               "server: set placement: server", f"pipeline.stages[{index}].placement")


def format_part(part: RankPart) -> str:
    """What one rank runs, for ``--dry-run``."""
    lines = [f"rank {part.rank} ({part.role}) on node {part.node}, {part.device}:"]
    if part.front_door is not None:
        feeds = part.front_door.feeds or "nothing (the pipeline starts with a source)"
        shows = part.front_door.shows or "nothing (the pipeline ends in a sink)"
        what = {"audio": "audio", None: "frames"}.get(part.front_door.takes, "frames")
        lines.append(f"  front door: web server; the page's {what} feed {feeds}; the page shows {shows}")
    for runner in part.runners:
        takes = runner.accepts.describe() if runner.accepts else "nothing (source)"
        makes = runner.emits.describe() if runner.emits else "nothing (sink)"
        lines.append(f"  {runner.label} ({runner.spec.kind} on {runner.device}): {takes} -> {makes}")
        lines.append(f"    in:  {', '.join(runner.inputs) or '-'}")
        routing = f" (routing: {runner.spec.routing})" if len(runner.outputs) > 1 else ""
        lines.append(f"    out: {', '.join(runner.outputs) or '-'}{routing}")
        if runner.fallback_outputs:
            wait = (f"after {runner.fallback_after_ms:g} ms without a credit" if runner.fallback_after_ms
                    else "when it has no credit free")
            lines.append(f"    fallback: {', '.join(runner.fallback_outputs)} ({runner.next_stage} unavailable, "
                         f"or {wait})")
    if part.control is not None:
        side = "control hub" if part.control.hub else "control client"
        lines.append(f"  {side}: sends {', '.join(part.control.sends.values())}; "
                     f"receives {', '.join(part.control.receives.values())}")
    return "\n".join(lines)
