"""Plain HTTP on the WebSocket port: the page, ``/health`` and ``/metrics``.

``websockets`` hands every request to ``process_request`` before the opening handshake;
answering with a ``Response`` serves it as HTTP, answering ``None`` lets the handshake
go on. Only ``/ws`` goes on, so one port serves both and the page can find the socket
at its own origin.
"""

from __future__ import annotations

import email.utils
import json
import logging
from http import HTTPStatus
from pathlib import Path
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from stages.server.hooks import PipelineHooks
from stages.server.metrics import ServerMetrics
from stages.server.protocol import json_safe

log = logging.getLogger(__name__)

WS_PATH = "/ws"
STATIC_DIR = Path(__file__).parent / "static"
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
# The page needs the camera (a MediaStream), blob: URLs for JPEGs and the WebSocket on
# its own origin; nothing else, and nothing from elsewhere.
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "media-src 'self' blob: mediastream:; connect-src 'self' ws: wss:; frame-ancestors 'none'")


class HttpRoutes:
    """The ``process_request`` callable of the server."""

    def __init__(self, hooks: PipelineHooks, metrics: ServerMetrics, *, allow_cross_origin: bool,
                 static_dir: Path = STATIC_DIR) -> None:
        self._hooks = hooks
        self._metrics = metrics
        self._allow_cross_origin = allow_cross_origin
        self._static = _load_static(static_dir)

    def __call__(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == WS_PATH:
            return self._check_origin(request)
        if path == "/health":
            return self._health()
        if path == "/metrics":
            return self._metrics_text()
        if path == "/":
            path = "/index.html"
        static = self._static.get(path.lstrip("/"))
        if static is not None:
            content_type, body = static
            extra = [("Content-Security-Policy", _CSP)] if content_type.startswith("text/html") else []
            return respond(HTTPStatus.OK, body, content_type, extra)
        return respond(HTTPStatus.NOT_FOUND, f"not found: {path}\n".encode(), "text/plain; charset=utf-8")

    def _check_origin(self, request: Request) -> Response | None:
        # Browsers send Origin on every WebSocket handshake and let any page open sockets
        # to localhost, so this is what keeps another site from driving the pipeline.
        # Non-browser clients send no Origin and pass.
        origin = request.headers.get("Origin")
        if origin is None or self._allow_cross_origin:
            return None
        host = request.headers.get("Host", "")
        if urlsplit(origin).netloc.lower() == host.lower():
            return None
        log.warning("refused WebSocket from origin %s (host %s)", origin, host)
        return respond(HTTPStatus.FORBIDDEN, f"origin {origin} may not connect\n".encode(),
                       "text/plain; charset=utf-8")

    def _health(self) -> Response:
        try:
            health = self._hooks.health()
            ok = bool(health.get("ok"))
        except Exception as e:  # a failing health check is itself the answer: not healthy
            log.exception("health check failed")
            health, ok = {"ok": False, "error": f"health check failed: {e}"}, False
        body = json.dumps(json_safe(health), allow_nan=False).encode()
        status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
        return respond(status, body, "application/json")

    def _metrics_text(self) -> Response:
        try:
            runtime = self._hooks.metrics_text()
        except Exception as e:
            # The server's own metrics still say something useful (sessions, drops), so
            # serve them and say in a comment what is missing.
            log.exception("runtime metrics failed")
            runtime = f"# runtime metrics unavailable: {type(e).__name__}\n".encode()
        if runtime and not runtime.endswith(b"\n"):
            runtime += b"\n"
        return respond(HTTPStatus.OK, runtime + self._metrics.exposition(), CONTENT_TYPE_LATEST)


def respond(status: HTTPStatus, body: bytes, content_type: str,
            extra: list[tuple[str, str]] | None = None) -> Response:
    headers = Headers([
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Connection", "close"),  # websockets closes the connection after any non-101 answer
        ("Content-Length", str(len(body))),
        ("Content-Type", content_type),
        ("Cache-Control", "no-cache"),
        ("X-Content-Type-Options", "nosniff"),
        *(extra or []),
    ])
    return Response(status.value, status.phrase, headers, body)


def _load_static(static_dir: Path) -> dict[str, tuple[str, bytes]]:
    """The page's files, read once: only names listed here can be served, so no request
    path can reach outside the folder."""
    files = {}
    for path in sorted(static_dir.iterdir()):
        content_type = _CONTENT_TYPES.get(path.suffix)
        if path.is_file() and content_type is not None:
            files[path.name] = (content_type, path.read_bytes())
    if "index.html" not in files:
        raise FileNotFoundError(f"no index.html in {static_dir}")
    return files
