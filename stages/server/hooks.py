"""The seam between the web server (the server rank) and the pipeline runtime.

The server knows sockets, HTTP and the wire protocol; the runtime knows stages and
ranks. They meet here: the server calls ``PipelineHooks`` (thread-safe, non-blocking)
and the runtime pushes results back through ``SessionSink`` (thread-safe: the runtime
calls it from its stage threads, the server hands the data to its event loop).

The payloads at the browser's ends of a pipeline are declared here too: the first stage
of a pipeline that takes camera frames accepts ``CAMERA_JPEG``, that of one that takes
the microphone (lip-sync) accepts ``AUDIO_PCM``, and the last stage of one that shows
frames on the page emits ``OUTPUT_JPEG``.

A pipeline takes one kind of input (``takes()``): the server refuses the other kind with
``unsupported_kind`` before any hook sees it. Hooks written before lip-sync (no ``takes``,
``submit_audio``, ``select_avatar``, ``models``, ``model_action``, ``job_status``) still
work: the server treats them as a camera pipeline with no avatars and no models whose job
never degrades (``hook_or_none``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol

import torch

from stages.base import Payload

CAMERA_JPEG = Payload("camera.jpeg", (torch.uint8,))
"""A camera frame from the page: tensors[0] the JPEG bytes (1-D uint8, CPU); meta
``width``/``height`` as the server's header probe read them; ``capture_ts`` the page's
timestamp, ``frame_id`` its frame id."""
OUTPUT_JPEG = Payload("output.jpeg", (torch.uint8,))
"""A frame for the page: tensors[0] the JPEG bytes (1-D uint8, any device); meta
``vision`` = ``{"frame_id", "faces"}`` for the page's overlay (optional); a lip-sync
pipeline's frame ``i`` shows audio samples ``[640 i, 640 (i + 1))`` of its session and its
``vision`` is ``{"frame_id", "lipsync": {"avatar", "generator", "speech", "loudness_db",
"avatar_frame"}}``; ``capture_ts`` the page clock at sample ``640 i``."""
AUDIO_PCM = Payload("audio.pcm16", (torch.int16,))
"""An audio chunk from the page: tensors[0] the samples (1-D int16, CPU, 16 kHz mono); meta
``avatar`` (str, the session's avatar) and ``sample_rate`` (16000); ``frame_id`` the chunk's
sequence number, ``capture_ts`` the page clock at its first sample."""

CAMERA = "camera"
AUDIO = "audio"
Takes = Literal["camera", "audio"]


class PipelineHooks(Protocol):
    def takes(self) -> Takes:
        """``"camera"`` (binary kind 1, ``submit_frame``) or ``"audio"`` (kind 2,
        ``submit_audio``): the input this pipeline's first stage accepts."""

    def open_session(self, session: str) -> None:
        """A browser connected; frames for ``session`` may follow."""

    def close_session(self, session: str) -> None:
        """The browser left; drop its queued frames."""

    def submit_frame(self, session: str, frame_id: int, client_ts: float, jpeg: bytes,
                     width: int, height: int) -> None:
        """Queue a validated camera frame (drop-oldest per session when behind)."""

    def submit_audio(self, session: str, chunk_id: int, client_ts: float, pcm: bytes) -> None:
        """Queue a validated audio chunk (PCM16 LE mono 16 kHz, non-empty, even length, within
        the size and rate limits); ``chunk_id`` is its sequence number in the session,
        ``client_ts`` the page clock (ms) at its first sample. Chunks arrive in order."""

    def select_avatar(self, session: str, avatar: str) -> dict[str, Any]:
        """Show ``avatar`` to ``session`` from now on; returns ``config_current()``. Raises
        LookupError for an avatar the pipeline does not have (the page is told
        ``unknown_avatar``), ConfigError for one it cannot use (``bad_config``)."""

    def models(self) -> dict[str, Any]:
        """The lip-sync models this pipeline serves, as JSON for ``GET /models``; the
        runtime's is its model directory's view (``{"placement", "replicas": [...],
        "avatars": {id: {"state", "replicas", "assigned"}}}``); the page also reads a plain
        ``{"models": [{"id", "loaded", "bytes"}]}``. Raises NotImplementedError or
        LookupError when the pipeline serves no models (HTTP 404)."""

    def model_action(self, avatar: str, action: str) -> dict[str, Any]:
        """``action`` is ``"load"`` or ``"unload"``: load or drop ``avatar``'s model; may
        return once the action is under way (``models()`` shows when it is done). Raises
        LookupError for an unknown avatar or a pipeline without models (HTTP 404),
        ValueError for a bad action or a load that failed (409), NotImplementedError when
        the pipeline serves no models (404). Runs on a worker thread, never the event loop."""

    def update_config(self, partial: dict[str, Any]) -> dict[str, Any]:
        """Apply a live config change; returns ``config_current()``. Raises ConfigError."""

    def apply_preset(self, name: str) -> dict[str, Any]:
        """Apply a named preset; returns ``config_current()``. Raises ConfigError."""

    def config_current(self) -> dict[str, Any]:
        """``{"config": {...}, "revision": n, "styles": [...], "presets": [...], "status": {...}}``;
        ``styles`` lists every style the config accepts (the page builds its menu from it).
        A lip-sync pipeline adds ``avatars`` (the ids a session may select), ``avatar`` (the
        one a session shows until it selects another) and ``registry`` (its models); the
        server replaces ``avatar`` with each session's own selection."""

    def health(self) -> dict[str, Any]:
        """``{"ok": bool, "ranks": [{"rank", "role", "node", "device", "alive", "last_seen_s"}]}``."""

    def job_status(self) -> dict[str, Any] | None:
        """The last ``status`` the sessions were sent (``{"state", "message", "lost"}``), for a
        session that connects now; None while the job runs as planned. Optional."""

    def stats(self) -> dict[str, Any]:
        """FPS, latency percentiles per stage and hop, drops, per-rank liveness."""

    def metrics_text(self) -> bytes:
        """Prometheus text exposition of the runtime's metrics: every rank's, labelled
        ``rank``, ``role``, ``node`` (``runtime.prometheus`` lists the names)."""

    def trace(self, last: int) -> dict[str, Any]:
        """The newest ``last`` (1..1000) completed frames' traces as a Chrome trace JSON
        object that Perfetto opens: ``{"traceEvents": [...], "displayTimeUnit": "ms",
        "metadata": {..., "clock_offsets": {rank: {...}}}}``, complete events ("ph": "X",
        microseconds) per stage and per hop, one process per rank. Raises ``ValueError``
        for ``last`` out of range. Optional: hooks without it have no ``GET /trace`` (404)."""


class SessionSink(Protocol):
    def deliver_output(self, session: str, frame_id: int, client_ts: float, jpeg: bytes,
                       vision: dict[str, Any]) -> None:
        """An output frame (kind 3) and its ``vision`` JSON message for one session."""

    def deliver_error(self, session: str, code: str, message: str) -> None:
        """An ``error`` message for one session (e.g. a frame that failed to decode)."""

    def deliver_status(self, state: str, message: str, lost: list[dict[str, Any]]) -> None:
        """A ``status`` message for every session: the job lost a rank (``protocol.status_message``)."""


def hook_or_none(hooks: object, name: str) -> Callable[..., Any] | None:
    """``hooks.<name>`` if this hooks object has it, else None (hooks from before lip-sync)."""
    method = getattr(hooks, name, None)
    return method if callable(method) else None


def pipeline_takes(hooks: object) -> Takes:
    """What the pipeline behind ``hooks`` takes; checked, so a typo cannot route audio
    into a camera pipeline."""
    takes = hook_or_none(hooks, "takes")
    kind = takes() if takes is not None else CAMERA
    if kind not in (CAMERA, AUDIO):
        raise ValueError(f"PipelineHooks.takes() must return 'camera' or 'audio', got {kind!r}")
    return kind
