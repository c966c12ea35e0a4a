"""The server rank's picture of the whole job: what the ``stats`` message and /metrics report.

Inputs: each rank's heartbeat snapshot (stage and link metrics), every delivered
frame's trace (spans across ranks), and the inbox's drop counts. Outputs:
``stats()`` (JSON for the page) and ``prometheus_text()`` (for scrapers).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from comms.message import Message
from runtime.live_view import LiveView
from runtime.metrics import RateMeter, Window, percentiles, trace_spans
from runtime.session_queue import SessionQueue


class Aggregator:
    def __init__(self, *, roles: dict[int, str], liveness: Callable[[], dict[int, tuple[bool, float]]],
                 inbox: SessionQueue | None, live: LiveView, local_snapshot: Callable[[], dict],
                 unavailable: Callable[[], dict[str, str]] = dict) -> None:
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
        self._lock = threading.Lock()

    # -- inputs ----------------------------------------------------------------------

    def on_snapshot(self, rank: int, snapshot: dict) -> None:
        with self._lock:
            self._snapshots[rank] = snapshot

    def on_delivered(self, msg: Message) -> None:
        """A frame reached its browser session; its trace becomes per-span samples."""
        now = time.time()
        spans = trace_spans(msg.trace)
        generator = (msg.meta.get("style") or {}).get("generator")
        with self._lock:
            self.delivered += 1
            if generator is not None:
                self.by_generator[str(generator)] = self.by_generator.get(str(generator), 0) + 1
            meter = self._session_fps.setdefault(msg.session, RateMeter())
            for name, ms in spans:
                self._spans.setdefault(name, Window(256)).add(ms)
        meter.tick()
        self._fps.tick()
        if msg.trace:
            self._server_latency.add(1000.0 * (now - msg.trace[0][1]))

    def on_late(self) -> None:
        with self._lock:
            self.late += 1

    def forget_session(self, session: str) -> None:
        with self._lock:
            self._session_fps.pop(session, None)

    # -- outputs ---------------------------------------------------------------------

    def stats(self) -> dict:
        local = self._local_snapshot()
        self.on_snapshot(local["rank"], local)
        liveness = self._liveness()
        # Frames the inbox dropped for newer ones, and flushed after a config change.
        dropped, flushed = (self._inbox.dropped_total, self._inbox.flushed) if self._inbox else (0, 0)
        with self._lock:
            snapshots = dict(self._snapshots)
            spans = {k: percentiles(w.values()) for k, w in self._spans.items()}
            sessions = {s: round(m.rate(), 2) for s, m in self._session_fps.items()}
            delivered, late, by_generator = self.delivered, self.late, dict(self.by_generator)
        stages, hops = {}, {}
        for snapshot in snapshots.values():
            for name, s in snapshot.get("stages", {}).items():
                stages[name] = s
                flushed += s.get("flushed", 0)
            for name, link in snapshot.get("links", {}).items():
                # Both ends report a link: the sender its bytes, the receiver its hop times.
                merged = hops.setdefault(name, {})
                merged.update({k: v for k, v in link.items() if v})
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
                {"rank": r, "role": self.roles.get(r, "?"), "alive": alive, "last_seen_s": round(silent, 2)}
                for r, (alive, silent) in sorted(liveness.items())
            ],
        }

    def prometheus_text(self) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_StatsCollector(self.stats))
        return generate_latest(registry)


class _StatsCollector:
    """Exposes one ``stats()`` snapshot as Prometheus metric families."""

    def __init__(self, stats: Callable[[], dict]) -> None:
        self._stats = stats

    def collect(self):
        s = self._stats()
        yield GaugeMetricFamily("mindmirror_output_fps", "Output frames per second, all sessions", value=s["fps"])
        yield CounterMetricFamily("mindmirror_frames_delivered", "Frames delivered to browsers", value=s["delivered"])
        made = CounterMetricFamily("mindmirror_frames_by_generator", "Frames delivered, by the generator that made "
                                   "them (a fallback serving shows here)", labels=["generator"])
        for generator, n in s["delivered_by_generator"].items():
            made.add_metric([generator], n)
        yield made
        drops = CounterMetricFamily("mindmirror_frames_dropped", "Frames dropped, by reason", labels=["reason"])
        for reason, n in s["drops"].items():
            drops.add_metric([reason], n)
        yield drops
        yield GaugeMetricFamily("mindmirror_config_revision", "Live config revision", value=s["revision"])
        up = GaugeMetricFamily("mindmirror_rank_up", "1 while a rank is alive", labels=["rank", "role"])
        for r in s["ranks"]:
            up.add_metric([str(r["rank"]), r["role"]], 1.0 if r["alive"] else 0.0)
        yield up
        latency = GaugeMetricFamily("mindmirror_server_latency_ms", "Server receive to send, ms", labels=["quantile"])
        for q, v in _quantiles(s["server_latency_ms"]):
            latency.add_metric([q], v)
        yield latency
        compute = GaugeMetricFamily("mindmirror_stage_compute_ms", "Stage compute per frame, ms", labels=["stage", "quantile"])
        frames = CounterMetricFamily("mindmirror_stage_frames", "Frames processed per stage", labels=["stage"])
        diverted = CounterMetricFamily("mindmirror_frames_diverted", "Outputs a stage sent to the next stage's "
                                       "fallback, by reason", labels=["stage", "reason"])
        for name, st in s["stages"].items():
            frames.add_metric([name], st.get("frames_in", 0))
            for reason, n in (st.get("diverted") or {}).items():
                diverted.add_metric([name, reason], n)
            for q, v in _quantiles(st.get("compute_ms", {})):
                compute.add_metric([name, q], v)
        yield compute
        yield frames
        yield diverted
        hop = GaugeMetricFamily("mindmirror_link_hop_ms", "Link send-to-receive latency, ms", labels=["link", "quantile"])
        sent = CounterMetricFamily("mindmirror_link_bytes_sent", "Payload bytes sent per link", labels=["link"])
        for name, link in s["hops"].items():
            sent.add_metric([name], link.get("bytes_sent", 0))
            for q, v in _quantiles(link.get("hop_ms", {})):
                hop.add_metric([name, q], v)
        yield hop
        yield sent


def _quantiles(p: dict) -> list[tuple[str, float]]:
    return [(f"0.{k[1:]}", v) for k, v in p.items() if k.startswith("p")]
