"""The server rank's picture of the whole job: what the ``stats`` message, /metrics and /trace report.

Inputs: each rank's heartbeat snapshot (stage and link metrics with their cumulative
histograms, queue depths, GPU figures, stage reports, and when it was sent), every
delivered frame's trace (spans across ranks), and the inbox's drop counts. Outputs:
``stats()`` (JSON for the page), ``prometheus_text()`` (every rank, for scrapers,
``runtime.prometheus``), ``trace(last)`` (the newest frames as a Chrome trace,
``runtime.tracing``) and, when the environment asks for it, OpenTelemetry spans
(``runtime.otel_export``).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from comms.message import Message
from runtime.live_view import LiveView
from runtime.metrics import Histogram, HistogramData, RateMeter, Window, percentiles, trace_spans
from runtime.otel_export import OtelExport, TimedSpan
from runtime.prometheus import Exposition, exposition_text
from runtime.session_queue import SessionQueue
from runtime.tracing import (ClockEstimate, ClockOffsets, FrameTrace, Places, TraceRing, chrome_trace, frame_spans,
                             placed_spans, point_offset, stamp_parts)

MAX_TRACES = 1000
"""Completed frames' traces kept for ``trace(last)`` (``GET /trace?last=N`` allows 1..1000)."""

_WIRE_ONLY = ("compute_s", "hop_s", "src", "dst")
"""Snapshot keys for /metrics that the page's ``stats`` leaves out (histogram buckets)."""


