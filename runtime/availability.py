"""Which stages cannot serve right now, as every rank's routers need to know it.

A stage may be up and still unable to do its job: a diffusion stage started without a
model, a stage waiting for a resource. It says so through ``Stage.unavailable()`` (a
reason, or None); its runner records that here after setup and after every batch. The
stage before it routes to the stage's fallback while a reason stands
(``stage_loop.Router``).

Within one process every runner shares one ``StageAvailability``. Across ranks the
reasons travel on the control plane: each rank's heartbeat carries its own stages'
reasons (``local``), the server rank's hub merges them per rank and broadcasts the
merged map whenever it changes (``availability_message``), and every rank applies it
(``set_remote``). The server rank merges its own stages' reasons in too. A dead rank
ends the job today, so "dead" never needs a reason of its own here.
"""

from __future__ import annotations

import threading

from comms.message import Kind, Message

AVAILABILITY_OP = "availability"


def availability_message(unavailable: dict[str, str]) -> Message:
    """The hub's broadcast: stage name -> why it cannot serve (absent = it can)."""
    return Message(kind=Kind.CONTROL, meta={"op": AVAILABILITY_OP, "unavailable": dict(unavailable)})


class StageAvailability:
    """Thread-safe map of stage name -> reason it cannot serve, local and remote."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local: dict[str, str] = {}
        self._remote: dict[str, str] = {}
        self._by_rank: dict[int, dict[str, str]] = {}

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

    def set_remote(self, unavailable: dict[str, str]) -> None:
        """The merged map the server rank broadcast."""
        with self._lock:
            self._remote = {str(k): str(v) for k, v in unavailable.items()}

    def merge_rank(self, rank: int, unavailable: dict[str, str]) -> bool:
        """On the server rank: one rank's heartbeat reasons; True if the merged map changed
        (and should be broadcast)."""
        with self._lock:
            before = self._merged_remote()
            self._by_rank[rank] = {str(k): str(v) for k, v in unavailable.items()}
            self._remote = self._merged_remote()
            return self._remote != before

    def remote(self) -> dict[str, str]:
        with self._lock:
            return dict(self._remote)

    def reason(self, stage: str) -> str | None:
        """Why ``stage`` cannot serve, or None when nothing says it cannot."""
        with self._lock:
            return self._local.get(stage) or self._remote.get(stage)

    def _merged_remote(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for reasons in self._by_rank.values():
            merged.update(reasons)
        return merged
