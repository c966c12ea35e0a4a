"""Per-frame traces as spans and as the Chrome trace JSON that ``GET /trace`` serves."""

from __future__ import annotations

import json

import pytest
import torch

from comms.message import Message
from core.settings import RuntimeSettings
from runtime.aggregate import MAX_TRACES, Aggregator
from runtime.frontdoor import FrontDoor
from runtime.live_config import LiveConfig
from runtime.live_view import LiveView
from runtime.tracing import (ClockEstimate, ClockOffsets, FrameTrace, Places, RankInfo, TraceRing, chrome_trace,
                             frame_spans)

MIRROR = [("server.recv", 0.000), ("ingest.start", 0.004), ("ingest.end", 0.005), ("vision.start", 0.010),
          ("vision.end", 0.040), ("generator.start", 0.050), ("generator.end", 0.170), ("display.start", 0.175),
          ("display.end", 0.177), ("server.send", 0.180)]


def frame(frame_id: int, t0: float = 1000.0, points=MIRROR, shift: dict[str, float] | None = None) -> FrameTrace:
    """A delivered frame's trace starting at ``t0``; ``shift`` moves the stamps of some
    stages (a rank whose clock is off)."""
    shift = shift or {}
    return FrameTrace("s1", frame_id, "stylenet",
                      tuple((n, t0 + t + shift.get(n.split(".")[0], 0.0)) for n, t in points))


def places(generator_ranks=(2,), nodes=None) -> Places:
    nodes = nodes or {0: "0", 1: "0", 2: "0", 3: "1"}
    ranks = {r: RankInfo(r, role, nodes[r]) for r, role in
             {0: "server+ingest+display", 1: "vision", 2: "generator", 3: "generator"}.items()}
    return Places(server_rank=0, ranks=ranks, stages={
        "ingest": ("ingest", (0,)), "display": ("display", (0,)), "vision": ("vision", (1,)),
        "generator": ("generator", tuple(generator_ranks))})


def one_clock(ranks=(0, 1, 2, 3)) -> dict[int, ClockEstimate]:
    return {r: ClockEstimate(0.0, 0.0003, 5, True) for r in ranks}


def x_events(trace: dict) -> list[dict]:
    return [e for e in trace["traceEvents"] if e["ph"] == "X"]


def test_spans_are_stages_between_start_and_end_and_hops_between_the_rest():
    spans = frame_spans(frame(0, 0.0).points)
    assert [(s.kind, s.src, s.dst, s.waits) for s in spans] == [
        ("hop", "server", "ingest", True), ("stage", "ingest", "ingest", False), ("hop", "ingest", "vision", True),
        ("stage", "vision", "vision", False), ("hop", "vision", "generator", True),
        ("stage", "generator", "generator", False), ("hop", "generator", "display", True),
        ("stage", "display", "display", False), ("hop", "display", "server", False)]
    assert [round(s.end - s.start, 6) for s in spans][:4] == [0.004, 0.001, 0.005, 0.03]
    # A stage that stamps a single point (the lip-sync 'present') sits between two hops.
    points = (("lipsync.end", 1.0), ("present", 1.5), ("server.send", 1.6))
    assert [(s.kind, s.src, s.dst) for s in frame_spans(points)] == [("hop", "lipsync", "present"),
                                                                     ("hop", "present", "server")]


def test_the_chrome_trace_is_valid_json_sorted_with_named_tracks_and_no_negative_span():
    frames = [frame(i, 1000.0 + 0.05 * i) for i in range(6)]  # pipelined: frames overlap in time
    trace = json.loads(json.dumps(chrome_trace(frames, places(), one_clock(), {"pipeline": "mirror"})))
    assert set(trace) == {"traceEvents", "displayTimeUnit", "metadata"} and trace["displayTimeUnit"] == "ms"
    kinds = [e["ph"] for e in trace["traceEvents"]]
    assert kinds == sorted(kinds, key=lambda ph: ph != "M")  # names first, then the spans
    events = x_events(trace)
    assert len(events) == 6 * (1 + 9)  # a whole-frame span and nine spans per frame
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)
    assert all(isinstance(e["ts"], int) and isinstance(e["dur"], int) and e["dur"] >= 0 for e in events)
    named = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    processes = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert all((e["pid"], e["tid"]) in named for e in events)
    assert processes == {0: "rank 0 (server+ingest+display) node 0", 1: "rank 1 (vision) node 0",
                         2: "rank 2 (generator) node 0"}
    vision = [e for e in events if e["name"] == "vision"]
    assert {e["pid"] for e in vision} == {1} and {e["dur"] for e in vision} == {30_000}
    assert trace["metadata"]["pipeline"] == "mirror" and trace["metadata"]["frames"] == 6
    assert set(trace["metadata"]["clock_offsets"]) == {"0", "1", "2", "3"}
    assert "clock" in trace["metadata"]["clock_sync"]


