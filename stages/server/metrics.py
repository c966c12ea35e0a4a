"""The web server's own Prometheus metrics, appended to the runtime's on ``GET /metrics``.

They live in a private registry per ``WebServer`` so two servers in one process (tests)
never collide, and under the ``mindmirror_server_`` prefix so their names cannot clash
with the runtime's exposition they are concatenated with.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.sessions = Gauge("mindmirror_server_sessions", "Browser sessions connected now.",
                              registry=self.registry)
        self.sessions_opened = Counter("mindmirror_server_sessions_opened", "Browser sessions accepted.",
                                       registry=self.registry)
        self.frames_in = Counter("mindmirror_server_frames_in", "Camera frames accepted and submitted.",
                                 registry=self.registry)
        self.audio_chunks_in = Counter("mindmirror_server_audio_chunks_in", "Audio chunks accepted and submitted.",
                                       registry=self.registry)
        self.audio_seconds_in = Counter("mindmirror_server_audio_seconds_in",
                                        "Seconds of audio accepted and submitted.", registry=self.registry)
        self.avatar_selects = Counter("mindmirror_server_avatar_selects", "Avatar selections accepted.",
                                      registry=self.registry)
        self.frames_out = Counter("mindmirror_server_frames_out", "Output frames sent to browsers.",
                                  registry=self.registry)
        self.frames_dropped = Counter("mindmirror_server_frames_dropped",
                                      "Output frames dropped because a browser read too slowly.",
                                      registry=self.registry)
        self.errors = Counter("mindmirror_server_errors", "Error messages sent to browsers, by code.",
                              ["code"], registry=self.registry)
        self.bytes_in = Counter("mindmirror_server_bytes_in", "Bytes of binary messages received.",
                                registry=self.registry)
        self.bytes_out = Counter("mindmirror_server_bytes_out", "Bytes of binary messages sent.",
                                 registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
