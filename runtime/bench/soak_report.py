"""The soak's verdict and report: per session frames/s, errors and latency; per rank RSS.

The soak passes when, over the measured window (after the warm-up):

- **no errors**: no session got an ``error`` message, a message it could not decode, or a
  close it did not ask for; every rank this machine runs stayed up; the job (when the soak
  started it) stopped cleanly;
- **no session starved**: each session got at least ``starved_fraction`` of the median
  session's output frames, and never waited more than ``max_gap_s`` for the next one. The
  server shares one pipeline between the sessions (each has its own 2-frame entrance queue
  and the page's 3 frames in flight), so equal pages get about equal shares; a session far
  below the median is being passed over;
- **memory bounded**: no rank's RSS grew by more than ``rss_growth_mb`` from the end of the
  warm-up to the end. See ``SoakLimits.rss_growth_mb`` for why that figure.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from runtime.bench.soak_client import SessionRecord
from runtime.bench.soak_memory import MiB, RankMemory
from runtime.bench.stats import percentile


@dataclass(kw_only=True, slots=True)
class SoakLimits:
    starved_fraction: float = 0.5
    """A session with fewer output frames than this fraction of the median session's is starved."""
    max_gap_s: float = 15.0
    """A session that waited longer than this for an output frame is starved. With 8 pages
    on 2 busy cores the default pipeline answered each about once a second, and the longest
    wait of any session in 600 s was 3.8 s; 15 s without a frame is a session the pipeline
    stopped serving, with room for a machine that other programs stall for a moment."""
    rss_growth_mb: float = 64.0
    """Most a rank's RSS may grow from the end of the warm-up to the end of the soak. Every
    per-frame and per-session structure of the runtime is bounded (2 frames per session at
    the entrance, link credits, 4 output frames per session, stats windows of 512 samples),
    so once the warm-up has touched them a rank's RSS should only move with the allocator.
    Measured on the development machine (8 sessions, default pipeline on 3 ranks, 300 and
    600 s): rank 0 +2 MiB; vision climbs ~30 MiB in its first minute or so of load, then
    stays flat; the generator swings between ~303 and ~336 MiB all along, so its end - start
    depends on where the two samples fall (up to +19 MiB). 64 MiB is twice the largest of
    those movements, so a short warm-up (the 60 s CI run's 5 s) or the allocator's swings do
    not fail a soak, yet over the 10-minute soak it stops any steady leak above ~0.11 MiB/s:
    one 640x480 RGB frame kept every 8 s, or ~4 kB per delivered frame at 27 FPS. Over the
    60 s CI run only leaks above ~1 MiB/s are caught; the 10-minute soak is the memory check."""

    def __post_init__(self) -> None:
        if not 0 < self.starved_fraction <= 1:
            raise ValueError(f"starved_fraction must be within 0..1 (exclusive of 0), got {self.starved_fraction}")
        for name in ("max_gap_s", "rss_growth_mb"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")


@dataclass(kw_only=True, slots=True)
class SessionSummary:
    index: int
    sent: int
    """Camera frames sent in the measured window."""
    frames: int
    """Output frames received in the measured window."""
    fps: float
    p50_ms: float
    p95_ms: float
    max_gap_s: float
    """Longest wait for an output frame in the window (its edges included)."""
    error_count: int
    errors: list[str]


@dataclass(kw_only=True, slots=True)
class RankSummary:
    rank: int
    pid: int
    role: str
    idle_mb: float
    """RSS before any session connected."""
    start_mb: float
    """RSS at the end of the warm-up (the baseline)."""
    end_mb: float
    max_mb: float
    """Highest RSS from the baseline on."""
    gone: bool

    @property
    def growth_mb(self) -> float:
        return self.end_mb - self.start_mb


@dataclass(kw_only=True, slots=True)
class SoakResult:
    window_s: float
    sessions: list[SessionSummary]
    ranks: list[RankSummary]
    world_size: int
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "window_s": self.window_s, "world_size": self.world_size,
                "failures": self.failures, "notes": self.notes,
                "sessions": [{f: getattr(s, f) for f in SessionSummary.__slots__} for s in self.sessions],
                "ranks": [{**{f: getattr(r, f) for f in RankSummary.__slots__}, "growth_mb": r.growth_mb}
                          for r in self.ranks]}


