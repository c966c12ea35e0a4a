"""How many talking streams one GPU keeps at 25 fps: the stream simulation and the capacity
search, pure (no torch): ``lipsync_gpu.StreamBench`` drives them with real GPU batches, the
tests with fake timing functions whose answers are known.

``simulate_streams``: N streams talk at 25 fps, their frames arriving evenly staggered
(stream s at (s/N + k) x 40 ms). One server loop, as a lip-sync rank runs it: whenever the
GPU is free it takes every queued frame (at most ``MAX_BATCH``, oldest first) and serves
them as one batch, whose milliseconds the caller's ``serve`` returns (measured for real on
the GPU); the clock between batches is simulated (it jumps to the next arrival when
nothing is queued), so a probe costs the GPU time it describes and no sleeping. A frame's
latency = its batch's end - its arrival. N streams are *sustained* when the p95 latency of
the frames arriving after the first quarter of the run (the steady state) is <= 40 ms, one
frame interval: the frames keep the 25 fps pace with a bounded delay (a backlog that grows
shows up as latency that grows, and the run serves every frame it admitted). A probe stops
early once a frame waits over ``ABORT_MS``.

``stream_capacity``: the largest sustained N, found by doubling (or halving) from a guess
(``capacity_guess``) and then bisecting to ``RESOLUTION`` of N, up to a limit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from runtime.bench.stats import percentile

FPS = 25.0
FRAME_MS = 1000.0 / FPS
LATENCY_MS = FRAME_MS
"""A stream is sustained while the p95 latency of its frames stays within one frame interval."""
ABORT_MS = 10 * LATENCY_MS
"""A probe stops as soon as one frame waits this long: it cannot be sustained."""
MAX_BATCH = 128
"""Most frames the server loop puts in one batch (the largest it would hand the GPU)."""
RESOLUTION = 0.05
"""The capacity search stops when it knows the answer to 5 % of N (or to 1 stream)."""


@dataclass(frozen=True, slots=True)
class StreamRun:
    """One probe: ``streams`` streams at ``FPS`` for the simulated duration."""

    streams: int
    frames: int
    """Frames whose latency counts (arrived after the first quarter)."""
    p50_ms: float
    p95_ms: float
    max_ms: float
    batches: int
    mean_batch: float
    busy: float
    """Share of the simulated time the GPU worked."""
    aborted: bool
    """Stopped early: a frame waited over ``ABORT_MS``."""
    latency_ms: float = LATENCY_MS

    @property
    def sustained(self) -> bool:
        return not self.aborted and self.frames > 0 and self.p95_ms <= self.latency_ms


def simulate_streams(streams: int, serve: Callable[[list[int]], float], *, duration_s: float, fps: float = FPS,
                     max_batch: int = MAX_BATCH, latency_ms: float = LATENCY_MS, abort_ms: float = ABORT_MS,
                     settle: float = 0.25) -> StreamRun:
    """Run ``streams`` streams through a greedy batching loop; ``serve(stream ids)`` does
    one batch (one entry per frame, the frame's stream) and returns its milliseconds.

    Frames of stream s arrive at (s / streams + k) / fps seconds, k = 0, 1, ... for
    ``duration_s``. Whenever the server is free it takes every arrived frame (oldest
    first, at most ``max_batch``); when none has arrived the clock jumps to the next
    arrival. Latencies of frames arriving after ``settle`` of the run are summarised.
    """
    if streams < 1 or duration_s <= 0 or fps <= 0 or max_batch < 1:
        raise ValueError("simulate_streams: need streams >= 1, duration_s > 0, fps > 0, max_batch >= 1")
    period_ms = 1000.0 / fps
    per_stream = max(1, math.ceil(duration_s * fps))
    arrivals = sorted(((s / streams + k) * period_ms, s) for k in range(per_stream) for s in range(streams))
    settle_ms = settle * per_stream * period_ms
    latencies: list[float] = []
    now, busy, served, batches, aborted, next_up = 0.0, 0.0, 0, 0, False, 0
    while next_up < len(arrivals):
        now = max(now, arrivals[next_up][0])  # idle until the oldest waiting frame has arrived
        end = next_up
        while end < len(arrivals) and end - next_up < max_batch and arrivals[end][0] <= now:
            end += 1
        batch = arrivals[next_up:end]
        ms = float(serve([s for _, s in batch]))
        now += ms
        busy += ms
        batches += 1
        served += len(batch)
        next_up = end
        waited = [now - t for t, _ in batch]
        latencies += [w for (t, _), w in zip(batch, waited) if t >= settle_ms]
        if max(waited) > abort_ms:
            aborted = True
            break
    return StreamRun(streams=streams, frames=len(latencies), p50_ms=percentile(latencies, 50),
                     p95_ms=percentile(latencies, 95), max_ms=max(latencies, default=math.nan), batches=batches,
                     mean_batch=served / max(batches, 1), busy=busy / max(now, 1e-9), aborted=aborted,
                     latency_ms=latency_ms)


@dataclass(frozen=True, slots=True)
class Capacity:
    streams: int
    """The largest N found sustained (0: not even one stream)."""
    at_limit: bool
    """N reached the search's ``limit``: the GPU may sustain more."""
    cut_short: bool
    """The search ran out of time before it had bisected to its resolution."""
    probes: list[StreamRun]

    @property
    def best(self) -> StreamRun | None:
        """The probe at ``streams`` (None when nothing was sustained)."""
        return next((p for p in self.probes if p.streams == self.streams and p.sustained), None)


def stream_capacity(probe: Callable[[int], StreamRun], *, limit: int, start: int = 1, resolution: float = RESOLUTION,
                    deadline: float = math.inf, clock: Callable[[], float] = time.monotonic) -> Capacity:
    """The largest N <= ``limit`` with ``probe(N).sustained``: from ``start`` (a guess),
    doubling while probes pass or halving while they fail until one of each brackets the
    answer, then bisecting until the gap is within ``resolution`` of N (at least 1).
    Assumes more streams never help; stops at ``deadline`` (``clock`` time) with the best
    found so far."""
    probes: list[StreamRun] = []
    good, bad = 0, None  # largest N sustained, smallest N not sustained, so far

    def sustained(n: int) -> bool:
        run = probe(n)
        probes.append(run)
        return run.sustained

    def out_of_time() -> bool:
        return clock() > deadline

    n = min(max(start, 1), limit)
    if out_of_time():
        return Capacity(streams=0, at_limit=False, cut_short=True, probes=probes)
    if sustained(n):
        good = n
        while good < limit and bad is None and not out_of_time():
            n = min(2 * good, limit)
            if sustained(n):
                good = n
            else:
                bad = n
    else:
        bad = n
        while bad > 1 and good == 0 and not out_of_time():
            n = bad // 2
            if sustained(n):
                good = n
            else:
                bad = n
    while bad is not None and bad - good > max(1, math.floor(good * resolution)) and not out_of_time():
        middle = (good + bad) // 2
        if sustained(middle):
            good = middle
        else:
            bad = middle
    settled = good == limit or (bad is not None and bad - good <= max(1, math.floor(good * resolution)))
    return Capacity(streams=good, at_limit=good == limit, cut_short=not settled, probes=probes)


def capacity_guess(batch_ms: dict[int, float], *, fps: float = FPS, latency_ms: float = LATENCY_MS) -> int:
    """Where to start the search, from one batch's milliseconds at several sizes: the
    streams the best batch size could feed (batch / its time, in frames per stream
    interval) among those short enough for a frame to wait one batch and ride the next
    within ``latency_ms``; at least 1."""
    feeds = [b * 1000.0 / (ms * fps) for b, ms in batch_ms.items() if 0 < ms <= latency_ms / 2]
    return max(1, math.floor(max(feeds, default=1.0)))
