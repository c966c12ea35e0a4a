"""The seam between the web server (the server rank) and the pipeline runtime.

The server knows sockets, HTTP and the wire protocol; the runtime knows stages and
ranks. They meet here: the server calls ``PipelineHooks`` (thread-safe, non-blocking)
and the runtime pushes results back through ``SessionSink`` (thread-safe: the runtime
calls it from its stage threads, the server hands the data to its event loop).

The two payloads at the browser's ends of a pipeline are declared here too: the first
stage of a pipeline that takes camera frames accepts ``CAMERA_JPEG``, the last stage of
one that shows frames on the page emits ``OUTPUT_JPEG``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from stages.base import Payload

CAMERA_JPEG = Payload("camera.jpeg", (torch.uint8,))
"""A camera frame from the page: tensors[0] the JPEG bytes (1-D uint8, CPU); meta
``width``/``height`` as the server's header probe read them; ``capture_ts`` the page's
timestamp, ``frame_id`` its frame id."""
OUTPUT_JPEG = Payload("output.jpeg", (torch.uint8,))
"""A frame for the page: tensors[0] the JPEG bytes (1-D uint8, any device); meta
``vision`` = ``{"frame_id", "faces"}`` for the page's overlay (optional)."""


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
        """``{"config": {...}, "revision": n, "styles": [...], "presets": [...], "status": {...}}``;
        ``styles`` lists every style the config accepts (the page builds its menu from it)."""

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
