"""Per-frame traces across ranks: where each stamp was made, on which clock, as spans.

Every frame carries its trace points (``Message.trace``: ``(name, unix_time)`` pairs,
``"vision.start"``, ``"vision.end"``, ``"server.recv"``...). Rank 0 sees the whole trace
of each frame it delivers; this module turns the newest of them into

* spans: a stage span from ``K.start`` to ``K.end``, and a hop span for every other gap
  (the previous step's end to the next step's start: routing, transport and the wait in
  the next stage's queue; ``K.start`` ends the queue wait of stage K);
* a Chrome trace JSON (``chrome_trace``) that Perfetto and ``chrome://tracing`` open:
  one process per rank, one thread per stage (and per hop into it), complete events;
* OpenTelemetry spans (``runtime.otel_export``), with the same clock correction.

Clocks. A stamp is the wall clock of the rank that made it. Ranks of one machine share
a clock; ranks on other machines differ by whatever NTP left. ``ClockOffsets`` estimates
each rank's offset from its heartbeats: a heartbeat sent at ``s`` (its clock) and received
at ``r`` (rank 0's) gives ``r - s = delay + offset``, and the delay is never negative, so
the minimum over the newest heartbeats bounds the offset from above and approaches it
as the fastest delivery approaches zero. Spans within one rank are exact; a hop between
machines is only as good as that estimate (its error is the smallest heartbeat delivery
time, typically well under a millisecond on a LAN, but NTP error is not corrected by it).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

CLOCK_NOTE = ("Stamps are each rank's wall clock. Ranks on rank 0's node share its clock (offset 0); for the "
              "others the offset is estimated as min(receive - send) over their newest heartbeats, an upper bound "
              "that includes the fastest heartbeat's delivery time, and added to their stamps. Spans within a rank "
              "are exact; hops between nodes are as good as this estimate.")


@dataclass(frozen=True, slots=True)
class FrameTrace:
    """One delivered frame's trace, as rank 0 received it."""

    session: str
    frame_id: int
    generator: str | None
    points: tuple[tuple[str, float], ...]


