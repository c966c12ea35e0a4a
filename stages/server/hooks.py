"""The seam between the web server (rank 0) and the pipeline runtime.

The server knows sockets, HTTP and the wire protocol; the runtime knows stages and
ranks. They meet here: the server calls ``PipelineHooks`` (thread-safe, non-blocking)
and the runtime pushes results back through ``SessionSink`` (thread-safe: the runtime
calls it from its stage threads, the server hands the data to its event loop).
"""

from __future__ import annotations

from typing import Any, Protocol


class PipelineHooks(Protocol):
    def open_session(self, session: str) -> None:
        """A browser connected; frames for ``session`` may follow."""

    def close_session(self, session: str) -> None:
        """The browser left; drop its queued frames."""

    def submit_frame(self, session: str, frame_id: int, client_ts: float, jpeg: bytes,
                     width: int, height: int) -> None:
        """Queue a validated camera frame (drop-oldest per session when behind)."""

    def update_config(self, partial: dict[str, Any]) -> dict[str, Any]:
        """Apply a live config change; returns ``config_current()``. Raises ConfigError."""

    def apply_preset(self, name: str) -> dict[str, Any]:
        """Apply a named preset; returns ``config_current()``. Raises ConfigError."""

    def config_current(self) -> dict[str, Any]:
        """``{"config": {...}, "revision": n, "presets": [...], "status": {...}}``."""

    def health(self) -> dict[str, Any]:
        """``{"ok": bool, "ranks": [{"rank", "role", "node", "device", "alive", "last_seen_s"}]}``."""

    def stats(self) -> dict[str, Any]:
        """FPS, latency percentiles per stage and hop, drops, per-rank liveness."""

    def metrics_text(self) -> bytes:
        """Prometheus text exposition of the runtime's metrics."""


class SessionSink(Protocol):
    def deliver_output(self, session: str, frame_id: int, client_ts: float, jpeg: bytes,
                       vision: dict[str, Any]) -> None:
        """An output frame (kind 3) and its ``vision`` JSON message for one session."""

    def deliver_error(self, session: str, code: str, message: str) -> None:
        """An ``error`` message for one session (e.g. a frame that failed to decode)."""
