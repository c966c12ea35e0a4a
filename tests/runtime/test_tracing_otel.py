"""Delivered frames as OpenTelemetry spans: opt-in by the standard environment variables,
and only when ``opentelemetry-sdk`` (the ``otel`` extra) is installed."""

from __future__ import annotations

import io
import logging

import pytest

from comms.message import Message
from core.settings import RuntimeSettings
from runtime.aggregate import Aggregator
from runtime.live_view import LiveView
from runtime.otel_export import OtelExport, exporter_names

TRACE = [("server.recv", 1000.000), ("ingest.start", 1000.004), ("ingest.end", 1000.005),
         ("vision.start", 1000.010), ("vision.end", 1000.040), ("server.send", 1000.050)]


def aggregator() -> Aggregator:
    agg = Aggregator(roles={0: "server+ingest", 1: "vision"}, liveness=dict, inbox=None,
                     live=LiveView(1, RuntimeSettings()), otel=False,
                     local_snapshot=lambda: {"rank": 0, "role": "server+ingest", "node": 0, "pipeline": "mirror",
                                             "stages": {"ingest#0": {"stage": "ingest", "kind": "ingest"}}})
    agg.on_snapshot(1, {"rank": 1, "role": "vision", "node": 0, "stages": {"vision#0": {"stage": "vision",
                                                                                      "kind": "vision"}}})
    agg.stats()
    return agg


def deliver(agg: Aggregator, frame_id: int) -> None:
    agg.on_delivered(Message(session="s1", frame_id=frame_id, meta={"style": {"generator": "stylenet"}},
                             trace=[(n, t + frame_id) for n, t in TRACE]))


def test_the_environment_decides_which_exporters_if_any():
    assert exporter_names({}) == []  # nothing asked for: nothing exported
    assert exporter_names({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert exporter_names({"OTEL_TRACES_EXPORTER": "Console, otlp"}) == ["console", "otlp"]
    assert exporter_names({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}) == ["otlp"]
    assert OtelExport.from_environment(lambda frame: None, environ={}) is None


def test_an_exporter_that_is_not_installed_is_skipped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="runtime.otel_export"):
        assert OtelExport.from_environment(lambda frame: None, environ={"OTEL_TRACES_EXPORTER": "no-such"}) is None
    assert "no-such" in caplog.text


def test_each_frame_is_one_trace_a_root_span_with_a_child_per_stage_and_hop():
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    agg, memory = aggregator(), InMemorySpanExporter()
    agg.otel = OtelExport([memory], agg.export_spans, batch=False)
    for i in range(3):
        deliver(agg, i)
    assert agg.otel.flush(5)
    spans = memory.get_finished_spans()
    assert len(spans) == 3 * 6
    roots = [s for s in spans if s.parent is None]
    assert [r.name for r in roots] == ["frame"] * 3 and len({r.context.trace_id for r in roots}) == 3
    root = roots[0]
    assert (root.start_time, root.end_time) == (1000_000_000_000, 1000_050_000_000)
    assert dict(root.attributes) == {"mindmirror.session": "s1", "mindmirror.frame_id": 0,
                                     "mindmirror.pipeline": "mirror", "mindmirror.generator": "stylenet"}
    children = sorted((s for s in spans if s.parent is not None and s.context.trace_id == root.context.trace_id),
                      key=lambda s: s.start_time)
    assert [c.name for c in children] == ["server\u2192ingest", "ingest", "ingest\u2192vision", "vision",
                                          "vision\u2192server"]
    assert all(c.parent.span_id == root.context.span_id for c in children)
    vision = children[3]
    assert vision.end_time - vision.start_time == 30_000_000
    assert (vision.attributes["mindmirror.rank"], vision.attributes["mindmirror.span_kind"]) == ("1", "stage")
    assert agg.otel.dropped == 0
    agg.otel.shutdown()


def test_the_console_exporter_named_in_the_environment_prints_the_spans():
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    agg = aggregator()
    agg.otel = OtelExport.from_environment(agg.export_spans, environ={"OTEL_TRACES_EXPORTER": "console"})
    assert agg.otel is not None
    (console,) = agg.otel.exporters
    assert isinstance(console, ConsoleSpanExporter)
    console.out = io.StringIO()  # it writes to the sys.stdout of when it was imported
    deliver(agg, 7)
    assert agg.otel.flush(5)
    agg.otel.shutdown()
    out = console.out.getvalue()
    assert '"name": "frame"' in out and '"mindmirror.frame_id": 7' in out and '"service.name": "mind-mirror"' in out
