"""A test double of the runtime behind the web server: it echoes each camera frame back.

``EchoHooks`` implements ``PipelineHooks`` with a real ``LiveConfig`` (so config errors
are the real ones) and a worker thread that returns every submitted JPEG to the server
through ``SessionSink.deliver_output`` with a made-up face, as the runtime would from its
stage threads. It decodes nothing, so tests stay fast; ``transform`` lets the browser
check swap in something visible.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Any, Callable

from core.settings import STYLES, RuntimeSettings
from runtime.live_config import LiveConfig, settings_to_dict
from stages.server.hooks import SessionSink

PRESETS = {"calm": {"style": "ink", "strength": 0.4}, "party": {"style": "neon", "strength": 0.9}}


GENERATOR = "echo"
"""What the double reports as the generator of every frame (``vision["generator"]``)."""


def fake_vision(width: int, height: int) -> dict[str, Any]:
    """Faces shaped like the vision stage's output: a primary face in the middle and a
    small one beside it, level with it, so naively placed labels would overlap."""
    x, y, w, h = width // 4, height // 4, width // 2, height // 2
    side = max(16, width // 8)
    return {"faces": [
        {"face_id": 0, "bbox": [x, y, w, h], "emotion": "happy",
         "emotion_probs": {"happy": 0.8, "neutral": 0.15, "sad": 0.05}, "quality": 0.9, "primary": True,
         "landmarks": [[x + 0.32 * w, y + 0.4 * h], [x + 0.68 * w, y + 0.4 * h], [x + 0.5 * w, y + 0.58 * h],
                       [x + 0.36 * w, y + 0.76 * h], [x + 0.64 * w, y + 0.76 * h]]},
        {"face_id": 1, "bbox": [min(width - side, x + w + 8), y, side, side], "emotion": "neutral",
         "emotion_probs": {"neutral": 0.6, "happy": 0.3, "sad": 0.1}, "quality": 0.7, "primary": False},
    ]}


class EchoHooks:
    def __init__(self, transform: Callable[[bytes], tuple[bytes, dict[str, Any]]] | None = None) -> None:
        self.sink: SessionSink | None = None
        self.live = LiveConfig(RuntimeSettings(), PRESETS)
        self.opened: list[str] = []
        self.closed: list[str] = []
        self.submitted: list[tuple[str, int, float, int, int]] = []
        self.fail_next: Exception | None = None
        """Raised once by the next hook call, to test how the server contains it."""
        self.healthy = True
        self.legacy_vision = False
        """Send ``vision`` as servers before generator/style/landmarks/primary did."""
        self._transform = transform
        self._jobs: queue.Queue[tuple[str, int, float, bytes, int, int] | None] = queue.Queue()
        self._delivered: deque[float] = deque(maxlen=256)
        self._worker = threading.Thread(target=self._echo, name="echo-hooks", daemon=True)
        self._worker.start()

    def close(self) -> None:
        self._jobs.put(None)
        self._worker.join(2)

    def _maybe_fail(self) -> None:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error

    # --- PipelineHooks ---

    def open_session(self, session: str) -> None:
        self.opened.append(session)

    def close_session(self, session: str) -> None:
        self.closed.append(session)

    def submit_frame(self, session: str, frame_id: int, client_ts: float, jpeg: bytes,
                     width: int, height: int) -> None:
        self._maybe_fail()
        self.submitted.append((session, frame_id, client_ts, width, height))
        self._jobs.put((session, frame_id, client_ts, jpeg, width, height))

    def update_config(self, partial: dict[str, Any]) -> dict[str, Any]:
        self._maybe_fail()
        self.live.update(partial)
        return self.config_current()

    def apply_preset(self, name: str) -> dict[str, Any]:
        self.live.apply_preset(name)
        return self.config_current()

    def config_current(self) -> dict[str, Any]:
        revision, settings = self.live.current()
        return {"config": settings_to_dict(settings), "revision": revision, "styles": list(STYLES),
                "presets": self.live.presets,
                "status": {"ranks": self._ranks(), "fps": self._fps()}}

    def health(self) -> dict[str, Any]:
        return {"ok": self.healthy, "ranks": [{**r, "node": "test", "device": "cpu"} for r in self._ranks()]}

    def stats(self) -> dict[str, Any]:
        """Shaped like ``runtime.aggregate.Aggregator.stats()``: nested percentiles and all.
        (The flat p50/p95 keys of a stage are what older tests read.)"""
        compute = {"vision": {"p50": 4.0, "p95": 6.5, "p99": 7.9, "count": 120},
                   "generator": {"p50": 11.0, "p95": 15.2, "p99": 18.736, "count": 120}}
        return {
            "fps": self._fps(),
            "sessions": {session: self._fps() for session in self.opened if session not in self.closed},
            "delivered": len(self._delivered),
            "server_latency_ms": {"p50": 0.4, "p95": 0.9, "p99": 1.2, "count": 10},
            "stages": {name: {"frames_in": 120, "frames_out": 120, "batches": 60, "flushed": 0, "errors": 0,
                              "compute_ms": ms, "mean_batch": 2.0, "p50": ms["p50"], "p95": ms["p95"]}
                       for name, ms in compute.items()},
            "hops": {"ingest#0->vision#0": {"messages_sent": 120, "bytes_sent": 123456, "messages_received": 120,
                                            "bytes_received": 123456, "send_seconds": 0.012,
                                            "hop_ms": {"p50": 0.3, "p95": 0.8, "p99": 1.1, "count": 120}}},
            "spans": {"server.recv>ingest.start": {"p50": 0.2, "p95": 0.5, "p99": 0.9, "count": 120},
                      "generator.start>generator.end": compute["generator"]},
            "drops": {"ingest": 0, "flushed": 0, "late": 0},
            "revision": self.live.current()[0],
            "ranks": self._ranks(),
            "nan_is_null": float("nan"),
        }

    def metrics_text(self) -> bytes:
        return b"# HELP mirror_output_fps Output frames per second\n# TYPE mirror_output_fps gauge\n" \
               b"mirror_output_fps 0.0\n"

    # --- internals ---

    def _echo(self) -> None:
        while (job := self._jobs.get()) is not None:
            session, frame_id, client_ts, jpeg, width, height = job
            if self._transform is not None:
                jpeg, vision = self._transform(jpeg)
            else:
                vision = fake_vision(width, height)
            if self.legacy_vision:
                old = ("face_id", "bbox", "emotion", "emotion_probs", "quality")
                vision = {"faces": [{k: f[k] for k in old if k in f} for f in vision.get("faces", [])]}
            else:  # what the display stage adds: which generator made the frame, in which style
                style = self.live.current()[1].style
                vision = {"generator": GENERATOR, "style": {"name": style, "emotion": "happy", "confidence": 0.8},
                          **vision}
            assert self.sink is not None, "set EchoHooks.sink to the server before sending frames"
            self.sink.deliver_output(session, frame_id, client_ts, jpeg, vision)
            self._delivered.append(time.monotonic())

    def _fps(self) -> float:
        now = time.monotonic()
        return float(sum(1 for t in self._delivered if now - t < 1.0))

    @staticmethod
    def _ranks() -> list[dict[str, Any]]:
        return [{"rank": 0, "role": "server", "alive": True, "last_seen_s": 0.0},
                {"rank": 1, "role": "generator", "alive": True, "last_seen_s": 0.1}]

