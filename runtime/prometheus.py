"""The runtime's Prometheus exposition: every rank's figures on rank 0's ``GET /metrics``.

Rank 0 holds each rank's newest heartbeat snapshot (cumulative counters and histogram
buckets since that rank started) and the histograms of the frames it delivered; one
scrape turns them into metric families, every per-rank series labelled ``rank``,
``role`` and ``node``. Names and labels (all ``mindmirror_``):

* histograms (seconds, buckets ``runtime.metrics.SECONDS_BUCKETS``):
  ``frame_latency_seconds`` {pipeline, generator} (server receive to send),
  ``stage_compute_seconds`` {stage, replica, rank, role, node} (per frame),
  ``stage_queue_wait_seconds`` {stage, rank, role, node} (a stage's start minus the stamp
  before it, from delivered frames' traces: routing, transport and queue),
  ``hop_seconds`` {hop, src_rank, dst_rank, src_node, dst_node} (send to receive, as the
  link measures it);
* counters: ``link_bytes_total`` / ``link_messages_total`` {link, src_rank, dst_rank,
  src_node, dst_node} (``rate()`` is the bandwidth), ``frames_dropped_total`` {reason},
  ``registry_events_total`` {stage, replica, event, rank, role, node},
  ``diffusion_steps_total`` {stage, replica, rank, role, node};
* gauges: ``queue_depth`` {queue, rank, role, node}, ``registry_models_resident`` /
  ``registry_bytes_used`` / ``registry_capacity_bytes`` {stage, replica, rank, role, node},
  ``gpu_utilization_ratio`` / ``gpu_memory_used_bytes`` / ``gpu_memory_total_bytes``
  {rank, role, node, gpu}, ``rank_up`` {rank, role, node}, ``clock_offset_seconds``
  {rank, role, node};
* and, for dashboards written before the histograms, the families the page's ``stats``
  percentiles gave: ``output_fps``, ``frames_delivered_total``, ``stage_compute_ms``
  {stage, quantile}, ``link_hop_ms``, ``link_bytes_sent_total``, ``server_latency_ms``...

A snapshot part that does not parse (a rank running other code) is left out of the
scrape rather than failing it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from runtime.metrics import SECONDS_BUCKETS, HistogramData
from runtime.tracing import ClockEstimate, Places

log = logging.getLogger(__name__)

RANK_LABELS = ["rank", "role", "node"]
LINK_LABELS = ["src_rank", "dst_rank", "src_node", "dst_node"]
REGISTRY_EVENTS = {"hits": "hit", "misses": "miss", "loads": "load", "evictions": "eviction",
                   "failures": "failure", "expired": "expired", "unloads": "unload", "joined": "joined",
                   "rejected": "rejected"}
"""The lip-sync registry's counters (``stages.lipsync.registry`` ``stats()``) by event label."""


@dataclass(frozen=True, slots=True)
class Exposition:
    """Everything one scrape shows, read at one instant by ``Aggregator``."""

    stats: dict[str, Any]
    snapshots: dict[int, dict]
    places: Places
    clocks: dict[int, ClockEstimate]
    pipeline: str
    frame_latency: dict[str, HistogramData]
    """By generator ('' when frames do not name one)."""
    queue_wait: dict[str, HistogramData]
    """By trace stamp prefix (stage kind)."""


def exposition_text(exposition: Exposition) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(exposition))
    return generate_latest(registry)


