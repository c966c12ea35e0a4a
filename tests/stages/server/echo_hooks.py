"""Test doubles of the runtime behind the web server: a camera echo and a lip-sync echo.

``EchoHooks`` implements ``PipelineHooks`` with a real ``LiveConfig`` (so config errors
are the real ones) and a worker thread that returns every submitted JPEG to the server
through ``SessionSink.deliver_output`` with a made-up face, as the runtime would from its
stage threads. It decodes nothing, so tests stay fast; ``transform`` lets the browser
check swap in something visible.

``LipSyncEchoHooks`` is a pipeline that takes audio: it numbers each session's samples as
the protocol says and, for every 640 of them, delivers output frame ``i`` (a small drawn
face whose mouth opens with the frame's loudness: no network, plainly labelled ``echo``)
stamped with the page clock at sample ``640 i``. It has avatars to select and a pretend
model registry behind ``models()`` / ``model_action()``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from core.settings import STYLES, RuntimeSettings
from runtime.live_config import LiveConfig, settings_to_dict
from stages.server.hooks import SessionSink

PRESETS = {"calm": {"style": "ink", "strength": 0.4}, "party": {"style": "neon", "strength": 0.9}}


PLACES = {0: {"node": "node-a", "device": "cpu"}, 1: {"node": "node-b", "device": "cuda:0"},
          2: {"node": "node-a", "device": "cuda:0"}}
"""Where the double's three ranks run, as ``health()`` reports it: two on node-a, one on node-b."""


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
        self.stats_nodes = False
        """Name each rank's node and each link's end nodes in ``stats()`` too (else only
        ``health()`` says where ranks run, as runtimes before the metrics work did)."""
        self.down: set[int] = set()
        """Ranks reported as not alive."""
        self.bytes_in = 0
        self.bytes_out = 0
        """Payload bytes submitted and delivered: the links' byte counters grow with them."""
        self.count_in = 0
        self.count_out = 0
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

    def takes(self) -> str:
        return "camera"

    def open_session(self, session: str) -> None:
        self.opened.append(session)

    def close_session(self, session: str) -> None:
        self.closed.append(session)

    def submit_frame(self, session: str, frame_id: int, client_ts: float, jpeg: bytes,
                     width: int, height: int) -> None:
        self._maybe_fail()
        self.submitted.append((session, frame_id, client_ts, width, height))
        self.bytes_in += len(jpeg)
        self.count_in += 1
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
        return {"ok": self.healthy, "ranks": [{**r, **PLACES[r["rank"]]} for r in self._ranks()]}

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
            "hops": self._hops(),
            "spans": {"server.recv>ingest.start": {"p50": 0.2, "p95": 0.5, "p99": 0.9, "count": 120},
                      "generator.start>generator.end": compute["generator"]},
            "drops": {"ingest": 0, "flushed": 0, "late": 0},
            "revision": self.live.current()[0],
            "ranks": [{**r, "node": PLACES[r["rank"]]["node"]} if self.stats_nodes else r for r in self._ranks()],
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
            self.bytes_out += len(jpeg)
            self.count_out += 1
            self._delivered.append(time.monotonic())

    def _fps(self) -> float:
        now = time.monotonic()
        return float(sum(1 for t in self._delivered if now - t < 1.0))

    def _ranks(self) -> list[dict[str, Any]]:
        return [{"rank": r, "role": role, "alive": r not in self.down, "last_seen_s": 12.5 if r in self.down else seen}
                for r, role, seen in ((0, "server", 0.0), (1, "generator", 0.1), (2, "vision", 0.2))]

    def _hops(self) -> dict[str, Any]:
        """Three links, shaped like the aggregator's (totals since start; zeros left out)
        whose byte counts grow with the frames that really went through the double: in
        (server to vision, same node), vision to generator (across nodes), and out."""
        links = {  # name: (src rank, dst rank, messages, bytes)
            "ingest#0->vision#0": (0, 2, 120 + self.count_in, 123456 + self.bytes_in),
            "vision#0->generator#0": (2, 1, self.count_in, self.bytes_in),
            "generator#0->display#0": (1, 0, self.count_out, self.bytes_out),
        }
        hops = {}
        for name, (src, dst, messages, size) in links.items():
            link = {"messages_sent": messages, "bytes_sent": size, "messages_received": messages,
                    "bytes_received": size, "send_seconds": 0.012,
                    "hop_ms": {"p50": 0.3, "p95": 0.8, "p99": 1.1, "count": 120}}
            if self.stats_nodes:
                link.update(src_rank=src, dst_rank=dst, src_node=PLACES[src]["node"], dst_node=PLACES[dst]["node"])
            hops[name] = {k: v for k, v in link.items() if v or k.endswith(("_rank", "_node"))}  # counters: zeros left out
        return hops