def summarize_session(record: SessionRecord, start: float, end: float) -> SessionSummary:
    """The window ``[start, end]`` of one session's record."""
    arrivals = [t for t in record.arrivals if start <= t <= end]
    latencies = [ms for t, ms in zip(record.arrivals, record.latencies_ms) if start <= t <= end]
    edges = [start, *arrivals, end]
    return SessionSummary(
        index=record.index, sent=sum(1 for t in record.sent_at if start <= t <= end), frames=len(arrivals),
        fps=len(arrivals) / (end - start), p50_ms=percentile(latencies, 50), p95_ms=percentile(latencies, 95),
        max_gap_s=max(b - a for a, b in itertools.pairwise(edges)), error_count=record.error_count,
        errors=list(record.errors))


def summarize_rank(memory: RankMemory, role: str, baseline_at: float) -> RankSummary:
    def mb(value: int | None) -> float:
        return math.nan if value is None else value / MiB

    first = memory.samples[0][1] if memory.samples else None
    last = memory.samples[-1][1] if memory.samples else None
    return RankSummary(rank=memory.rank, pid=memory.pid, role=role, idle_mb=mb(first),
                       start_mb=mb(memory.at(baseline_at)), end_mb=mb(last),
                       max_mb=mb(memory.max_after(baseline_at)), gone=memory.gone_at is not None)


def judge(result: SoakResult, limits: SoakLimits) -> None:
    """Fill ``result.failures`` (see the module docstring); each names what and by how much."""
    out = result.failures
    for s in result.sessions:
        if s.error_count:
            out.append(f"session {s.index}: {s.error_count} error(s), first: {s.errors[0] if s.errors else '?'}")
    median = statistics.median([s.frames for s in result.sessions]) if result.sessions else 0
    for s in result.sessions:
        if s.frames == 0 or s.frames < limits.starved_fraction * median:
            out.append(f"session {s.index} starved: {s.frames} frames, under {limits.starved_fraction:.0%} of "
                       f"the median session's {median:g}")
        elif s.max_gap_s > limits.max_gap_s:
            out.append(f"session {s.index} starved: waited {s.max_gap_s:.1f} s for a frame "
                       f"(bound {limits.max_gap_s:g} s)")
    for r in result.ranks:
        if r.gone:
            out.append(f"rank {r.rank} ({r.role}) exited during the soak")
        elif not math.isfinite(r.growth_mb):
            out.append(f"rank {r.rank} ({r.role}): no RSS sample before and after the window")
        elif r.growth_mb > limits.rss_growth_mb:
            out.append(f"rank {r.rank} ({r.role}): RSS grew {r.growth_mb:.1f} MiB ({r.start_mb:.1f} -> "
                       f"{r.end_mb:.1f}), over the {limits.rss_growth_mb:g} MiB bound")
    if not result.ranks:
        out.append("no rank process found to watch")


def format_report(result: SoakResult, limits: SoakLimits) -> str:
    """The plain-text report: a table per sessions and ranks, then the verdict."""
    total = sum(s.frames for s in result.sessions)
    lines = [(f"Soak: {len(result.sessions)} sessions, {result.window_s:.0f} s measured; "
              f"{total} output frames ({total / result.window_s:.1f} FPS in all)"), "",
             "session  sent  frames  frames/s  p50 ms  p95 ms  max gap s  errors"]
    for s in result.sessions:
        lines.append(f"{s.index:>7}  {s.sent:>4}  {s.frames:>6}  {s.fps:>8.2f}  {s.p50_ms:>6.0f}  {s.p95_ms:>6.0f}  "
                     f"{s.max_gap_s:>9.2f}  {s.error_count:>6}")
    watched = f"{len(result.ranks)} of {result.world_size} rank(s) on this machine"
    lines += ["", (f"RSS MiB ({watched}; start = end of warm-up, bound on growth "
                   f"{limits.rss_growth_mb:g} MiB)"),
              "rank  role                    pid     idle   start     end     max  growth"]
    for r in result.ranks:
        lines.append(f"{r.rank:>4}  {r.role:<22} {r.pid:>6}  {r.idle_mb:>6.1f}  {r.start_mb:>6.1f}  "
                     f"{r.end_mb:>6.1f}  {r.max_mb:>6.1f}  {r.growth_mb:>+6.1f}" + ("  EXITED" if r.gone else ""))
    lines += [""] + [f"note: {n}" for n in result.notes]
    if result.passed:
        lines.append("PASS: no errors, no session starved, every rank's RSS growth within the bound")
    else:
        lines += ["FAIL:"] + [f"  - {f}" for f in result.failures]
    return "\n".join(lines) + "\n"
