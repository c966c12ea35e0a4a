"""Which stages and stage replicas cannot serve right now, as every rank's routers need to know it.

Two reasons a frame must not go somewhere:

* **A stage says it cannot serve**: up, but unable to do its job (a diffusion stage
  started without a model, a stage waiting for a resource). It says so through
  ``Stage.unavailable()`` (a reason, or None); its runner records that here after setup
  and after every batch. The stage before it routes to the stage's fallback while a
  reason stands (``runtime.router.Router``).
* **A replica is lost**: the rank hosting it died or stalled and the job went on without
  it (``runtime.rank_loss``). Routers skip a lost replica and send to the stage's other
  replicas; a stage with no replica left is also marked as unable to serve ("rank 3
  (diffusion) was lost"), so its frames go to its fallback.

Within one process every runner shares one ``StageAvailability``. Across ranks the
reasons travel on the control plane: each rank's heartbeat carries its own stages'
reasons (``local``), the server rank's hub merges them per rank, adds the lost replicas
and stages, and broadcasts the whole picture whenever it changes (``message``); every
rank applies it (``set_remote``). The server rank merges its own stages' reasons in too.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from comms.message import Kind, Message

AVAILABILITY_OP = "availability"


def availability_message(unavailable: dict[str, str], lost: Iterable[str] = ()) -> Message:
    """The hub's broadcast: stage name -> why it cannot serve (absent = it can), and the
    stage replicas ('generator#1') lost with their rank (the key only when there are any)."""
    meta = {"op": AVAILABILITY_OP, "unavailable": dict(unavailable)}
    lost = sorted(lost)
    if lost:
        meta["lost"] = lost
    return Message(kind=Kind.CONTROL, meta=meta)


class StageAvailability:
    """Thread-safe map of stage name -> reason it cannot serve (local and remote), and the
    set of lost stage replicas."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local: dict[str, str] = {}
        self._remote: dict[str, str] = {}
        self._by_rank: dict[int, dict[str, str]] = {}
        self._gone_stages: dict[str, str] = {}
        """On the server rank: stages with no replica left, and why."""
        self._lost: frozenset[str] = frozenset()

    def set_local(self, stage: str, reason: str | None) -> None:
        """What a stage of this process says about itself (None: it can serve)."""
        with self._lock:
            if reason is None:
                self._local.pop(stage, None)
            else:
                self._local[stage] = str(reason)

    def local(self) -> dict[str, str]:
        """This process's own reasons, for its heartbeat."""
        with self._lock:
            return dict(self._local)

    def set_remote(self, unavailable: dict[str, str], lost: Iterable[str] = ()) -> None:
        """The merged picture the server rank broadcast."""
        with self._lock:
            self._remote = {str(k): str(v) for k, v in unavailable.items()}
            self._lost = frozenset(str(label) for label in lost)

    def merge_rank(self, rank: int, unavailable: dict[str, str]) -> bool:
        """On the server rank: one rank's heartbeat reasons; True if the merged picture
        changed (and should be broadcast)."""
        with self._lock:
            before = self._remote
            self._by_rank[rank] = {str(k): str(v) for k, v in unavailable.items()}
            self._remote = self._merged_remote()
            return self._remote != before

    def mark_lost(self, rank: int, replicas: Iterable[str], gone_stages: dict[str, str]) -> bool:
        """On the server rank: ``rank`` is lost with the stage ``replicas`` it hosted; what
        it said about its stages no longer counts, and ``gone_stages`` (stage -> reason)
        have no replica left. True if the picture changed (and should be broadcast)."""
        with self._lock:
            before = (self._remote, self._lost)
            self._by_rank.pop(rank, None)
            self._gone_stages.update(gone_stages)
            self._lost = self._lost | frozenset(replicas)
            self._remote = self._merged_remote()
            return (self._remote, self._lost) != before

    def message(self) -> Message:
        """The broadcast of the whole picture, as the server rank has it."""
        with self._lock:
            return availability_message(self._remote, self._lost)

    def remote(self) -> dict[str, str]:
        with self._lock:
            return dict(self._remote)

    def lost(self) -> frozenset[str]:
        with self._lock:
            return self._lost

    def is_lost(self, replica: str) -> bool:
        """Whether stage replica ``replica`` ('generator#1') was lost with its rank."""
        return replica in self._lost  # a frozenset swapped whole: no lock needed to read it

    def reason(self, stage: str) -> str | None:
        """Why ``stage`` cannot serve, or None when nothing says it cannot."""
        with self._lock:
            return self._local.get(stage) or self._remote.get(stage)

    def _merged_remote(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for reasons in self._by_rank.values():
            merged.update(reasons)
        merged.update(self._gone_stages)  # a stage with no replica left: that is the reason
        return merged
