"""Counters, latency samples and histograms: per stage, per link, and per frame trace.

Every rank keeps ``StageMetrics`` for its stage replicas; channels keep their own
``LinkStats``. ``RankSnapshot`` turns both (with queue depths, GPU figures and stage
reports) into the plain data each heartbeat ships to rank 0, where ``Aggregator`` merges
them with the per-frame traces that complete there into the ``stats`` message, the
Prometheus page (``runtime.prometheus``) and the traces (``runtime.tracing``).

Two kinds of latency figure, for two readers: a ``Window`` of the newest samples gives
the page its percentiles; a ``Histogram`` counts every sample since start into fixed
buckets, which is what Prometheus needs to aggregate across ranks and over time. A
histogram travels in a heartbeat as one short list (``Histogram.wire``): because its
counts are cumulative since the rank started, a scrape on rank 0 is consistent no
matter how many heartbeats it missed.
"""

from __future__ import annotations

import bisect
import math
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from runtime.gpu_stats import GpuSampler

PERCENTILES = (50, 95, 99)

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
"""Upper bounds (s) of every latency histogram's buckets; +Inf follows. One set for all,
so stage, hop and frame latencies can share a dashboard axis, and a snapshot need not
repeat them per histogram (it names them once, ``snapshot["buckets"]``)."""


def percentiles(samples) -> dict[str, float]:
    """p50/p95/p99 of ``samples`` (ms) plus count; empty dict when there are none."""
    if len(samples) == 0:
        return {}
    values = np.percentile(np.asarray(samples, dtype=np.float64), PERCENTILES)
    out = {f"p{p}": round(float(v), 3) for p, v in zip(PERCENTILES, values)}
    out["count"] = len(samples)
    return out


class Window:
    """A thread-safe ring of the newest samples (bounded memory)."""

    def __init__(self, size: int = 512) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        with self._lock:
            self._samples.append(value)

    def values(self) -> list[float]:
        with self._lock:
            return list(self._samples)


class Histogram:
    """Counts of observations per bucket and their sum, cumulative since start; thread-safe.

    Bucket ``i`` counts values ``<= bounds[i]`` and ``> bounds[i-1]`` (Prometheus' ``le``);
    the last one counts what is above every bound (+Inf).
    """

    def __init__(self, bounds: tuple[float, ...] = SECONDS_BUCKETS) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError(f"histogram bounds must be strictly increasing and non-empty, got {bounds!r}")
        self.bounds = tuple(float(b) for b in bounds)
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float, n: int = 1) -> None:
        """``n`` observations of ``value`` (a batch's per-frame time counts once per frame).
        NaN and negative values (a clock that stepped back) are not observed."""
        if not value >= 0.0 or n <= 0:
            return
        i = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self._counts[i] += n
            self._sum += value * n

    def observe_many(self, values) -> None:
        for v in values:
            self.observe(v)

    def wire(self) -> list:
        """``[sum, count_0, ..., count_last]``: per-bucket (not cumulative) counts after the
        sum, for a heartbeat (JSON). ``from_wire`` reads it back."""
        with self._lock:
            return [round(self._sum, 6), *self._counts]

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self._counts)


