"""Delivered frames' traces as OpenTelemetry spans, when ``opentelemetry-sdk`` is installed.

Optional (the ``otel`` extra) and opt-in through the standard environment variables, so
nothing happens on a machine that did not ask for it:

* ``OTEL_TRACES_EXPORTER``: ``console`` (the SDK's), ``otlp`` (needs
  ``opentelemetry-exporter-otlp``; ``OTEL_EXPORTER_OTLP_ENDPOINT`` and the other
  ``OTEL_EXPORTER_OTLP_*`` variables configure it), a comma-separated list, or ``none``.
  Unset, with ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) set, means
  ``otlp``; unset without either means no export.
* ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``: the resource (default service
  name ``mind-mirror``).

Exporters are found by name through the ``opentelemetry_traces_exporter`` entry points,
as the SDK's own auto-configuration does. One frame becomes one trace: a ``frame`` root
span (server receive to send) with a child per stage and per hop, on rank 0's clock
(``runtime.tracing`` corrects other nodes' stamps). Spans are built on a worker thread
from a bounded queue, so a slow exporter costs dropped traces (counted), never frames.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable

log = logging.getLogger(__name__)

SERVICE_NAME = "mind-mirror"
ENTRY_POINT_GROUP = "opentelemetry_traces_exporter"


@dataclass(frozen=True, slots=True)
class TimedSpan:
    """A span ready for export: name, kind, times on rank 0's clock, attributes."""

    name: str
    kind: str
    start: float
    end: float
    attributes: dict[str, Any]


def exporter_names(environ: dict[str, str] | None = None) -> list[str]:
    """The exporters the environment asks for (see the module docstring)."""
    env = os.environ if environ is None else environ
    raw = env.get("OTEL_TRACES_EXPORTER")
    if raw is None:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint else []
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    return [] if "none" in names else names


class OtelExport:
    """Exports frames' spans through a private ``TracerProvider`` (the process's global
    one is left alone). ``spans_of`` turns a frame into (root, children) on rank 0's clock."""

    def __init__(self, exporters: list[Any], spans_of: Callable[[Any], tuple[TimedSpan, list[TimedSpan]]],
                 *, batch: bool = True, queue_size: int = 1000) -> None:
        from opentelemetry.sdk.resources import SERVICE_NAME as SERVICE_KEY
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        resource = Resource.create()
        if str(resource.attributes.get(SERVICE_KEY, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_KEY: SERVICE_NAME}))
        self.provider = TracerProvider(resource=resource)
        self.exporters = list(exporters)
        for exporter in exporters:
            self.provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("mindmirror.runtime")
        self.spans_of = spans_of
        self.dropped = 0
        """Frames not exported because the queue was full."""
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="otel-export", daemon=True)
        self._thread.start()

    @classmethod
    def from_environment(cls, spans_of: Callable[[Any], tuple[TimedSpan, list[TimedSpan]]],
                         environ: dict[str, str] | None = None) -> "OtelExport | None":
        """An exporter as the environment asks, or None: no ``opentelemetry-sdk``, no
        exporter asked for, or none of those asked for installed (logged)."""
        names = exporter_names(environ)
        if not names:
            return None
        try:
            import opentelemetry.sdk.trace  # noqa: F401
        except ImportError:
            log.warning("OTEL_TRACES_EXPORTER=%s but opentelemetry-sdk is not installed: no spans exported "
                        "(pip install 'mind-mirror[otel]')", ",".join(names))
            return None
        exporters = []
        for name in names:
            found = list(entry_points(group=ENTRY_POINT_GROUP, name=name))
            if not found:
                log.warning("no OpenTelemetry span exporter %r installed (for otlp: pip install "
                            "opentelemetry-exporter-otlp); skipping it", name)
                continue
            try:
                exporters.append(found[0].load()())
            except Exception:
                log.exception("OpenTelemetry span exporter %r failed to start; skipping it", name)
        if not exporters:
            return None
        log.info("exporting frame traces as OpenTelemetry spans to %s", ", ".join(names))
        return cls(exporters, spans_of)

    def submit(self, frame: Any) -> None:
        """Queue one frame for export; never blocks (a full queue drops it, counted)."""
        try:
            self._queue.put_nowait(frame)
        except queue.Full:
            self.dropped += 1

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued frame is exported (tests, shutdown)."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout) and self.provider.force_flush(int(timeout * 1000))

    def shutdown(self) -> None:
        self.flush()
        self.provider.shutdown()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                self._export(item)
            except Exception:  # a bad trace must not end the exporter
                log.exception("could not export a frame's trace")

    def _export(self, frame: Any) -> None:
        from opentelemetry import trace

        root, children = self.spans_of(frame)
        parent = self.tracer.start_span(root.name, start_time=_ns(root.start), attributes=root.attributes)
        context = trace.set_span_in_context(parent)
        for span in children:
            child = self.tracer.start_span(span.name, context=context, start_time=_ns(span.start),
                                           attributes={**span.attributes, "mindmirror.span_kind": span.kind})
            child.end(end_time=_ns(max(span.end, span.start)))
        parent.end(end_time=_ns(max(root.end, root.start)))


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))
