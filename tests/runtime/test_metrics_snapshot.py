"""Histograms and the heartbeat snapshot: what a rank ships to rank 0 and what rank 0 reads back.

The snapshot is built by the real ``RankSnapshot`` from real stage metrics and real
in-process link ends, and crosses the real inter-rank header encoding, as a heartbeat does.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from comms.header import decode_header, encode_header
from comms.inprocess import inprocess_link
from comms.message import Kind, Message
from runtime.metrics import (SECONDS_BUCKETS, Histogram, HistogramData, HopFeed, LinkSource, RankSnapshot,
                             StageMetrics, StageSource)


def test_buckets_count_values_up_to_and_including_their_bound():
    h = Histogram()
    for value in (0.0, 0.001, 0.0011, 0.0025, 2.56, 2.57, 100.0):
        h.observe(value)
    data = HistogramData.of(h)
    assert data.counts[0] == 2  # 0 and exactly 0.001: Prometheus' le is "less than or equal"
    assert data.counts[1] == 2  # 0.0011 and 0.0025
    assert data.counts[SECONDS_BUCKETS.index(2.56)] == 1
    assert data.counts[-1] == 2  # above every bound: +Inf
    assert data.count == 7 and data.sum == pytest.approx(0.0 + 0.001 + 0.0011 + 0.0025 + 2.56 + 2.57 + 100.0)


def test_a_batch_counts_once_per_frame_and_bad_values_are_not_observed():
    h = Histogram()
    h.observe(0.03, n=4)
    h.observe(float("nan"))
    h.observe(-0.5)  # a wall clock that stepped back
    h.observe(0.03, n=0)
    data = HistogramData.of(h)
    assert data.count == 4 and data.sum == pytest.approx(0.12)
    assert data.counts[SECONDS_BUCKETS.index(0.04)] == 4


def test_cumulative_buckets_rise_to_the_count_and_end_at_infinity():
    h = Histogram()
    for i in range(200):
        h.observe(i / 50.0)  # 0 .. 3.98 s
    cumulative = HistogramData.of(h).cumulative()
    counts = [n for _, n in cumulative]
    assert counts == sorted(counts) and counts[-1] == 200
    assert [b for b, _ in cumulative] == [*SECONDS_BUCKETS, math.inf]
    assert dict(cumulative)[2.56] == 129  # 0, 0.02, ..., 2.56


def test_the_wire_form_survives_json_and_is_checked():
    h = Histogram()
    h.observe(0.004, n=3)
    wire = json.loads(json.dumps(h.wire()))
    assert len(wire) == len(SECONDS_BUCKETS) + 2
    assert HistogramData.from_wire(wire) == HistogramData.of(h)
    for bad in ([1.0, 2, 3], [0.0] + [-1] * (len(SECONDS_BUCKETS) + 1), [0.0] + [0.5] * (len(SECONDS_BUCKETS) + 1),
                "[0, 1]", None):
        with pytest.raises(ValueError, match="histogram"):
            HistogramData.from_wire(bad)
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram((0.1, 0.1))


def test_a_hop_feed_takes_only_the_samples_that_arrived_since_the_last_update():
    feed = HopFeed()
    feed.update(2, [5.0, 7.0])
    feed.update(2, [5.0, 7.0])  # nothing new: nothing counted twice
    wire = feed.update(3, [5.0, 7.0, 30.0])
    data = HistogramData.from_wire(wire)
    assert data.count == 3 and data.sum == pytest.approx(0.042)
    # More arrived than the channel's ring keeps: the newest it still has are counted.
    data = HistogramData.from_wire(feed.update(10, [1.0, 1.0]))
    assert data.count == 5


def link_with_traffic(n_sent: int, n_taken: int, capacity: int = 8):
    writer, reader = inprocess_link("a#0->b#0", capacity)
    for i in range(n_sent):
        writer.send(Message(frame_id=i, tensors=[torch.zeros(1000, dtype=torch.uint8)]))
    for _ in range(n_taken):
        reader.recv(timeout=1)
    return writer, reader


def snapshot_over_the_wire(snapshot: dict) -> dict:
    """As a heartbeat carries it: the meta of a STATUS message through the header codec."""
    msg, _ = decode_header(encode_header(Message(kind=Kind.STATUS, meta={"op": "heartbeat", "snapshot": snapshot})))
    return msg.meta["snapshot"]


def test_a_rank_snapshot_carries_cumulative_histograms_queues_and_where_the_rank_is():
    metrics = StageMetrics("a#0")
    metrics.record_batch(4, 4, 0.02)  # 5 ms per frame
    writer, reader = link_with_traffic(n_sent=5, n_taken=3)
    build = RankSnapshot(rank=2, role="a+b", node=1, pipeline="test",
                         stages={"a#0": StageSource("a", "kind_a", metrics)},
                         links={"a#0->b#0": LinkSource(2, 2, writer, reader)},
                         queues=lambda: {"sessions": 1}, reports=lambda: {"b": {"0": {"x": 1}}})
    snap = snapshot_over_the_wire(build())
    assert (snap["rank"], snap["role"], snap["node"], snap["pipeline"]) == (2, "a+b", 1, "test")
    assert snap["buckets"] == list(SECONDS_BUCKETS) and isinstance(snap["sent_at"], float)
    stage = snap["stages"]["a#0"]
    assert (stage["stage"], stage["kind"], stage["frames_in"]) == ("a", "kind_a", 4)
    compute = HistogramData.from_wire(stage["compute_s"], tuple(snap["buckets"]))
    assert compute.count == 4 and compute.counts[SECONDS_BUCKETS.index(0.005)] == 4
    link = snap["links"]["a#0->b#0"]
    assert (link["src"], link["dst"], link["messages_sent"], link["bytes_sent"]) == (2, 2, 5, 5000)
    assert HistogramData.from_wire(link["hop_s"]).count == 3
    assert snap["queues"] == {"a#0->b#0": 2, "sessions": 1}  # 5 sent, 3 taken
    assert snap["gpus"] == [] and snap["reports"] == {"b": {"0": {"x": 1}}}
    # Cumulative: the next heartbeat counts what came since on top.
    reader.recv(timeout=1)
    metrics.record_batch(1, 1, 0.5)
    again = build()
    assert HistogramData.from_wire(again["links"]["a#0->b#0"]["hop_s"]).count == 4
    assert HistogramData.from_wire(again["stages"]["a#0"]["compute_s"]).count == 5
    assert again["queues"]["a#0->b#0"] == 1 and again["sent_at"] >= snap["sent_at"]


def test_a_writer_only_rank_reports_what_it_sent_and_no_hop_histogram():
    writer, _ = link_with_traffic(n_sent=2, n_taken=0)
    snap = RankSnapshot(rank=0, role="s", node=0, pipeline="p", stages={},
                        links={"a#0->b#0": LinkSource(0, 1, writer=writer)})()
    link = snap["links"]["a#0->b#0"]
    assert "hop_s" not in link and link["bytes_sent"] == 2000 and (link["src"], link["dst"]) == (0, 1)