class TraceRing:
    """The newest ``capacity`` completed traces (bounded memory); thread-safe."""

    def __init__(self, capacity: int = 1000) -> None:
        if capacity < 1:
            raise ValueError(f"trace ring capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._traces: deque[FrameTrace] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def add(self, trace: FrameTrace) -> None:
        with self._lock:
            self._traces.append(trace)

    def newest(self, n: int) -> list[FrameTrace]:
        """Up to ``n`` newest traces, oldest first."""
        with self._lock:
            return list(self._traces)[-n:] if n > 0 else []


# -- spans -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Span:
    kind: str
    """'stage' (``K.start`` to ``K.end``) or 'hop' (any other gap between two stamps)."""
    src: str
    """The stamp prefix the span starts at ('vision' of 'vision.end'; 'server' of 'server.recv')."""
    dst: str
    start: float
    end: float
    waits: bool
    """A hop that ends at a stage's start: its length is that stage's queue wait."""


def stamp_parts(name: str) -> tuple[str, str]:
    """``"vision.start"`` -> ``("vision", "start")``; ``"present"`` -> ``("present", "")``."""
    prefix, _, suffix = name.rpartition(".")
    return (prefix, suffix) if prefix else (name, "")


def frame_spans(points) -> list[Span]:
    """The spans between consecutive trace points (times as stamped, uncorrected)."""
    spans = []
    for (a, ta), (b, tb) in zip(points, points[1:]):
        (pa, sa), (pb, sb) = stamp_parts(a), stamp_parts(b)
        if pa == pb and sa == "start" and sb == "end":
            spans.append(Span("stage", pa, pb, ta, tb, False))
        else:
            spans.append(Span("hop", pa, pb, ta, tb, sb == "start"))
    return spans


# -- where stamps were made ------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RankInfo:
    rank: int
    role: str
    node: str
    """The plan's node index as text ('' before the rank's first heartbeat)."""
    host: str = ""


@dataclass(frozen=True, slots=True)
class Places:
    """Which ranks make which stamps, from the heartbeats' stage lists.

    Stamps are named by stage *kind* (a ``generator``-kind stage named 'stylize' stamps
    'generator.start'); a trace does not say which replica took the frame, so a stage with
    replicas on several ranks maps to all of them."""

    server_rank: int
    ranks: dict[int, RankInfo]
    stages: dict[str, tuple[str, tuple[int, ...]]]
    """Stamp prefix (stage kind) -> (stage name(s), the ranks hosting them)."""

    def of(self, prefix: str) -> tuple[str, tuple[int, ...]]:
        if prefix == "server":
            return "server", (self.server_rank,)
        return self.stages.get(prefix, (prefix, ()))

    def info(self, rank: int) -> RankInfo:
        return self.ranks.get(rank, RankInfo(rank, "?", ""))

    def labels(self, ranks: tuple[int, ...]) -> tuple[str, str, str]:
        """(rank, role, node) label values for a set of ranks: one rank's own, or several
        joined by ',' (a replicated stage whose replica a trace does not name)."""
        infos = [self.info(r) for r in ranks]
        return (",".join(str(i.rank) for i in infos), ",".join(dict.fromkeys(i.role for i in infos)),
                ",".join(dict.fromkeys(i.node for i in infos)))

    @classmethod
    def from_snapshots(cls, server_rank: int, snapshots: dict[int, dict], roles: dict[int, str]) -> "Places":
        ranks = {r: RankInfo(r, role, "") for r, role in roles.items()}
        found: dict[str, tuple[list[str], list[int]]] = {}
        for rank, snap in sorted(snapshots.items()):
            node = snap.get("node")
            ranks[rank] = RankInfo(rank, str(snap.get("role", roles.get(rank, "?"))),
                                   "" if node is None else str(node), str(snap.get("host", "")))
            for label, stage in (snap.get("stages") or {}).items():
                name = str(stage.get("stage") or label.split("#")[0])
                names, where = found.setdefault(str(stage.get("kind") or name), ([], []))
                if name not in names:
                    names.append(name)
                if rank not in where:
                    where.append(rank)
        return cls(server_rank=server_rank, ranks=ranks,
                   stages={k: ("+".join(names), tuple(sorted(where))) for k, (names, where) in found.items()})


# -- clocks ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ClockEstimate:
    offset_s: float
    """Add to the rank's stamps to put them on rank 0's clock."""
    min_one_way_s: float | None
    """min(receive - send) of its newest heartbeats (None: none yet)."""
    samples: int
    same_node: bool

    def as_json(self) -> dict[str, Any]:
        return {"offset_ms": round(1000.0 * self.offset_s, 3),
                "min_one_way_ms": None if self.min_one_way_s is None else round(1000.0 * self.min_one_way_s, 3),
                "samples": self.samples, "same_node": self.same_node,
                "basis": "one clock" if self.same_node else ("heartbeats" if self.samples else "none yet")}


@dataclass
class ClockOffsets:
    """Each rank's clock offset from rank 0's, from heartbeat send and receive times."""

    window: int = 64
    """Heartbeats the minimum is taken over (about 30 s at the default 0.5 s): long enough
    to catch a fast delivery, short enough to follow a clock that drifts or steps."""
    _delays: dict[int, deque[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def observe(self, rank: int, sent_at: float, received_at: float) -> None:
        with self._lock:
            self._delays.setdefault(rank, deque(maxlen=self.window)).append(received_at - sent_at)

    def estimate(self, rank: int, same_node: bool) -> ClockEstimate:
        with self._lock:
            delays = list(self._delays.get(rank, ()))
        low = min(delays) if delays else None
        offset = 0.0 if same_node or low is None else low
        return ClockEstimate(offset, low, len(delays), same_node)


def point_offset(places: Places, clocks: dict[int, ClockEstimate], prefix: str) -> tuple[float, bool]:
    """The clock correction for a stamp with ``prefix``, and whether it is known: the
    hosting rank's offset, or the one offset several hosting ranks share (one node); 0
    and False when the ranks are unknown or disagree."""
    _, ranks = places.of(prefix)
    known = [clocks[r] for r in ranks if r in clocks]
    offsets = {round(c.offset_s, 6) for c in known}
    if ranks and len(known) == len(ranks) and len(offsets) == 1:
        return offsets.pop(), True
    return 0.0, False


@dataclass(frozen=True, slots=True)
class PlacedSpan:
    """A span of one frame with where it ran and its times on rank 0's clock."""

    name: str
    """The stage ('vision') or the hop ('ingest\u2192vision')."""
    kind: str
    start: float
    end: float
    stage: str
    """The stage it belongs to: its own, or for a hop the one it leads into."""
    ranks: tuple[int, ...]
    clock_known: bool
    """Both ends' clock offsets are known (always, for a stage span on one rank)."""
    waits: bool


def placed_spans(frame: FrameTrace, places: Places, clocks: dict[int, ClockEstimate]) -> list[PlacedSpan]:
    """``frame_spans`` of a frame, each put on the rank that ran it and on rank 0's clock."""
    out = []
    for span in frame_spans(frame.points):
        start_offset, start_known = point_offset(places, clocks, span.src)
        end_offset, end_known = point_offset(places, clocks, span.dst)
        stage, ranks = places.of(span.src if span.kind == "stage" else span.dst)
        name = stage if span.kind == "stage" else f"{places.of(span.src)[0]}\u2192{stage}"
        out.append(PlacedSpan(name, span.kind, span.start + start_offset, span.end + end_offset, stage, ranks,
                              start_known and end_known, span.waits))
    return out


# -- Chrome trace JSON -----------------------------------------------------------------

def chrome_trace(frames: list[FrameTrace], places: Places, clocks: dict[int, ClockEstimate],
                 metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The frames' spans as a Chrome trace (``{"traceEvents", "displayTimeUnit",
    "metadata"}``): complete events ("ph": "X", integer µs of the Unix epoch on rank 0's
    clock), one process per rank (a stage whose replicas span ranks gets a process of its
    own), one thread per stage, per hop into a stage and for whole frames on the server
    rank. Frames overlap in a pipeline, and complete events on one thread must nest
    (Perfetto drops the ones that do not), so overlapping spans go to numbered lanes
    ("vision", "vision #2", ...)."""
    spans = []  # (start µs, end µs, name, cat, ranks, thread, args)
    for frame in frames:
        common = {"session": frame.session, "frame_id": frame.frame_id}
        if frame.points:
            (first_name, first), (last_name, last) = frame.points[0], frame.points[-1]
            first += point_offset(places, clocks, stamp_parts(first_name)[0])[0]
            last += point_offset(places, clocks, stamp_parts(last_name)[0])[0]
            spans.append((_us(first), _us(last), f"frame {frame.frame_id}", "frame", (places.server_rank,), "frames",
                          {**common, "generator": frame.generator, "latency_ms": round(1000.0 * (last - first), 3)}))
        for span in placed_spans(frame, places, clocks):
            args = dict(common)
            if span.kind == "hop":
                args["clock_corrected"] = span.clock_known
                if span.waits:
                    args["queue_wait_of"] = span.stage
            spans.append((_us(span.start), _us(span.end), span.name, span.kind, span.ranks, span.name, args))
    tracks = _Tracks(places)
    events = []
    for start, end, name, cat, ranks, thread, args in sorted(spans, key=lambda s: (s[0], -s[1])):
        if end < start:  # clocks that disagree by more than the span: say so, never a negative span
            args = {**args, "negative_us": end - start}
            end = start
        pid, tid = tracks.place(ranks, thread, start, end)
        events.append({"name": name, "cat": cat, "ph": "X", "ts": start, "dur": end - start, "pid": pid, "tid": tid,
                       "args": args})
    meta = {"clock_sync": CLOCK_NOTE, "server_rank": places.server_rank, "frames": len(frames),
            "clock_offsets": {str(r): c.as_json() for r, c in sorted(clocks.items())},
            "ranks": {str(r): {"role": i.role, "node": i.node, "host": i.host} for r, i in sorted(places.ranks.items())},
            "generated_unix_s": round(time.time(), 3), **(metadata or {})}
    return {"traceEvents": tracks.metadata_events() + events, "displayTimeUnit": "ms", "metadata": meta}


def _us(seconds: float) -> int:
    return int(round(seconds * 1e6))


class _Tracks:
    """Chrome pids and tids (a tid per thread name and lane), with the metadata events
    that name them."""

    SHARED_PID = 1_000_000
    """First pid of the processes standing for a stage whose replicas span several ranks."""

    def __init__(self, places: Places) -> None:
        self.places = places
        self._pids: dict[tuple[int, ...], int] = {}
        self._lanes: dict[tuple[int, str], list[int]] = {}
        """(pid, thread) -> the end (µs) of the last span in each of its lanes."""
        self._tids: dict[tuple[int, str, int], int] = {}

    def place(self, ranks: tuple[int, ...], thread: str, start: int, end: int) -> tuple[int, int]:
        """The pid and tid of a span; spans must come in order of their start."""
        key = ranks if ranks else (self.places.server_rank,)
        if key not in self._pids:
            self._pids[key] = key[0] if len(key) == 1 else self.SHARED_PID + len(self._pids)
        pid = self._pids[key]
        lanes = self._lanes.setdefault((pid, thread), [])
        lane = next((i for i, busy_until in enumerate(lanes) if busy_until <= start), len(lanes))
        if lane == len(lanes):
            lanes.append(end)
        lanes[lane] = end
        if (pid, thread, lane) not in self._tids:
            self._tids[pid, thread, lane] = 1 + sum(1 for p, _, _ in self._tids if p == pid)
        return pid, self._tids[pid, thread, lane]

    def metadata_events(self) -> list[dict[str, Any]]:
        events = []
        for ranks, pid in sorted(self._pids.items(), key=lambda kv: kv[1]):
            if len(ranks) == 1:
                info = self.places.info(ranks[0])
                name = f"rank {info.rank} ({info.role})" + (f" node {info.node}" if info.node else "")
            else:
                name = "replicas on ranks " + ", ".join(str(r) for r in ranks)
            events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}})
            events.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
                           "args": {"sort_index": pid}})
        # Threads sort by name then lane, so a stage's lanes sit together.
        order = sorted(self._tids.items(), key=lambda kv: (kv[0][0], kv[1] if kv[0][2] == 0 else
                                                            self._tids[kv[0][0], kv[0][1], 0], kv[0][2]))
        for index, ((pid, thread, lane), tid) in enumerate(order):
            name = thread if lane == 0 else f"{thread} #{lane + 1}"
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}})
            events.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid,
                           "args": {"sort_index": index}})
        return events