class _Collector:
    def __init__(self, exposition: Exposition) -> None:
        self.x = exposition

    def collect(self):
        yield from _compatible(self.x.stats)
        yield from self._histograms()
        yield from self._links()
        yield from self._per_rank()

    # -- latency histograms ---------------------------------------------------------

    def _histograms(self):
        x = self.x
        frame = _histogram("mindmirror_frame_latency_seconds", "Server receive to server send of each delivered "
                           "frame (the part of glass-to-glass the server sees)", ["pipeline", "generator"])
        for generator, data in sorted(x.frame_latency.items()):
            _add(frame, [x.pipeline, generator], data)
        compute = _histogram("mindmirror_stage_compute_seconds", "Stage compute per frame (batch time / batch size)",
                             ["stage", "replica", *RANK_LABELS])
        for rank, snap in sorted(x.snapshots.items()):
            labels = list(x.places.labels((rank,)))
            for label, stage in sorted((snap.get("stages") or {}).items()):
                name, _, replica = label.partition("#")
                data = _parse(stage.get("compute_s"), snap, f"rank {rank} stage {label} compute")
                if data is not None:
                    _add(compute, [str(stage.get("stage") or name), replica, *labels], data)
        wait = _histogram("mindmirror_stage_queue_wait_seconds", "From the stamp before a stage's start to its "
                          "start, in delivered frames' traces: routing, transport and queue", ["stage", *RANK_LABELS])
        seen = set()
        for prefix, data in sorted(x.queue_wait.items()):
            stage, ranks = x.places.of(prefix)
            labels = (stage, *x.places.labels(ranks))
            if labels not in seen:
                seen.add(labels)
                _add(wait, list(labels), data)
        hop = _histogram("mindmirror_hop_seconds", "Send to receive per message, as the link measures it (across "
                         "nodes: includes their clock offset)", ["hop", *LINK_LABELS])
        for rank, snap in sorted(x.snapshots.items()):
            for name, link in sorted((snap.get("links") or {}).items()):
                if "hop_s" in link:
                    data = _parse(link["hop_s"], snap, f"rank {rank} link {name} hop")
                    if data is not None:
                        _add(hop, [name, *self._link_ends(link)], data)
        return [frame, compute, wait, hop]

    # -- links ----------------------------------------------------------------------

    def _links(self):
        merged: dict[str, dict] = {}
        for _, snap in sorted(self.x.snapshots.items()):
            for name, link in (snap.get("links") or {}).items():
                into = merged.setdefault(name, {})
                for key, value in link.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        into[key] = max(into.get(key, value), value)
                    elif key in ("src", "dst"):
                        into[key] = value
        size = CounterMetricFamily("mindmirror_link_bytes", "Payload bytes per link (the sender's count; rate() is "
                                   "the bandwidth)", labels=["link", *LINK_LABELS])
        count = CounterMetricFamily("mindmirror_link_messages", "Messages per link (the sender's count)",
                                    labels=["link", *LINK_LABELS])
        for name, link in sorted(merged.items()):
            ends = self._link_ends(link)
            size.add_metric([name, *ends], link.get("bytes_sent", link.get("bytes_received", 0)))
            count.add_metric([name, *ends], link.get("messages_sent", link.get("messages_received", 0)))
        return [size, count]

    def _link_ends(self, link: dict) -> list[str]:
        src, dst = link.get("src"), link.get("dst")
        src_node = self.x.places.info(src).node if isinstance(src, int) else ""
        dst_node = self.x.places.info(dst).node if isinstance(dst, int) else ""
        return ["" if src is None else str(src), "" if dst is None else str(dst), src_node, dst_node]

    # -- per rank: liveness, queues, registries, diffusion, GPUs, clocks ------------

    def _per_rank(self):
        x = self.x
        up = GaugeMetricFamily("mindmirror_rank_up", "1 while a rank is alive", labels=RANK_LABELS)
        for r in x.stats["ranks"]:
            up.add_metric(list(x.places.labels((r["rank"],))), 1.0 if r["alive"] else 0.0)
        clock = GaugeMetricFamily("mindmirror_clock_offset_seconds", "Estimated offset of a rank's clock from "
                                  "rank 0's (0 on rank 0's node; else min(receive - send) of heartbeats)",
                                  labels=RANK_LABELS)
        for rank, estimate in sorted(x.clocks.items()):
            clock.add_metric(list(x.places.labels((rank,))), estimate.offset_s)
        depth = GaugeMetricFamily("mindmirror_queue_depth", "Messages waiting: the session inbox, and each link's "
                                  "sent but not yet taken (a sender busy writing reads as full)",
                                  labels=["queue", *RANK_LABELS])
        resident = GaugeMetricFamily("mindmirror_registry_models_resident", "Models resident in a replica's registry",
                                     labels=["stage", "replica", *RANK_LABELS])
        used = GaugeMetricFamily("mindmirror_registry_bytes_used", "Bytes of resident models",
                                 labels=["stage", "replica", *RANK_LABELS])
        capacity = GaugeMetricFamily("mindmirror_registry_capacity_bytes", "A registry's byte budget",
                                     labels=["stage", "replica", *RANK_LABELS])
        events = CounterMetricFamily("mindmirror_registry_events", "Registry events since start",
                                     labels=["stage", "replica", "event", *RANK_LABELS])
        steps = CounterMetricFamily("mindmirror_diffusion_steps", "Denoising steps run (per image)",
                                    labels=["stage", "replica", *RANK_LABELS])
        util = GaugeMetricFamily("mindmirror_gpu_utilization_ratio", "GPU busy fraction (NVML)",
                                 labels=[*RANK_LABELS, "gpu"])
        mem_used = GaugeMetricFamily("mindmirror_gpu_memory_used_bytes", "GPU memory used (NVML, whole device)",
                                     labels=[*RANK_LABELS, "gpu"])
        mem_total = GaugeMetricFamily("mindmirror_gpu_memory_total_bytes", "GPU memory (NVML)",
                                      labels=[*RANK_LABELS, "gpu"])
        for rank, snap in sorted(x.snapshots.items()):
            labels = list(x.places.labels((rank,)))
            for queue, n in sorted((snap.get("queues") or {}).items()):
                depth.add_metric([queue, *labels], n)
            for stage, replicas in sorted((snap.get("reports") or {}).items()):
                for replica, report in sorted(replicas.items()):
                    if not isinstance(report, dict):
                        continue
                    where = [stage, str(replica), *labels]
                    stats = report.get("stats")
                    if isinstance(stats, dict) and "capacity_bytes" in stats:
                        resident.add_metric(where, stats.get("resident", 0))
                        used.add_metric(where, stats.get("used_bytes", 0))
                        capacity.add_metric(where, stats["capacity_bytes"])
                        for key, event in REGISTRY_EVENTS.items():
                            if key in stats:
                                events.add_metric([stage, str(replica), event, *labels], stats[key])
                    diffusion = report.get("diffusion")
                    if isinstance(diffusion, dict) and "steps" in diffusion:
                        steps.add_metric(where, diffusion["steps"])
            for gpu in snap.get("gpus") or []:
                where = [*labels, str(gpu.get("gpu", ""))]
                util.add_metric(where, gpu.get("util", 0.0))
                mem_used.add_metric(where, gpu.get("used", 0))
                mem_total.add_metric(where, gpu.get("total", 0))
        families = [up, clock, depth, resident, used, capacity, events, steps, util, mem_used, mem_total]
        return [f for f in families if f.samples or f.name in ("mindmirror_rank_up", "mindmirror_queue_depth")]


def _histogram(name: str, documentation: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, documentation, labels=labels)


def _add(family: HistogramMetricFamily, labels: list[str], data: HistogramData) -> None:
    buckets = [("+Inf" if math.isinf(bound) else _le(bound), n) for bound, n in data.cumulative()]
    family.add_metric(labels, buckets, data.sum)


def _le(bound: float) -> str:
    return repr(float(bound))


def _parse(wire: Any, snapshot: dict, what: str) -> HistogramData | None:
    if wire is None:
        return None
    try:
        return HistogramData.from_wire(wire, tuple(snapshot.get("buckets", SECONDS_BUCKETS)))
    except ValueError as e:
        log.debug("left out of /metrics: %s: %s", what, e)
        return None


def _compatible(s: dict[str, Any]):
    """The families /metrics had before the histograms (from the ``stats`` percentiles)."""
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
