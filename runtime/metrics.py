"""Counters and latency samples: per stage, per link, and per frame trace.

Every rank keeps ``StageMetrics`` for its stage replicas; channels keep their own
``LinkStats``. ``rank_snapshot`` turns both into plain data that the control plane
ships to rank 0 in each heartbeat, where ``Aggregator`` merges them with the per-frame
traces that complete there into the ``stats`` message and the Prometheus page.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 95, 99)


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
    batch_sizes: Window = field(default_factory=Window)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_batch(self, n_in: int, n_out: int, seconds: float) -> None:
        with self._lock:
            self.frames_in += n_in
            self.frames_out += n_out
            self.batches += 1
        if n_in or n_out:
            self.compute_ms.add(1000.0 * seconds / (n_in or n_out))
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
            }


def link_snapshot(ends: list[dict]) -> dict:
    """One link's figures from the LinkStats snapshots of the ends this rank holds (the
    writer counts what it sent, the reader what it received and each hop's latency),
    with the latency samples reduced to percentiles."""
    out: dict = {}
    samples: list[float] = []
    for stats in ends:
        out.update({k: v for k, v in stats.items() if k != "hop_latencies_ms" and v})
        samples += stats.get("hop_latencies_ms", [])
    out["hop_ms"] = percentiles(samples)
    return out


def trace_spans(trace: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Consecutive trace points as named spans in ms: ``[("a>b", ms), ...]``.

    A span between the end of one stage and the start of the next on another rank is
    a transport hop (send, wire, receive queue); within a stage it is compute.
    """
    return [(f"{a}>{b}", 1000.0 * (tb - ta)) for (a, ta), (b, tb) in zip(trace, trace[1:])]