class Aggregator:
    def __init__(self, *, roles: dict[int, str], liveness: Callable[[], dict[int, tuple[bool, float]]],
                 inbox: SessionQueue | None, live: LiveView, local_snapshot: Callable[[], dict],
                 unavailable: Callable[[], dict[str, str]] = dict, otel: bool = True) -> None:
        self.roles = roles
        self._unavailable = unavailable
        """Stages that say they cannot serve, and why (``runtime.availability``)."""
        self._local_snapshot = local_snapshot
        """The server rank's own stages and links, read fresh for every ``stats()``."""
        self._liveness = liveness
        self._inbox = inbox
        self._live = live
        self._snapshots: dict[int, dict] = {}
        self._spans: dict[str, Window] = {}
        self._server_latency = Window()
        self._fps = RateMeter()
        self._session_fps: dict[str, RateMeter] = {}
        self.delivered = 0
        self.by_generator: dict[str, int] = {}
        """Frames delivered per the generator that made them (meta["style"]["generator"])."""
        self.late = 0
        self._frame_latency: dict[str, Histogram] = {}
        self._queue_wait: dict[str, Histogram] = {}
        self.traces = TraceRing(MAX_TRACES)
        self.clocks = ClockOffsets()
        self._server_rank: int | None = None
        self._lock = threading.Lock()
        self.otel: OtelExport | None = OtelExport.from_environment(self.export_spans) if otel else None
        """Exports every delivered frame's spans when ``opentelemetry-sdk`` is installed and
        ``OTEL_TRACES_EXPORTER`` (or an OTLP endpoint) asks for it; None otherwise."""

    # -- inputs ----------------------------------------------------------------------

    def on_snapshot(self, rank: int, snapshot: dict) -> None:
        """Another rank's heartbeat, as the control hub received it (now)."""
        received = time.time()
        sent = snapshot.get("sent_at")
        if isinstance(sent, (int, float)):
            self.clocks.observe(rank, float(sent), received)
        self._store(rank, snapshot)

    def _store(self, rank: int, snapshot: dict) -> None:
        with self._lock:
            self._snapshots[rank] = snapshot

    def on_delivered(self, msg: Message) -> None:
        """A frame reached its browser session; its trace becomes per-span samples."""
        now = time.time()
        spans = trace_spans(msg.trace)
        generator = (msg.meta.get("style") or {}).get("generator")
        frame = FrameTrace(msg.session, msg.frame_id, None if generator is None else str(generator),
                           tuple((str(n), float(t)) for n, t in msg.trace))
        waits = [(s.dst, s.end - s.start) for s in frame_spans(frame.points) if s.waits]
        latency = _server_time(frame.points)
        with self._lock:
            self.delivered += 1
            if generator is not None:
                self.by_generator[str(generator)] = self.by_generator.get(str(generator), 0) + 1
            meter = self._session_fps.setdefault(msg.session, RateMeter())
            for name, ms in spans:
                self._spans.setdefault(name, Window(256)).add(ms)
            if latency is not None:
                self._frame_latency.setdefault(frame.generator or "", Histogram()).observe(latency)
            for stage, seconds in waits:
                self._queue_wait.setdefault(stage, Histogram()).observe(seconds)
        meter.tick()
        self._fps.tick()
        if msg.trace:
            self._server_latency.add(1000.0 * (now - msg.trace[0][1]))
            self.traces.add(frame)
            if self.otel is not None:
                self.otel.submit(frame)

    def on_late(self) -> None:
        with self._lock:
            self.late += 1

    def forget_session(self, session: str) -> None:
        with self._lock:
            self._session_fps.pop(session, None)

    # -- outputs ---------------------------------------------------------------------

    def _refresh_local(self) -> None:
        """Read the server rank's own snapshot (it sends itself no heartbeat)."""
        local = self._local_snapshot()
        self._server_rank = local["rank"]
        self._store(local["rank"], local)

    def stats(self) -> dict:
        self._refresh_local()
        liveness = self._liveness()
        # Frames the inbox dropped for newer ones, and flushed after a config change.
        dropped, flushed = (self._inbox.dropped_total, self._inbox.flushed) if self._inbox else (0, 0)
        with self._lock:
            snapshots = dict(self._snapshots)
            spans = {k: percentiles(w.values()) for k, w in self._spans.items()}
            sessions = {s: round(m.rate(), 2) for s, m in self._session_fps.items()}
            delivered, late, by_generator = self.delivered, self.late, dict(self.by_generator)
        places = self._places(snapshots)
        stages, hops = {}, {}
        for snapshot in snapshots.values():
            for name, s in snapshot.get("stages", {}).items():
                stages[name] = {k: v for k, v in s.items() if k not in _WIRE_ONLY}
                flushed += s.get("flushed", 0)
            for name, link in snapshot.get("links", {}).items():
                # Both ends report a link: the sender its bytes, the receiver its hop times.
                merged = hops.setdefault(name, {})
                merged.update({k: v for k, v in link.items() if v and k not in _WIRE_ONLY})
                for end in ("src", "dst"):
                    if isinstance(link.get(end), int):
                        merged[f"{end}_rank"] = link[end]
                        merged[f"{end}_node"] = places.info(link[end]).node
        clocks = self._clock_estimates(places)
        return {
            "fps": round(self._fps.rate(), 2),
            "sessions": sessions,
            "delivered": delivered,
            "delivered_by_generator": by_generator,
            "unavailable": self._unavailable(),
            "server_latency_ms": percentiles(self._server_latency.values()),
            "stages": stages,
            "hops": hops,
            "spans": spans,
            "drops": {"ingest": dropped, "flushed": flushed, "late": late},
            "revision": self._live.get().revision,
            "ranks": [
                {"rank": r, "role": self.roles.get(r, "?"), "node": places.info(r).node, "alive": alive,
                 "last_seen_s": round(silent, 2),
                 **({"clock_offset_ms": clocks[r].as_json()["offset_ms"]} if r in clocks else {})}
                for r, (alive, silent) in sorted(liveness.items())
            ],
            "clock": {str(r): c.as_json() for r, c in sorted(clocks.items())},
        }

    def prometheus_text(self) -> bytes:
        stats = self.stats()
        with self._lock:
            snapshots = dict(self._snapshots)
            frame_latency = {g: HistogramData.of(h) for g, h in self._frame_latency.items()}
            queue_wait = {k: HistogramData.of(h) for k, h in self._queue_wait.items()}
        places = self._places(snapshots)
        return exposition_text(Exposition(stats=stats, snapshots=snapshots, places=places,
                                          clocks=self._clock_estimates(places), pipeline=self._pipeline(snapshots),
                                          frame_latency=frame_latency, queue_wait=queue_wait))

    def trace(self, last: int = 50) -> dict[str, Any]:
        """The newest ``last`` delivered frames (1..``MAX_TRACES``) as a Chrome trace JSON
        object Perfetto opens; its ``metadata`` holds the clock offsets it corrected by."""
        if not 1 <= last <= MAX_TRACES:
            raise ValueError(f"last must be 1..{MAX_TRACES}, got {last}")
        self._refresh_local()
        with self._lock:
            snapshots = dict(self._snapshots)
        places = self._places(snapshots)
        return chrome_trace(self.traces.newest(last), places, self._clock_estimates(places),
                            {"pipeline": self._pipeline(snapshots)})

    # -- where ranks are, and their clocks -------------------------------------------

    def _places(self, snapshots: dict[int, dict]) -> Places:
        server = self._server_rank if self._server_rank is not None else min(self.roles, default=0)
        return Places.from_snapshots(server, snapshots, self.roles)

    def _clock_estimates(self, places: Places) -> dict[int, ClockEstimate]:
        server_node = places.info(places.server_rank).node
        out = {}
        for rank in sorted(set(self.roles) | set(places.ranks)):
            node = places.info(rank).node
            out[rank] = self.clocks.estimate(rank, same_node=rank == places.server_rank or
                                             (node != "" and node == server_node))
        return out

    @staticmethod
    def _pipeline(snapshots: dict[int, dict]) -> str:
        return next((str(s["pipeline"]) for s in snapshots.values() if s.get("pipeline")), "")

    def export_spans(self, frame: FrameTrace) -> tuple[TimedSpan, list[TimedSpan]]:
        """A frame's root span and its stage and hop spans on rank 0's clock, for
        ``OtelExport`` (called on its worker thread)."""
        with self._lock:
            snapshots = dict(self._snapshots)
        places = self._places(snapshots)
        clocks = self._clock_estimates(places)
        common = {"mindmirror.session": frame.session, "mindmirror.frame_id": frame.frame_id,
                  "mindmirror.pipeline": self._pipeline(snapshots)}
        (first_name, first), (last_name, last) = frame.points[0], frame.points[-1]
        first += point_offset(places, clocks, stamp_parts(first_name)[0])[0]
        last += point_offset(places, clocks, stamp_parts(last_name)[0])[0]
        root = TimedSpan("frame", "frame", first, last, {**common, "mindmirror.generator": frame.generator or ""})
        children = []
        for span in placed_spans(frame, places, clocks):
            rank, role, node = places.labels(span.ranks)
            children.append(TimedSpan(span.name, span.kind, span.start, span.end,
                                      {**common, "mindmirror.stage": span.stage, "mindmirror.rank": rank,
                                       "mindmirror.role": role, "mindmirror.node": node,
                                       "mindmirror.clock_corrected": span.clock_known}))
        return root, children


def _server_time(points: tuple[tuple[str, float], ...]) -> float | None:
    """Seconds from the frame's ``server.recv`` to its ``server.send`` (both rank 0's clock)."""
    recv = next((t for n, t in points if n == "server.recv"), None)
    send = next((t for n, t in reversed(points) if n == "server.send"), None)
    return None if recv is None or send is None else send - recv
