"""Which lip-sync replica holds, or should hold, which avatar's model (server rank).

The lip-sync stage runs as N replicas (one per GPU rank), each with its own
``ModelRegistry``. A request for an avatar should go where its model already is: a load
costs hundreds of milliseconds and a second copy costs memory on another device. The
server's ``ModelDirectory`` decides that from two sources:

* the replicas' reports (``ModelRegistry.report()``: ``{"stats": ..., "models": ...}``),
  which say what each one holds, is loading, or failed to load;
* its own assignments: an avatar it placed on a replica whose reports have not yet shown
  it. Between a placement and the report that shows the load, further requests for the
  avatar must follow the first one, or one avatar would be loaded on every replica.

``route`` goes by affinity first (a replica holding the avatar, then the assigned one,
then one where it failed recently: the error comes back at once instead of a fresh load
elsewhere), and only places an avatar nobody holds, by the configured policy:

* ``round_robin``: replicas in turn;
* ``least_loaded``: the smallest share of its capacity used (bytes reported plus the
  known size of avatars assigned but not yet reported), then the fewest models, then the
  most credits (free request slots the caller passes), then the lowest index;
* ``preferred``: a per-avatar replica from the config; ``least_loaded`` for others, and
  for a preferred replica that does not exist (fewer ranks than the config assumed).

An assignment is forgotten when a later report contradicts it: the replica saw requests
for the avatar (its request count grew) or once held it, and now neither holds nor is
loading it (evicted, expired, unloaded). It is also forgotten if ``unconfirmed_reports``
reports pass without the avatar showing up (a session that closed before its first
frame). The next request then places the avatar anew. Pure bookkeeping: no I/O, no
threads, thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

PLACEMENTS = ("round_robin", "least_loaded", "preferred")

UNCONFIRMED_REPORTS = 3
"""Reports from a replica after which an assignment it never confirmed is dropped."""


@dataclass(slots=True, frozen=True)
class _Model:
    """One line of a replica's ``models`` report."""
    resident: bool
    loading: bool
    failed: str | None  # error text while the replica still refuses to retry, else None
    nbytes: int | None
    requests: int

    @property
    def held(self) -> bool:
        return self.resident or self.loading


@dataclass(slots=True)
class _Replica:
    """The last report of one replica."""
    capacity_bytes: int | None = None
    used_bytes: int = 0
    models: dict[str, _Model] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    reports: int = 0
    reported_at: float | None = None

    def resident_count(self) -> int:
        return sum(1 for m in self.models.values() if m.resident)


@dataclass(slots=True)
class _Assignment:
    replica: int
    requests_seen: int  # the avatar's request count in the replica's last report when assigned
    reports_seen: int  # the replica's report count when assigned
    confirmed: bool = False  # a report has shown it held (or failed) there