def test_spans_on_one_thread_never_partly_overlap_overlapping_frames_get_lanes():
    frames = [frame(i, 1000.0 + 0.05 * i) for i in range(8)]  # each frame lasts 180 ms, one every 50 ms
    trace = chrome_trace(frames, places(), one_clock())
    by_thread: dict[tuple, list] = {}
    for e in x_events(trace):
        by_thread.setdefault((e["pid"], e["tid"]), []).append(e)
    for events in by_thread.values():
        for a, b in zip(events, events[1:]):
            assert b["ts"] >= a["ts"] + a["dur"], (a, b)  # Perfetto drops X events that overlap on a thread
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert {"frames", "frames #2", "frames #4", "vision", "ingest\u2192vision"} <= names


def test_another_nodes_stamps_are_moved_onto_rank_0s_clock():
    # Rank 2 (generator) runs on node 1 with a clock 2 s ahead: its stamps read 2 s late.
    skewed = frame(0, shift={"generator": 2.0})
    clocks = {**one_clock((0, 1)), 2: ClockEstimate(-2.0, -1.9995, 10, False)}
    trace = chrome_trace([skewed], places(nodes={0: "0", 1: "0", 2: "1", 3: "1"}), clocks)
    spans = {e["name"]: e for e in x_events(trace)}
    assert spans["vision\u2192generator"]["dur"] == 10_000 and spans["generator\u2192display"]["dur"] == 5_000
    assert spans["generator"]["ts"] == spans["vision"]["ts"] + 40_000
    assert spans["vision\u2192generator"]["args"]["clock_corrected"] is True
    # Unknown offset: the span is shown at length 0 and says by how much the clocks disagreed.
    trace = chrome_trace([frame(0, shift={"generator": -1.0})], places(), {})
    hop = next(e for e in x_events(trace) if e["name"] == "vision\u2192generator")
    assert hop["dur"] == 0 and hop["args"]["negative_us"] == -990_000 and hop["args"]["clock_corrected"] is False


def test_a_stage_replicated_over_ranks_gets_its_own_process():
    trace = chrome_trace([frame(0)], places(generator_ranks=(2, 3)), one_clock())
    processes = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    generator = next(e for e in x_events(trace) if e["name"] == "generator")
    assert processes[generator["pid"]] == "replicas on ranks 2, 3"


def test_the_trace_ring_keeps_the_newest():
    ring = TraceRing(3)
    for i in range(5):
        ring.add(frame(i))
    assert [f.frame_id for f in ring.newest(10)] == [2, 3, 4]
    assert [f.frame_id for f in ring.newest(2)] == [3, 4] and ring.newest(0) == []
    with pytest.raises(ValueError, match="at least 1"):
        TraceRing(0)


def test_clock_offsets_take_the_smallest_delay_over_a_window():
    clocks = ClockOffsets(window=3)
    for sent, received in ((10.0, 12.5), (20.0, 22.1), (30.0, 32.3), (40.0, 42.2)):
        clocks.observe(5, sent, received)
    estimate = clocks.estimate(5, same_node=False)
    assert estimate.offset_s == pytest.approx(2.1) and estimate.samples == 3
    assert clocks.estimate(5, same_node=True).offset_s == 0.0  # one machine, one clock
    assert clocks.estimate(6, same_node=False).as_json() == {"offset_ms": 0.0, "min_one_way_ms": None,
                                                             "samples": 0, "same_node": False, "basis": "none yet"}


def test_the_front_door_serves_the_newest_delivered_frames():
    live = LiveView(1, RuntimeSettings())
    aggregator = Aggregator(roles={0: "server+ingest"}, liveness=dict, inbox=None, live=live, otel=False,
                            local_snapshot=lambda: {"rank": 0, "role": "server+ingest", "node": 0,
                                                    "stages": {"ingest#0": {"stage": "ingest", "kind": "ingest"}}})
    door = FrontDoor(pipeline="p", live_config=LiveConfig(RuntimeSettings(), {}), live_view=live, inbox=None,
                     aggregator=aggregator, publish_config=lambda revision, settings: None, health=dict)
    aggregator.stats()  # rank 0 reads its own snapshot
    for i in range(MAX_TRACES + 5):
        msg = Message(session="s", frame_id=i, tensors=[torch.zeros(1)], trace=[
            ("server.recv", 1.0 + i), ("ingest.start", 1.001 + i), ("ingest.end", 1.002 + i), ("server.send", 1.003 + i)])
        aggregator.on_delivered(msg)
    trace = door.trace(2)
    assert [e["args"]["frame_id"] for e in x_events(trace) if e["cat"] == "frame"] == [MAX_TRACES + 3, MAX_TRACES + 4]
    assert {e["pid"] for e in x_events(trace)} == {0}
    assert len([e for e in x_events(door.trace(MAX_TRACES)) if e["cat"] == "frame"]) == MAX_TRACES
    for bad in (0, MAX_TRACES + 1):
        with pytest.raises(ValueError, match="last must be"):
            door.trace(bad)
