"""Rank 0's /metrics: every rank's series, labelled, from heartbeats and delivered frames.

A four-rank job is played in one process: each "rank" builds its heartbeat with the real
``RankSnapshot`` (real stage metrics, real in-process link ends shared between the
ranks they join, a real lip-sync ``ModelRegistry`` report), the heartbeats cross the real
header codec into the real ``Aggregator``, frames with traces are delivered to it, and
the exposition is read back with ``prometheus_client``'s own parser.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from comms.inprocess import inprocess_link
from comms.message import Message
from core.settings import RuntimeSettings
from runtime.aggregate import Aggregator
from runtime.live_view import LiveView
from runtime.metrics import SECONDS_BUCKETS, LinkSource, RankSnapshot, StageMetrics, StageSource
from runtime.session_queue import SessionQueue
from stages.lipsync.registry import ModelRegistry
from tests.runtime.test_metrics_snapshot import snapshot_over_the_wire

ROLES = {0: "server+ingest+display", 1: "vision", 2: "generator", 3: "generator"}
NODES = {0: 0, 1: 0, 2: 0, 3: 1}


class Job:
    """Four ranks' snapshot builders over shared in-process links, and rank 0's aggregator."""

    def __init__(self) -> None:
        self.ends = {name: inprocess_link(name, 4) for name in
                     ("ingest#0->vision#0", "vision#0->generator#0", "vision#0->generator#1",
                      "generator#0->display#0", "generator#1->display#0")}
        self.metrics = {label: StageMetrics(label) for label in
                        ("ingest#0", "display#0", "vision#0", "generator#0", "generator#1")}
        self.registry = ModelRegistry(capacity_bytes=250, loader=lambda key: (object(), 100))
        self.inbox = SessionQueue("sessions", 4)
        self.builders = {rank: self._builder(rank) for rank in ROLES}
        self.aggregator = Aggregator(roles=ROLES, liveness=lambda: {r: (r != 3, 0.1) for r in ROLES},
                                     inbox=self.inbox, live=LiveView(1, RuntimeSettings()),
                                     local_snapshot=self.builders[0], otel=False)

    def _builder(self, rank: int) -> RankSnapshot:
        labels = {0: ["ingest#0", "display#0"], 1: ["vision#0"], 2: ["generator#0"], 3: ["generator#1"]}[rank]
        stages = {label: StageSource(label.split("#")[0], label.split("#")[0], self.metrics[label]) for label in labels}
        links = {}
        for name, (writer, reader) in self.ends.items():
            src, dst = (self._rank_of(end) for end in name.split("->"))
            if rank in (src, dst):
                links[name] = LinkSource(src, dst, writer if rank == src else None, reader if rank == dst else None)
        reports = (lambda: {"generator": {"1": {"device": "cpu", **self.registry.report()},
                                          "9": {"diffusion": {"steps": 12}}}}) if rank == 3 else dict
        queues = (lambda: {"sessions": self.inbox.queued()}) if rank == 0 else dict
        return RankSnapshot(rank=rank, role=ROLES[rank], node=NODES[rank], pipeline="mirror", stages=stages,
                            links=links, queues=queues, reports=reports)

    @staticmethod
    def _rank_of(label: str) -> int:
        return {"ingest#0": 0, "display#0": 0, "vision#0": 1, "generator#0": 2, "generator#1": 3}[label]

    def run_frames(self, n: int) -> None:
        """``n`` frames through every link and stage (alternating generators), then delivered."""
        for i in range(n):
            generator = f"generator#{i % 2}"
            path = ["ingest#0", "vision#0", generator, "display#0"]
            for a, b in zip(path, path[1:]):
                writer, reader = self.ends[f"{a}->{b}"]
                writer.send(Message(frame_id=i, tensors=[torch.zeros(100 + i, dtype=torch.uint8)]))
                reader.recv(timeout=1)
            for label, seconds in zip(path, (0.001, 0.03, 0.12, 0.002)):
                self.metrics[label].record_batch(1, 1, seconds)
            t = 1000.0 + i
            msg = Message(session="s", frame_id=i, meta={"style": {"generator": "stylenet"}}, trace=[
                ("server.recv", t), ("ingest.start", t + 0.004), ("ingest.end", t + 0.005),
                ("vision.start", t + 0.010), ("vision.end", t + 0.040),
                ("generator.start", t + 0.050), ("generator.end", t + 0.170),
                ("display.start", t + 0.175), ("display.end", t + 0.177), ("server.send", t + 0.180)])
            self.aggregator.on_delivered(msg)

    def heartbeats(self) -> None:
        for rank in (1, 2, 3):
            self.aggregator.on_snapshot(rank, snapshot_over_the_wire(self.builders[rank]()))


@pytest.fixture
def job() -> Job:
    job = Job()
    job.registry.load("a")
    job.registry.load("b")
    with job.registry.use("a"):
        pass
    job.registry.load("c")  # over 250 bytes: one eviction
    job.run_frames(6)
    job.heartbeats()
    return job


def scrape(job: Job) -> dict:
    text = job.aggregator.prometheus_text().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family, suffix: str = "") -> list:
    return [s for s in family.samples if s.name == family.name + suffix]


def test_every_histogram_has_monotonic_buckets_ending_at_its_count(job):
    families = scrape(job)
    histograms = [f for f in families.values() if f.type == "histogram"]
    assert {f.name for f in histograms} == {"mindmirror_frame_latency_seconds", "mindmirror_stage_compute_seconds",
                                           "mindmirror_stage_queue_wait_seconds", "mindmirror_hop_seconds"}
    for family in histograms:
        series: dict[tuple, list] = {}
        for s in samples(family, "_bucket"):
            key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            series.setdefault(key, []).append((float(s.labels["le"]), s.value))
        counts = {tuple(sorted(s.labels.items())): s.value for s in samples(family, "_count")}
        assert series and set(series) == set(counts), family.name
        for key, buckets in series.items():
            assert [b for b, _ in buckets] == [*SECONDS_BUCKETS, math.inf], (family.name, key)
            values = [v for _, v in buckets]
            assert values == sorted(values) and values[-1] == counts[key], (family.name, key, values)


def test_stage_compute_comes_from_every_rank_with_rank_role_and_node(job):
    compute = scrape(job)["mindmirror_stage_compute_seconds"]
    counts = {(s.labels["stage"], s.labels["replica"], s.labels["rank"], s.labels["role"], s.labels["node"]): s.value
              for s in samples(compute, "_count")}
    assert counts == {("ingest", "0", "0", ROLES[0], "0"): 6, ("display", "0", "0", ROLES[0], "0"): 6,
                      ("vision", "0", "1", "vision", "0"): 6, ("generator", "0", "2", "generator", "0"): 3,
                      ("generator", "1", "3", "generator", "1"): 3}
    vision = {s.labels["le"]: s.value for s in samples(compute, "_bucket") if s.labels["stage"] == "vision"}
    assert (vision["0.02"], vision["0.04"]) == (0, 6)  # 30 ms per frame


def test_frame_latency_and_queue_wait_come_from_the_delivered_traces(job):
    families = scrape(job)
    (count,) = samples(families["mindmirror_frame_latency_seconds"], "_count")
    assert count.labels == {"pipeline": "mirror", "generator": "stylenet"} and count.value == 6
    (total,) = samples(families["mindmirror_frame_latency_seconds"], "_sum")
    assert total.value == pytest.approx(6 * 0.180, abs=1e-6)
    waits = {s.labels["stage"]: s for s in samples(families["mindmirror_stage_queue_wait_seconds"], "_sum")}
    assert set(waits) == {"ingest", "vision", "generator", "display"}
    assert waits["vision"].value == pytest.approx(6 * 0.005, abs=1e-6)
    assert (waits["vision"].labels["rank"], waits["vision"].labels["node"]) == ("1", "0")
    # The trace does not say which generator replica took a frame: both ranks are named.
    assert (waits["generator"].labels["rank"], waits["generator"].labels["node"]) == ("2,3", "0,1")


def test_links_count_bytes_and_messages_from_the_sender_with_both_ends_named(job):
    families = scrape(job)
    size = {s.labels["link"]: s for s in samples(families["mindmirror_link_bytes"], "_total")}
    assert size["ingest#0->vision#0"].value == sum(100 + i for i in range(6))
    assert size["vision#0->generator#1"].value == sum(100 + i for i in (1, 3, 5))
    cross = size["vision#0->generator#1"].labels
    assert (cross["src_rank"], cross["dst_rank"], cross["src_node"], cross["dst_node"]) == ("1", "3", "0", "1")
    messages = {s.labels["link"]: s.value for s in samples(families["mindmirror_link_messages"], "_total")}
    assert messages == {"ingest#0->vision#0": 6, "vision#0->generator#0": 3, "vision#0->generator#1": 3,
                        "generator#0->display#0": 3, "generator#1->display#0": 3}
    hops = {s.labels["hop"]: s.value for s in samples(families["mindmirror_hop_seconds"], "_count")}
    assert hops == messages  # every message the readers took, measured on the reading rank


def test_ranks_queues_registry_and_diffusion_series(job):
    job.inbox.put(Message(session="s", frame_id=99))
    families = scrape(job)
    up = {s.labels["rank"]: (s.value, s.labels["node"]) for s in samples(families["mindmirror_rank_up"])}
    assert up == {"0": (1, "0"), "1": (1, "0"), "2": (1, "0"), "3": (0, "1")}
    depth = {(s.labels["queue"], s.labels["rank"]): s.value for s in samples(families["mindmirror_queue_depth"])}
    assert depth[("sessions", "0")] == 1 and depth[("ingest#0->vision#0", "0")] == 0
    resident = samples(families["mindmirror_registry_models_resident"])
    assert [(s.labels["stage"], s.labels["replica"], s.labels["rank"], s.value) for s in resident] == [
        ("generator", "1", "3", 2)]
    assert samples(families["mindmirror_registry_capacity_bytes"])[0].value == 250
    assert samples(families["mindmirror_registry_bytes_used"])[0].value == 200
    events = {s.labels["event"]: s.value for s in samples(families["mindmirror_registry_events"], "_total")}
    stats = job.registry.stats()
    assert events == {"hit": stats["hits"], "miss": stats["misses"], "load": 3, "eviction": 1, "failure": 0,
                      "expired": 0, "unload": 0, "joined": 0, "rejected": 0} and stats["hits"] == 1
    (steps,) = samples(families["mindmirror_diffusion_steps"], "_total")
    assert (steps.labels["replica"], steps.labels["rank"], steps.value) == ("9", "3", 12)
    assert "mindmirror_gpu_utilization_ratio" not in families  # no GPU reported: no series


def test_gpu_figures_are_labelled_per_rank_and_device(job):
    snap = snapshot_over_the_wire(job.builders[2]())
    snap["gpus"] = [{"gpu": "0", "util": 0.42, "used": 3 << 30, "total": 80 << 30}]
    job.aggregator.on_snapshot(2, snap)
    families = scrape(job)
    (util,) = samples(families["mindmirror_gpu_utilization_ratio"])
    assert util.labels == {"rank": "2", "role": "generator", "node": "0", "gpu": "0"} and util.value == 0.42
    assert samples(families["mindmirror_gpu_memory_total_bytes"])[0].value == 80 << 30


def test_a_snapshot_from_other_code_is_left_out_not_fatal(job):
    snap = snapshot_over_the_wire(job.builders[1]())
    snap["stages"]["vision#0"]["compute_s"] = [0.0, 1, 2]  # another bucket layout
    job.aggregator.on_snapshot(1, snap)
    compute = scrape(job)["mindmirror_stage_compute_seconds"]
    assert "vision" not in {s.labels["stage"] for s in compute.samples}
    assert "generator" in {s.labels["stage"] for s in compute.samples}


def test_stats_keeps_its_shape_names_nodes_and_clocks_and_leaves_buckets_out(job):
    stats = job.aggregator.stats()
    assert {"fps", "sessions", "delivered", "stages", "hops", "spans", "drops", "ranks", "revision"} <= set(stats)
    assert stats["delivered"] == 6 and stats["stages"]["vision#0"]["compute_ms"]["count"] == 6
    assert "compute_s" not in stats["stages"]["vision#0"]
    link = stats["hops"]["vision#0->generator#1"]
    assert (link["src_rank"], link["dst_rank"], link["src_node"], link["dst_node"]) == (1, 3, "0", "1")
    assert "hop_s" not in link and link["hop_ms"]["count"] == 3
    assert [(r["rank"], r["node"]) for r in stats["ranks"]] == [(0, "0"), (1, "0"), (2, "0"), (3, "1")]
    clock = stats["clock"]
    assert clock["1"]["same_node"] and clock["1"]["offset_ms"] == 0.0
    assert not clock["3"]["same_node"] and clock["3"]["samples"] == 1 and clock["3"]["min_one_way_ms"] >= 0


def test_the_clock_offset_of_another_node_is_the_smallest_heartbeat_delay():
    job = Job()
    for delay in (0.030, 0.004, 0.012):  # rank 3's clock 2 s behind rank 0's, plus delivery time
        snap = snapshot_over_the_wire(job.builders[3]())
        snap["sent_at"] = time.time() - 2.0 - delay
        job.aggregator.on_snapshot(3, snap)
    offset = job.aggregator.stats()["clock"]["3"]["offset_ms"]
    assert 2004.0 <= offset < 2004.0 + 50  # the fastest delivery, plus this test's own time
    (gauge,) = [s for s in samples(scrape(job)["mindmirror_clock_offset_seconds"]) if s.labels["rank"] == "3"]
    assert gauge.value == pytest.approx(offset / 1000.0, abs=1e-3)


PER_RANK = {"rank", "role", "node"}
LINK = {"src_rank", "dst_rank", "src_node", "dst_node"}
CONTRACT = {
    "mindmirror_frame_latency_seconds": {"pipeline", "generator"},
    "mindmirror_stage_compute_seconds": {"stage", *PER_RANK},
    "mindmirror_stage_queue_wait_seconds": {"stage", *PER_RANK},
    "mindmirror_hop_seconds": {"hop", *LINK},
    "mindmirror_link_bytes_total": {"link", *LINK},
    "mindmirror_link_messages_total": {"link", *LINK},
    "mindmirror_frames_dropped_total": {"reason"},
    "mindmirror_queue_depth": {"queue"},
    "mindmirror_registry_models_resident": {"stage", "replica", *PER_RANK},
    "mindmirror_registry_bytes_used": {"stage", "replica", *PER_RANK},
    "mindmirror_registry_capacity_bytes": {"stage", "replica", *PER_RANK},
    "mindmirror_registry_events_total": {"stage", "replica", "event", *PER_RANK},
    "mindmirror_diffusion_steps_total": {"stage", "replica", "rank"},
    "mindmirror_gpu_utilization_ratio": {"gpu", *PER_RANK},
    "mindmirror_gpu_memory_used_bytes": {"gpu", *PER_RANK},
    "mindmirror_gpu_memory_total_bytes": {"gpu", *PER_RANK},
    "mindmirror_rank_up": PER_RANK,
}
"""The names and labels agreed for issue 12 (dashboards and the page use them)."""


def test_every_agreed_metric_is_exposed_with_at_least_its_agreed_labels(job):
    snap = snapshot_over_the_wire(job.builders[1]())
    snap["gpus"] = [{"gpu": "0", "util": 0.5, "used": 1, "total": 2}]
    job.aggregator.on_snapshot(1, snap)
    series: dict[str, set] = {}
    for family in scrape(job).values():
        for s in family.samples:
            series.setdefault(s.name, set()).update(s.labels)
    for name, labels in CONTRACT.items():
        exposed = series.get(f"{name}_count" if name.endswith("_seconds") else name)
        assert exposed is not None, f"{name} is not exposed"
        assert labels <= exposed, (name, labels - exposed)