class ModelDirectory:
    """Routing of avatars to lip-sync replicas; see the module docstring."""

    def __init__(self, replicas: int, *, placement: str = "least_loaded", preferred: Mapping[str, int] | None = None,
                 unconfirmed_reports: int = UNCONFIRMED_REPORTS, clock: Callable[[], float] = time.monotonic):
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"model directory replicas must be an int >= 1, got {replicas!r}")
        if placement not in PLACEMENTS:
            raise ValueError(f"model placement must be one of {', '.join(PLACEMENTS)}; got {placement!r}")
        preferred = dict(preferred or {})
        for avatar, replica in preferred.items():
            if not isinstance(avatar, str) or isinstance(replica, bool) or not isinstance(replica, int):
                raise TypeError(f"model preferred must map avatar ids to replica indices, got {avatar!r}: {replica!r}")
        if isinstance(unconfirmed_reports, bool) or not isinstance(unconfirmed_reports, int) or unconfirmed_reports < 1:
            raise ValueError(f"model directory unconfirmed_reports must be an int >= 1, got {unconfirmed_reports!r}")
        self.replicas = replicas
        self.placement = placement
        self.preferred = preferred
        self.unconfirmed_reports = unconfirmed_reports
        # Preferences naming a replica that does not exist: placed by least_loaded, shown in snapshot().
        self.ignored_preferences = {a: r for a, r in preferred.items() if not 0 <= r < replicas}
        self._clock = clock
        self._lock = threading.Lock()
        self._views = [_Replica() for _ in range(replicas)]
        self._assigned: dict[str, _Assignment] = {}
        self._next = 0  # round robin

    # ---- routing --------------------------------------------------------------------

    def route(self, avatar: str, credits: list[int] | None = None) -> int:
        """The replica for a request of ``avatar``: affinity first, else a placement by policy
        (remembered, so the avatar's next requests follow). ``credits``: free request slots
        per replica, a tie-break for ``least_loaded``."""
        self._check_credits(credits)
        with self._lock:
            replica = self._affinity(avatar, credits)
            if replica is None:
                replica = self._place(avatar, credits)
                self._assign(avatar, replica)
            return replica

    def placement_for_load(self, avatar: str) -> int:
        """The replica an explicit load of ``avatar`` should go to: where it already is, else
        a placement by the same policy (remembered, so requests follow the preload)."""
        return self.route(avatar)

    def holders(self, avatar: str) -> list[int]:
        """Replicas that hold, are loading, or were assigned ``avatar``: the targets of an
        explicit unload."""
        with self._lock:
            found = {r for r, view in enumerate(self._views) if (m := view.models.get(avatar)) and m.held}
            if avatar in self._assigned:
                found.add(self._assigned[avatar].replica)
            return sorted(found)

    def forget(self, avatar: str) -> None:
        """Drop ``avatar``'s assignment (after an explicit unload): its next request is placed anew."""
        with self._lock:
            self._assigned.pop(avatar, None)

    # ---- reports --------------------------------------------------------------------

    def update(self, replica: int, report: Mapping[str, Any]) -> None:
        """Take ``replica``'s report, ``{"stats": registry.stats(), "models": registry.list()}``
        (``ModelRegistry.report()``); it replaces that replica's previous one, and the
        assignments it contradicts are forgotten."""
        self._check_replica(replica)
        stats = dict(report.get("stats") or {})
        models = {}
        for line in report.get("models") or []:
            if not isinstance(line, Mapping) or not isinstance(line.get("id"), str):
                raise TypeError(f"model report of replica {replica}: each model needs a string 'id', got {line!r}")
            retry_in = line.get("retry_in_s")
            models[line["id"]] = _Model(
                resident=bool(line.get("resident")), loading=bool(line.get("loading")),
                failed=line.get("failed") if line.get("failed") and retry_in is not None and retry_in > 0 else None,
                nbytes=line.get("bytes"), requests=int(line.get("requests") or 0))
        with self._lock:
            view = _Replica(capacity_bytes=stats.get("capacity_bytes"), used_bytes=int(stats.get("used_bytes") or 0),
                            models=models, stats=stats, reports=self._views[replica].reports + 1,
                            reported_at=self._clock())
            self._views[replica] = view
            for avatar, assignment in list(self._assigned.items()):
                if assignment.replica != replica:
                    continue
                model = models.get(avatar)
                if model is not None and (model.held or model.failed):
                    assignment.confirmed = True
                    assignment.requests_seen = model.requests
                    continue
                requests = model.requests if model is not None else 0
                if (assignment.confirmed or requests > assignment.requests_seen
                        or view.reports - assignment.reports_seen >= self.unconfirmed_reports):
                    del self._assigned[avatar]

    def snapshot(self) -> dict[str, Any]:
        """For ``GET /models`` and the page: per replica its capacity, use and models; per
        avatar where it is ('resident' / 'loading' / 'failed' / 'assigned')."""
        with self._lock:
            now = self._clock()
            replicas, avatars = [], {}
            for r, view in enumerate(self._views):
                replicas.append({
                    "replica": r, "capacity_bytes": view.capacity_bytes, "used_bytes": view.used_bytes,
                    "resident": sorted(a for a, m in view.models.items() if m.resident),
                    "loading": sorted(a for a, m in view.models.items() if m.loading),
                    "failed": {a: m.failed for a, m in sorted(view.models.items()) if m.failed},
                    "assigned": sorted(a for a, s in self._assigned.items() if s.replica == r and not s.confirmed),
                    "reported_s_ago": None if view.reported_at is None else now - view.reported_at,
                    "stats": dict(view.stats)})
                for avatar, model in view.models.items():
                    if model.held or model.failed:
                        state = "resident" if model.resident else "loading" if model.loading else "failed"
                        avatars.setdefault(avatar, {"replicas": [], "states": []})
                        avatars[avatar]["replicas"].append(r)
                        avatars[avatar]["states"].append(state)
            result = {}
            for avatar in sorted(set(avatars) | set(self._assigned)):
                found = avatars.get(avatar, {"replicas": [], "states": []})
                assignment = self._assigned.get(avatar)
                state = next((s for s in ("resident", "loading", "failed") if s in found["states"]), "assigned")
                result[avatar] = {"replicas": found["replicas"], "state": state,
                                  "assigned": assignment.replica if assignment is not None else None}
            return {"placement": self.placement, "replicas": replicas, "avatars": result,
                    "ignored_preferences": dict(self.ignored_preferences)}

    # ---- internals (the lock is held) ---------------------------------------------

    def _affinity(self, avatar: str, credits: list[int] | None) -> int | None:
        holding = [r for r, view in enumerate(self._views) if (m := view.models.get(avatar)) and m.held]
        assignment = self._assigned.get(avatar)
        if holding:
            if assignment is not None and assignment.replica in holding:
                return assignment.replica
            replica = min(holding, key=lambda r: self._load_key(r, credits, self._capacities_known()))
            self._assign(avatar, replica, confirmed=True)
            return replica
        if assignment is not None:
            return assignment.replica
        failed = [r for r, view in enumerate(self._views) if (m := view.models.get(avatar)) and m.failed]
        if failed:
            self._assign(avatar, failed[0], confirmed=True)
            return failed[0]
        return None

    def _place(self, avatar: str, credits: list[int] | None) -> int:
        if self.placement == "round_robin":
            replica = self._next % self.replicas
            self._next += 1
            return replica
        if self.placement == "preferred" and avatar in self.preferred and avatar not in self.ignored_preferences:
            return self.preferred[avatar]
        known = self._capacities_known()
        return min(range(self.replicas), key=lambda r: self._load_key(r, credits, known))

    def _assign(self, avatar: str, replica: int, confirmed: bool = False) -> None:
        view = self._views[replica]
        model = view.models.get(avatar)
        self._assigned[avatar] = _Assignment(replica, model.requests if model is not None else 0, view.reports,
                                             confirmed)

    def _capacities_known(self) -> bool:
        return all(isinstance(v.capacity_bytes, int) and v.capacity_bytes > 0 for v in self._views)

    def _load_key(self, replica: int, credits: list[int] | None, by_share: bool) -> tuple:
        """Sort key of ``least_loaded``: bytes (as a share of capacity when every replica has
        reported one), counting avatars assigned but not yet reported, then models, then credits."""
        view = self._views[replica]
        pending = [a for a, s in self._assigned.items()
                   if s.replica == replica and not ((m := view.models.get(a)) and m.held)]
        used = view.used_bytes + sum(self._known_bytes(a) for a in pending)
        load = used / view.capacity_bytes if by_share else used
        return (load, view.resident_count() + len(pending), -(credits[replica] if credits else 0), replica)

    def _known_bytes(self, avatar: str) -> int:
        sizes = [m.nbytes for v in self._views if (m := v.models.get(avatar)) and isinstance(m.nbytes, int)]
        return max(sizes, default=0)

    def _check_replica(self, replica: int) -> None:
        if isinstance(replica, bool) or not isinstance(replica, int) or not 0 <= replica < self.replicas:
            raise ValueError(f"replica must be an index in 0..{self.replicas - 1}, got {replica!r}")

    def _check_credits(self, credits: list[int] | None) -> None:
        if credits is not None and len(credits) != self.replicas:
            raise ValueError(f"credits must list one number per replica ({self.replicas}), got {len(credits)}")
