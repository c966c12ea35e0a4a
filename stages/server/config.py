"""``ServerConfig``: how rank 0's web server listens, and the limits it holds every peer to."""

from __future__ import annotations

from dataclasses import dataclass, field

from core.config import check, check_range
from stages.server.access import check_token, normalize_origin, tls_problem

MiB = 1 << 20


@dataclass(kw_only=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    """Interface to bind. Loopback by default: the page can change the pipeline's config,
    so exposing it on a network is an explicit choice ('0.0.0.0')."""
    port: int = 8765
    """TCP port; 0 picks a free one (tests), readable afterwards as ``WebServer.port``."""
    max_message_bytes: int = 4 * MiB
    """Largest WebSocket message accepted; a bigger one closes the session with 1009.
    A 1920-wide JPEG at quality 95 stays well under 1 MiB."""
    max_queue: int = 8
    """Incoming messages the library buffers per connection before it stops reading the
    socket (TCP backpressure). Small, because each may be ``max_message_bytes``."""
    max_sessions: int = 8
    """Browser sessions served at once; one more is told ``too_many_sessions`` and closed."""
    max_frame_width: int = 3840
    """Widest camera frame accepted, in pixels (checked from the JPEG header, before decoding)."""
    max_frame_height: int = 3840
    """Tallest camera frame accepted, in pixels."""
    max_frame_pixels: int = 3840 * 2160
    """Most pixels a camera frame may have, so a 3840x3840 frame is refused too."""
    stats_interval_s: float = 0.5
    """Seconds between ``stats`` messages to each session; at most 1 (the page promises a
    refresh at least once a second)."""
    session_out_queue: int = 4
    """Output frames waiting per session. A slow client loses its oldest waiting frames
    rather than falling ever further behind live."""
    session_error_queue: int = 32
    """``error`` messages waiting per session; older ones are dropped past this."""
    max_audio_chunk_bytes: int = 32000
    """Largest audio chunk (kind 2) accepted, in bytes of PCM16 at 16 kHz: 32000 is 1 s.
    The page sends 640-byte (20 ms) chunks; a bigger one is refused with
    ``audio_too_large``."""
    max_audio_chunks_per_s: int = 100
    """Audio chunks a session may send in any one second (``audio_rate`` past it)."""
    audio_burst_s: float = 2.0
    """Seconds of audio a session may send ahead of real time (a token bucket that deep,
    refilled at 1x real time): files must be streamed at the pace they play."""
    model_action_wait_s: float = 8.0
    """Seconds ``GET /models`` and ``POST /models/{id}/load|unload`` wait for the pipeline
    before answering 202 (the action goes on); below the HTTP handshake's 10 s limit."""
    allow_cross_origin: bool = False
    """Accept WebSocket handshakes whose ``Origin`` differs from the page's host. Off, so a
    foreign web page in the same browser cannot drive the pipeline."""
    allowed_origins: tuple[str, ...] = ()
    """Origins (``https://host[:port]``) whose pages may open sessions and POST model
    actions besides the server's own page; empty: the page's own origin only."""
    token: str | None = field(default=None, repr=False)
    """Bearer token required by ``/ws``, ``/metrics``, ``/trace`` and ``POST /models/...``
    (``Authorization: Bearer`` or ``?token=``); None: the ``MINDMIRROR_TOKEN`` environment
    variable, and no token when that is unset too. 16..256 URL-safe characters."""
    tls_cert: str | None = None
    """PEM certificate (chain) file: with ``tls_key``, the port serves HTTPS and WSS, which
    browsers on other machines need before they allow the camera. Checked at load."""
    tls_key: str | None = None
    """PEM private key of ``tls_cert``, not encrypted."""
    handshake_timeout_s: float = 10.0
    """Seconds a connection may take for its TLS handshake and HTTP request (or WebSocket
    opening handshake) before it is dropped: a client that connects and says nothing
    holds a socket no longer than this."""
    max_messages_per_s: float = 200.0
    """Inbound messages (of any kind) a session may send per second, on average; past it,
    messages are dropped unread, counted, and the page is told now and then. A page sends
    at most ~80 (30 fps of camera, 50 audio chunks); the bench client's fastest mode 200."""
    message_burst: int = 400
    """Messages a session may send at once above ``max_messages_per_s`` (the token
    bucket's depth, full when the session opens)."""
    slow_reader_close_s: float | None = 10.0
    """Seconds a session may go with a message stuck in its socket (the page stopped
    reading) before the server closes it with 1008; None: never (TCP backpressure and
    the bounded queues still cap what it holds)."""
    ping_interval_s: float | None = 20.0
    """Keepalive ping period in seconds; None disables pings."""
    ping_timeout_s: float | None = 20.0
    """Seconds to wait for a pong before dropping the session; None waits forever."""
    close_timeout_s: float = 2.0
    """Seconds to wait for a peer's close frame while shutting down a session."""
    start_timeout_s: float = 10.0
    """Seconds ``start()`` waits for the socket to be listening."""
    stop_timeout_s: float = 5.0
    """Upper bound on ``stop()``: sessions still open after it are abandoned."""

    def __post_init__(self) -> None:
        check(bool(self.host), "host", "must not be empty")
        check_range(self.port, "port", 0, 65535)
        check_range(self.max_message_bytes, "max_message_bytes", 64 * 1024, 256 * MiB)
        check_range(self.max_queue, "max_queue", 1, 1024)
        check_range(self.max_sessions, "max_sessions", 1, 1024)
        check_range(self.max_frame_width, "max_frame_width", 16, 16384)
        check_range(self.max_frame_height, "max_frame_height", 16, 16384)
        check(256 <= self.max_frame_pixels <= self.max_frame_width * self.max_frame_height,
              "max_frame_pixels",
              f"must be within 256..max_frame_width*max_frame_height "
              f"({self.max_frame_width * self.max_frame_height}), got {self.max_frame_pixels}")
        check(2 <= self.max_audio_chunk_bytes <= self.max_message_bytes - 20 and self.max_audio_chunk_bytes % 2 == 0,
              "max_audio_chunk_bytes",
              f"must be an even number of bytes within 2..max_message_bytes-20 ({self.max_message_bytes - 20}), "
              f"got {self.max_audio_chunk_bytes}")
        check_range(self.max_audio_chunks_per_s, "max_audio_chunks_per_s", 1, 1000)
        # A chunk bigger than the bucket could never be admitted.
        check(self.max_audio_chunk_bytes / 32000 <= self.audio_burst_s <= 60, "audio_burst_s",
              f"must be within max_audio_chunk_bytes/32000 ({self.max_audio_chunk_bytes / 32000:g})..60 seconds, "
              f"got {self.audio_burst_s}")
        check_range(self.handshake_timeout_s, "handshake_timeout_s", 0.1, 120)
        # A model request still unanswered when the handshake times out would be dropped.
        top = round(0.9 * self.handshake_timeout_s, 3)
        check(0.01 <= self.model_action_wait_s <= top, "model_action_wait_s",
              f"must be within 0.01..0.9*handshake_timeout_s ({top:g}) seconds, got {self.model_action_wait_s}")
        check(0 < self.max_messages_per_s <= 100_000, "max_messages_per_s",
              f"must be within 0..100000 (exclusive of 0), got {self.max_messages_per_s}")
        check_range(self.message_burst, "message_burst", 1, 1_000_000)
        check(self.slow_reader_close_s is None or 0.1 <= self.slow_reader_close_s <= 3600, "slow_reader_close_s",
              f"must be within 0.1..3600 seconds or null, got {self.slow_reader_close_s}")
        for i, origin in enumerate(self.allowed_origins):
            check(isinstance(origin, str) and normalize_origin(origin) is not None, f"allowed_origins[{i}]",
                  f"must be an origin like 'https://mirror.example:8443' (scheme, host, port; no path), "
                  f"got {origin!r}")
        if self.token is not None:
            problem = check_token(self.token)
            check(problem is None, "token", problem or "")
        self._check_tls()
        check_range(self.stats_interval_s, "stats_interval_s", 0.05, 1.0)
        check_range(self.session_out_queue, "session_out_queue", 1, 256)
        check_range(self.session_error_queue, "session_error_queue", 1, 1024)
        for name in ("ping_interval_s", "ping_timeout_s"):
            value = getattr(self, name)
            check(value is None or value > 0, name, f"must be > 0 or null, got {value}")
        for name in ("close_timeout_s", "start_timeout_s", "stop_timeout_s"):
            value = getattr(self, name)
            check(0 < value <= 120, name, f"must be within 0..120 seconds (exclusive of 0), got {value}")

    def _check_tls(self) -> None:
        cert, key = self.tls_cert, self.tls_key
        if cert is None and key is None:
            return
        if not check(cert is not None and key is not None, "tls_cert" if cert is None else "tls_key",
                     "tls_cert and tls_key go together: set both or neither"):
            return
        problem = tls_problem(cert, key)
        if problem is not None:
            check(False, *problem)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None
