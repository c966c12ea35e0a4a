"""When a worker rank is lost: can the job go on without it, and what do the pages hear?

The control hub finds a rank dead (its status link broke), stalled (no heartbeat for
``liveness_timeout_s``) or failed (it left saying why). What happens next depends on
what the rank hosted (``decide``, pure, from the plan alone):

* **degrade**: every stage replica it hosted can be served some other way — another
  live replica of the same stage, the stage's fallback on a live rank, or (for a lost
  fallback) the stage it stands in for. The job goes on: the lost replicas, and any
  stage with no replica left, are marked in ``StageAvailability`` and broadcast, so
  every rank's routers skip them and divert; every page gets a ``status`` message
  (``degraded``) saying what happened and what it means.
* **fail**: nothing can take the lost rank's frames (the only replica of a stage
  without a fallback), or ``control.on_rank_loss`` is ``fail``. The pages hear it
  (``restarting`` when torchrun will restart the workers, else ``stopping``), then the
  job fails as before (exit 1), so that ``torchrun --max-restarts N`` restarts it.

A rank lost before the job was ready always fails it (``ControlHub``): a replica that
cannot even start is a problem to see, not to route around. The server rank is never
"lost": it is the hub; its own loss ends every rank (``ControlClient``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from comms.message import Message
from runtime.availability import StageAvailability
from runtime.lifecycle import Lifecycle
from runtime.pipeline_config import PipelineConfig
from runtime.planner import Plan

log = logging.getLogger(__name__)

LOSS_POLICIES = ("degrade", "fail")
"""``control.on_rank_loss``: go on without a rank when its work can be served elsewhere, or always fail."""
CAUSES = ("died", "stalled", "failed")


@dataclass(frozen=True, kw_only=True, slots=True)
class Restarts:
    """How many times torchrun restarts the workers (``--max-restarts``), and how many it did."""

    done: int = 0
    allowed: int = 0
    shared_store: bool = False
    """torchrun shares its rendezvous store with the workers (its default), and keeps it
    across restarts: a restarted worker may read the first run's addresses from it and
    fail to connect (pytorch/pytorch#135712). ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in
    torchrun's environment gives every run a store of its own."""

    @property
    def left(self) -> int:
        return max(0, self.allowed - self.done)

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> Restarts:
        """What torchrun's elastic agent tells its workers; none outside torchrun."""
        def number(name: str) -> int:
            try:
                return max(0, int(env.get(name, "0")))
            except ValueError:
                return 0

        return cls(done=number("TORCHELASTIC_RESTART_COUNT"), allowed=number("TORCHELASTIC_MAX_RESTARTS"),
                   shared_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True")

    def problem(self) -> str | None:
        """Why torchrun's restarts may not work, and what to do; None when they can."""
        if not (self.allowed and self.shared_store):
            return None
        return (f"torchrun --max-restarts {self.allowed}: start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                "in its environment, or restarted ranks may read the first run's addresses from torchrun's "
                "shared store and never connect (pytorch/pytorch#135712)")

    def ending(self) -> tuple[str, str]:
        """(state, words) for a job that fails now."""
        if self.left:
            return "restarting", f"the job is restarting (torchrun restart {self.done + 1} of {self.allowed})"
        return "stopping", "the job is stopping" + (" (no torchrun restarts left)" if self.allowed else "")


@dataclass(frozen=True, kw_only=True, slots=True)
class Hosting:
    """Who hosts what, as the plan says: all a loss decision needs."""

    replicas: dict[int, tuple[tuple[str, int], ...]]
    """Rank -> the (stage, replica) it hosts, in chain order."""
    roles: dict[int, str]
    fallbacks: dict[str, str]
    """Stage -> its fallback stage (``StageSpec.fallback``)."""

    @classmethod
    def of(cls, plan: Plan, pipeline: PipelineConfig) -> Hosting:
        return cls(replicas={a.rank: tuple((p.stage, p.replica) for p in a.stages) for a in plan.ranks},
                   roles={a.rank: a.role for a in plan.ranks},
                   fallbacks={s.name: s.fallback for s in pipeline.stages if s.fallback})

    def describe(self, rank: int) -> str:
        return f"rank {rank} ({self.roles.get(rank, '?')})"

    def live_ranks(self, stage: str, lost: frozenset[int]) -> list[int]:
        return sorted(r for r, hosted in self.replicas.items() if r not in lost and any(s == stage for s, _ in hosted))

    def primary_of(self, fallback: str) -> str | None:
        return next((stage for stage, f in self.fallbacks.items() if f == fallback), None)


@dataclass(frozen=True, kw_only=True, slots=True)
class Loss:
    """What one lost rank means for the job."""

    rank: int
    cause: str
    degrade: bool
    """The job goes on without the rank."""
    state: str
    """What the pages are told: 'degraded', 'restarting' or 'stopping'."""
    message: str
    """For the pages and the log: what happened and what it means."""
    replicas: tuple[str, ...] = ()
    """The stage replicas lost with the rank ('generator#1')."""
    gone_stages: dict[str, str] | None = None
    """Stages with no live replica left -> why (their fallback serves them)."""


def decide(hosting: Hosting, rank: int, cause: str, lost: frozenset[int], *, policy: str = "degrade",
           restarts: Restarts = Restarts()) -> Loss:
    """Whether the job can go on without ``rank`` (lost for ``cause``), given every rank
    lost so far (``lost``, ``rank`` included)."""
    if policy not in LOSS_POLICIES:
        raise ValueError(f"on_rank_loss {policy!r}; allowed: {', '.join(LOSS_POLICIES)}")
    if cause not in CAUSES:
        raise ValueError(f"cause {cause!r}; allowed: {', '.join(CAUSES)}")
    lost = lost | {rank}
    who = f"{hosting.describe(rank)} {cause}"
    hosted = hosting.replicas.get(rank, ())
    labels = tuple(f"{stage}#{replica}" for stage, replica in hosted)
    state, ending = restarts.ending()
    if policy == "fail":
        return Loss(rank=rank, cause=cause, degrade=False, state=state, replicas=labels,
                    message=f"{who} and control.on_rank_loss is 'fail'; {ending}")
    covers, gone = [], {}
    for stage in dict.fromkeys(stage for stage, _ in hosted):
        cover = _cover(hosting, stage, lost)
        if cover is None:
            return Loss(rank=rank, cause=cause, degrade=False, state=state, replicas=labels,
                        message=f"{who} and nothing else can serve {stage!r}; {ending}")
        covers.append(cover)
        if not hosting.live_ranks(stage, lost):
            gone[stage] = f"{hosting.describe(rank)} was lost"
    if not covers:  # it hosted no stage (nothing to lose)
        covers.append("it hosted no stage")
    return Loss(rank=rank, cause=cause, degrade=True, state="degraded", replicas=labels, gone_stages=gone,
                message=f"{who}; " + "; ".join(covers))


def _cover(hosting: Hosting, stage: str, lost: frozenset[int]) -> str | None:
    """How ``stage``'s frames are served without the lost ranks, in words; None: they are not."""
    live = hosting.live_ranks(stage, lost)
    if live:
        return f"its {stage!r} frames go to {_ranks(live)}"
    fallback = hosting.fallbacks.get(stage)
    if fallback is not None and hosting.live_ranks(fallback, lost):
        return f"serving the fallback {fallback!r} instead of {stage!r}"
    primary = hosting.primary_of(stage)
    if primary is not None and hosting.live_ranks(primary, lost):
        return f"{primary!r} takes every frame (its fallback {stage!r} is gone)"
    return None


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


class RankLoss:
    """The server rank's response to a lost rank (``ControlHub``'s ``on_lost``): decide,
    tell the pages, and then either mark what was lost for every rank's routers or fail
    the job."""

    def __init__(self, *, hosting: Hosting, policy: str, restarts: Restarts, availability: StageAvailability,
                 broadcast: Callable[[Message], None], announce: Callable[[str, str, list[dict]], None],
                 lifecycle: Lifecycle) -> None:
        self.hosting = hosting
        self.policy = policy
        self.restarts = restarts
        self.availability = availability
        self.broadcast = broadcast
        self.announce = announce
        """(state, message, lost ranks) to every page: ``FrontDoor.announce``."""
        self.lifecycle = lifecycle
        self._lost: list[dict] = []
        self._lock = threading.Lock()

    def __call__(self, rank: int, cause: str, reason: str) -> None:
        """``rank`` was lost for ``cause``; ``reason`` says how, in full (for the log)."""
        with self._lock:  # one loss at a time: the second decision counts the first
            self._lost.append({"rank": rank, "role": self.hosting.roles.get(rank, "?"), "cause": cause})
            lost_ranks = frozenset(entry["rank"] for entry in self._lost)
            loss = decide(self.hosting, rank, cause, lost_ranks, policy=self.policy, restarts=self.restarts)
            lost = [dict(entry) for entry in self._lost]
        if loss.degrade:
            log.warning("%s; the job goes on degraded: %s", reason, loss.message)
            self.lifecycle.note_loss(loss.message)
            if self.availability.mark_lost(rank, loss.replicas, loss.gone_stages or {}):
                self.broadcast(self.availability.message())
        else:
            log.error("%s", loss.message)
        self.announce(loss.state, loss.message, lost)
        if not loss.degrade:
            self.lifecycle.fail(reason)