@dataclass(frozen=True, slots=True)
class HistogramData:
    """A histogram as rank 0 holds it after a heartbeat: what Prometheus exposes."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    """Per bucket, the last one for +Inf."""
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``[(upper bound, observations <= it), ..., (inf, all)]``: Prometheus' buckets."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts):
            running += n
            out.append((bound, running))
        return out

    @classmethod
    def from_wire(cls, wire, bounds: tuple[float, ...] = SECONDS_BUCKETS) -> "HistogramData":
        """The inverse of ``Histogram.wire``; raises ``ValueError`` for a list that does not
        fit ``bounds`` (a rank running other code) rather than exposing wrong buckets."""
        if not isinstance(wire, (list, tuple)) or len(wire) != len(bounds) + 2:
            raise ValueError(f"a histogram over {len(bounds)} bounds is a list of {len(bounds) + 2} numbers "
                             f"(sum, then a count per bucket and +Inf), got {wire!r}")
        total, counts = wire[0], wire[1:]
        if not isinstance(total, (int, float)) or not all(isinstance(c, int) and c >= 0 for c in counts):
            raise ValueError(f"histogram sum must be a number and counts non-negative ints, got {wire!r}")
        return cls(bounds=tuple(bounds), counts=tuple(counts), sum=float(total))

    @classmethod
    def of(cls, histogram: Histogram) -> "HistogramData":
        return cls.from_wire(histogram.wire(), histogram.bounds)


class HopFeed:
    """A link's hop latencies as a cumulative histogram, fed from the reader's ``LinkStats``.

    The channel keeps only a ring of its newest latencies and a count of every message
    received; each ``update`` takes the samples that arrived since the last one (all of
    them unless more than the ring holds arrived in between, then the newest the ring
    still has, so the histogram's count can lag ``messages_received`` but never lies
    about a sample)."""

    def __init__(self) -> None:
        self.histogram = Histogram()
        self._seen = 0
        self._lock = threading.Lock()

    def update(self, received: int, latencies_ms: list[float]) -> list:
        with self._lock:
            new = received - self._seen
            if new < 0:  # a fresh channel behind the same name: start counting again
                new = received
            self._seen = received
            if new > 0:
                self.histogram.observe_many(ms / 1000.0 for ms in latencies_ms[-new:])
        return self.histogram.wire()


class RateMeter:
    """Events per second over a sliding window of ``horizon_s`` seconds."""

    def __init__(self, horizon_s: float = 2.0) -> None:
        self._times: deque[float] = deque()
        self._horizon = horizon_s
        self._lock = threading.Lock()

    def tick(self, n: int = 1, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._times.extend([now] * n)
            self._trim(now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            return len(self._times) / self._horizon

    def _trim(self, now: float) -> None:
        while self._times and now - self._times[0] > self._horizon:
            self._times.popleft()


@dataclass
class StageMetrics:
    """What one stage replica did: frames, batches, compute time, drops."""

    name: str
    frames_in: int = 0
    frames_out: int = 0
    batches: int = 0
    flushed: int = 0
    """Frames dropped because the live config changed after they were captured."""
    errors: int = 0
    diverted_saturated: int = 0
    """Outputs sent to the next stage's fallback because it had no credit free in time."""
    diverted_unavailable: int = 0
    """Outputs sent to the next stage's fallback because it said it cannot serve."""
    compute_ms: Window = field(default_factory=Window)
    """Compute time per frame (batch time divided by batch size; for a source, by what it made)."""
    compute_s: Histogram = field(default_factory=Histogram)
    """The same per-frame compute time, every frame since start (once per frame of a batch)."""
    batch_sizes: Window = field(default_factory=Window)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_batch(self, n_in: int, n_out: int, seconds: float) -> None:
        with self._lock:
            self.frames_in += n_in
            self.frames_out += n_out
            self.batches += 1
        if n_in or n_out:
            per_frame = seconds / (n_in or n_out)
            self.compute_ms.add(1000.0 * per_frame)
            self.compute_s.observe(per_frame, n_in or n_out)
        if n_in:
            self.batch_sizes.add(n_in)

    def count(self, what: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + n)

    def snapshot(self) -> dict:
        sizes = self.batch_sizes.values()
        with self._lock:
            return {
                "frames_in": self.frames_in,
                "frames_out": self.frames_out,
                "batches": self.batches,
                "flushed": self.flushed,
                "errors": self.errors,
                "diverted": {"saturated": self.diverted_saturated, "unavailable": self.diverted_unavailable},
                "compute_ms": percentiles(self.compute_ms.values()),
                "mean_batch": round(sum(sizes) / len(sizes), 2) if sizes else 0.0,
                "compute_s": self.compute_s.wire(),
            }