# --- lip-sync -------------------------------------------------------------------------

SAMPLES_PER_FRAME = 640
SAMPLE_RATE = 16_000
AVATARS = ("astronaut", "robot", "broken")
"""``broken`` is listed but its model fails to load (HTTP 409)."""
MODEL_BYTES = 48_000_000


@dataclass
class _Stream:
    """One session's audio as the double sees it: samples not yet made into frames."""

    avatar: str
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    pending_start: int = 0
    """Sample number of ``pending[0]`` in the session's stream."""
    chunk_starts: list[tuple[int, float]] = field(default_factory=list)
    """(first sample number, page clock ms) of each chunk still needed for a timestamp."""
    next_frame: int = 0


class LipSyncEchoHooks(EchoHooks):
    """A lip-sync pipeline double: audio chunks in, one drawn frame per 640 samples out."""

    def __init__(self, *, model_delay_s: float = 0.0) -> None:
        # Set before the base class starts the worker thread, which reads them.
        self.avatars = list(AVATARS)
        self.default_avatar = AVATARS[0]
        self.selected: dict[str, str] = {}
        self.audio: list[tuple[str, int, float, int]] = []
        """(session, chunk id, client ts, bytes) of every chunk submitted."""
        self.pcm: dict[str, bytearray] = {}
        """Every session's audio stream as submitted, PCM16 LE."""
        self.loaded: dict[str, int] = {"astronaut": 1}  # avatar -> uses
        self.model_delay_s = model_delay_s
        self._streams: dict[str, _Stream] = {}
        self._faces: dict[tuple[str, int], bytes] = {}
        super().__init__()

    # --- PipelineHooks ---

    def takes(self) -> str:
        return "audio"

    def submit_frame(self, session: str, frame_id: int, client_ts: float, jpeg: bytes,
                     width: int, height: int) -> None:
        raise AssertionError("the server must not hand camera frames to an audio pipeline")

    def submit_audio(self, session: str, chunk_id: int, client_ts: float, pcm: bytes) -> None:
        self._maybe_fail()
        self.audio.append((session, chunk_id, client_ts, len(pcm)))
        self.pcm.setdefault(session, bytearray()).extend(pcm)
        self.bytes_in += len(pcm)
        self.count_in += 1
        avatar = self.selected.get(session, self.default_avatar)
        self._jobs.put(("audio", session, avatar, client_ts, bytes(pcm)))

    def close_session(self, session: str) -> None:
        super().close_session(session)
        self._jobs.put(("close", session))

    def select_avatar(self, session: str, avatar: str) -> dict[str, Any]:
        self._maybe_fail()
        if avatar not in self.avatars:
            raise LookupError(f"unknown avatar {avatar!r}; known: {', '.join(self.avatars)}")
        self.selected[session] = avatar
        return self.config_current()

    def config_current(self) -> dict[str, Any]:
        return {**super().config_current(), "avatars": list(self.avatars), "avatar": self.default_avatar,
                "registry": self.models()}

    def models(self) -> dict[str, Any]:
        """Shaped like ``ModelDirectory.snapshot()``: one replica, where each avatar is."""
        self._maybe_fail()
        return {"placement": "least_loaded",
                "replicas": [{"replica": 0, "capacity_bytes": 4 * MODEL_BYTES, "used_bytes": MODEL_BYTES * len(self.loaded),
                              "resident": sorted(self.loaded), "loading": [], "failed": {}, "assigned": []}],
                "avatars": {a: {"replicas": [0], "state": "resident", "assigned": 0} for a in sorted(self.loaded)}}

    def model_action(self, avatar: str, action: str) -> dict[str, Any]:
        self._maybe_fail()
        if avatar not in self.avatars:
            raise LookupError(f"unknown avatar {avatar!r}")
        if action not in ("load", "unload"):
            raise ValueError(f"unknown model action {action!r}; allowed: 'load', 'unload'")
        time.sleep(self.model_delay_s)
        if action == "load":
            if avatar == "broken":
                raise ValueError("cannot load avatar 'broken': unet.pth: missing tensors conv1.weight")
            self.loaded.setdefault(avatar, 0)
        else:
            self.loaded.pop(avatar, None)
        return {"avatar": avatar, "action": action, "accepted": True, "replica": 0 if action == "load" else None}

    # --- the worker ---

    def _echo(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job[0] == "close":
                self._streams.pop(job[1], None)
                continue
            _, session, avatar, client_ts, pcm = job
            stream = self._streams.setdefault(session, _Stream(avatar))
            stream.avatar = avatar
            stream.chunk_starts.append((stream.pending_start + len(stream.pending), client_ts))
            stream.pending = np.concatenate([stream.pending, np.frombuffer(pcm, "<i2")])
            while len(stream.pending) >= SAMPLES_PER_FRAME:
                self._deliver_frame(session, stream, stream.pending[:SAMPLES_PER_FRAME])
                stream.pending = stream.pending[SAMPLES_PER_FRAME:]
                stream.pending_start += SAMPLES_PER_FRAME

    def _deliver_frame(self, session: str, stream: _Stream, samples: np.ndarray) -> None:
        i = stream.next_frame
        stream.next_frame += 1
        first = i * SAMPLES_PER_FRAME
        # The page clock at sample 640 i: its chunk's timestamp plus its offset in the chunk.
        while len(stream.chunk_starts) > 1 and stream.chunk_starts[1][0] <= first:
            stream.chunk_starts.pop(0)
        chunk_first, chunk_ts = stream.chunk_starts[0]
        client_ts = chunk_ts + (first - chunk_first) * 1000 / SAMPLE_RATE
        rms = float(np.sqrt(np.mean((samples.astype(np.float64) / 32768) ** 2)))
        loudness_db = 20 * np.log10(rms) if rms > 0 else -100.0
        opening = int(np.clip((loudness_db + 60) / 60 * 5, 0, 5))
        vision = {"lipsync": {"avatar": stream.avatar, "generator": GENERATOR, "speech": bool(loudness_db > -40),
                              "loudness_db": round(float(loudness_db), 2), "avatar_frame": i % 50}}
        assert self.sink is not None, "set LipSyncEchoHooks.sink to the server before sending audio"
        face = self._face(stream.avatar, opening)
        self.sink.deliver_output(session, i, client_ts, face, vision)
        self.bytes_out += len(face)
        self.count_out += 1
        self._delivered.append(time.monotonic())

    def _face(self, avatar: str, opening: int) -> bytes:
        """A drawn face, mouth open 0..5: visibly not a person, and cheap to make."""
        key = (avatar, opening)
        if key not in self._faces:
            image = np.full((160, 160, 3), (40, 30, 20), np.uint8)
            colour = (90, 170, 230) if avatar == "astronaut" else (200, 200, 120)
            cv2.circle(image, (80, 80), 62, colour, -1)
            for x in (58, 102):
                cv2.circle(image, (x, 64), 7, (30, 30, 30), -1)
            cv2.ellipse(image, (80, 112), (22, 2 + 4 * opening), 0, 0, 360, (40, 20, 120), -1)
            cv2.putText(image, "echo", (4, 154), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (200, 200, 200), 1)
            ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
            assert ok
            self._faces[key] = jpeg.tobytes()
        return self._faces[key]