def link_snapshot(ends: list[dict], feed: HopFeed | None = None) -> dict:
    """One link's figures from the LinkStats snapshots of the ends this rank holds (the
    writer counts what it sent, the reader what it received and each hop's latency),
    with the latency samples reduced to percentiles and, when this rank reads the link
    and keeps its ``feed``, to the cumulative histogram ``hop_s`` (wire form)."""
    out: dict = {}
    samples: list[float] = []
    received = 0
    for stats in ends:
        out.update({k: v for k, v in stats.items() if k != "hop_latencies_ms" and v})
        samples += stats.get("hop_latencies_ms", [])
        received += stats.get("messages_received", 0)
    out["hop_ms"] = percentiles(samples)
    if feed is not None:
        out["hop_s"] = feed.update(received, samples)
    return out


@dataclass(frozen=True, slots=True)
class StageSource:
    """One stage replica of a rank, for its snapshot."""

    name: str
    kind: str
    metrics: StageMetrics


@dataclass(frozen=True, slots=True)
class LinkSource:
    """One data link of a rank: the ends this rank holds (a writer, a reader, or both)."""

    src_rank: int
    dst_rank: int
    writer: Any = None
    reader: Any = None


class RankSnapshot:
    """Builds the snapshot a rank's heartbeat carries (and rank 0 reads of itself)::

        {"rank", "role", "node", "host", "pipeline", "buckets": [bounds, s],
         "stages": {label: {...StageMetrics.snapshot(), "compute_s": wire, "stage", "kind"}},
         "links": {name: {...counters, "hop_ms": percentiles, "hop_s": wire (reader's rank), "src", "dst"}},
         "queues": {name: depth}, "gpus": [{"gpu", "util", "used", "total"}],
         "unavailable": {...}, "reports": {stage: {replica: report}}, "sent_at": unix s}

    Histograms are cumulative since the rank started, so rank 0's figures never depend
    on how many heartbeats arrived; ``sent_at`` is taken last, just before the heartbeat
    goes out (rank 0 estimates this rank's clock offset from it)."""

    def __init__(self, *, rank: int, role: str, node: int, pipeline: str, stages: dict[str, StageSource],
                 links: dict[str, LinkSource], gpus: GpuSampler | None = None,
                 queues: Callable[[], dict[str, int]] = dict, unavailable: Callable[[], dict] = dict,
                 reports: Callable[[], dict] = dict) -> None:
        self.identity = {"rank": rank, "role": role, "node": node, "host": socket.gethostname(),
                         "pipeline": pipeline, "buckets": list(SECONDS_BUCKETS)}
        self.stages = stages
        self.links = links
        self._feeds = {name: HopFeed() for name, link in links.items() if link.reader is not None}
        self.gpus = gpus
        self._queues, self._unavailable, self._reports = queues, unavailable, reports

    def __call__(self) -> dict[str, Any]:
        stages = {label: {**src.metrics.snapshot(), "stage": src.name, "kind": src.kind}
                  for label, src in self.stages.items()}
        links, queues = {}, {}
        for name, link in self.links.items():
            ends = [end.stats.snapshot() for end in (link.writer, link.reader) if end is not None]
            links[name] = {**link_snapshot(ends, self._feeds.get(name)), "src": link.src_rank, "dst": link.dst_rank}
            if link.writer is not None:
                # Sent but not yet taken, as the sender sees its credits (busy writing reads as full).
                queues[name] = max(0, link.writer.capacity - link.writer.credits())
        queues.update(self._queues())
        return {**self.identity, "stages": stages, "links": links, "queues": queues,
                "gpus": self.gpus.sample() if self.gpus is not None else [],
                "unavailable": self._unavailable(), "reports": self._reports(), "sent_at": time.time()}


def trace_spans(trace: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Consecutive trace points as named spans in ms: ``[("a>b", ms), ...]``.

    A span between the end of one stage and the start of the next on another rank is
    a transport hop (send, wire, receive queue); within a stage it is compute.
    """
    return [(f"{a}>{b}", 1000.0 * (tb - ta)) for (a, ta), (b, tb) in zip(trace, trace[1:])]
