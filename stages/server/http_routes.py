"""Plain HTTP on the WebSocket port: the pages, ``/health``, ``/metrics`` and ``/models``.

``websockets`` hands every request to ``process_request`` before the opening handshake;
answering with a ``Response`` serves it as HTTP, answering ``None`` lets the handshake
go on. Only ``/ws`` goes on, so one port serves both and the page can find the socket
at its own origin.

Routes: ``GET /`` the mirror page, ``GET /lipsync`` the lip-sync page, their files by
name, ``GET /health``, ``GET /metrics``, ``GET /trace?last=N`` (the newest N frames'
traces as Chrome trace JSON, for Perfetto: N 1..1000, default 50; 400 for another N, 404
when the pipeline keeps no traces), ``GET /models`` (the lip-sync models and whether
each is loaded) and ``POST /models/{id}/load`` / ``POST /models/{id}/unload``.

``access.AccessPolicy`` guards them: a foreign ``Origin`` is refused (403) on ``/ws`` and
the POSTs; with a token in force, ``/ws``, ``/metrics``, ``/trace`` and the POSTs need
it (401 with a JSON ``{"error"}`` and ``WWW-Authenticate: Bearer``). The pages, their
files, ``/health`` and ``GET /models`` stay public.

Answers about models are JSON, errors included (``{"error": ...}``): 400 for an id that
cannot be one, 404 for an unknown avatar or a pipeline that serves no models, 409 for a
load that failed, 500 for anything else. ``websockets`` takes no request bodies, so the
POSTs carry none; a POST from another origin's page is refused (403) as its sockets are.

Model hooks may take a while (a load reads a file and fills device memory), so they run
in a worker thread and never hold up the event loop that serves every session. An
action still running after ``action_wait_s`` is answered ``202`` (``{"status": "pending"}``)
and finishes on its own: ``websockets`` drops a request not answered within its opening
handshake timeout (10 s).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from stages.server.access import AccessPolicy, redact, request_token
from stages.server.hooks import PipelineHooks, hook_or_none
from stages.server.limits import LimitMetrics
from stages.server.metrics import ServerMetrics
from stages.server.protocol import AVATAR_ID, json_safe

log = logging.getLogger(__name__)

WS_PATH = "/ws"
PAGES = {"/": "index.html", "/lipsync": "lipsync.html"}
"""Paths of the pages (every other file is served under its own name)."""
MODEL_ACTION = re.compile(r"/models/([^/]*)/(load|unload)")
NO_MODELS = "this pipeline serves no models"
ACTION_WAIT_S = 8.0
"""How long a model request is waited for before it is answered 202 (below the handshake's 10 s)."""
TRACE_LAST = (1, 1000, 50)
"""``GET /trace?last=N``: smallest, largest and default N."""
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

    def __init__(self, hooks: PipelineHooks, metrics: ServerMetrics, *, access: AccessPolicy | None = None,
                 refusals: LimitMetrics | None = None, static_dir: Path = STATIC_DIR,
                 action_wait_s: float = ACTION_WAIT_S) -> None:
        self._hooks = hooks
        self._action_wait_s = action_wait_s
        self._metrics = metrics
        self._access = access if access is not None else AccessPolicy(token=None)
        self._refusals = refusals
        self._static = _load_static(static_dir)

    def __call__(self, connection: ServerConnection, request: Request) -> Response | Awaitable[Response] | None:
        try:
            url = urlsplit(request.path)
        except ValueError:  # e.g. "/[": no route has such a path
            return respond(HTTPStatus.BAD_REQUEST, b"malformed request path\n", "text/plain; charset=utf-8")
        path = url.path
        method = getattr(request, "method", "GET")  # websockets before 15 parsed GET only
        if method == "POST":
            return self._post(request, path)
        if method != "GET":
            return respond(HTTPStatus.METHOD_NOT_ALLOWED, f"method {method} not allowed\n".encode(),
                           "text/plain; charset=utf-8", [("Allow", "GET, POST")])
        if path == WS_PATH:
            return self._check_origin(request) or self._check_token(request)
        if path == "/health":
            return self._health()
        if path == "/metrics":
            return self._check_token(request) or self._metrics_text()
        if path == "/trace":
            return self._check_token(request) or self._trace(url.query)
        if path == "/models":
            return self._models()
        if MODEL_ACTION.fullmatch(path):
            return _json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "model actions are POST requests"},
                         [("Allow", "POST")])
        path = "/" + PAGES.get(path, path.lstrip("/"))
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
        if self._same_origin(request):
            return None
        return respond(HTTPStatus.FORBIDDEN, f"origin {_origin(request)} may not connect\n".encode(),
                       "text/plain; charset=utf-8")

    def _same_origin(self, request: Request) -> bool:
        if self._access.origin_allowed(request):
            return True
        log.warning("refused %s %s from origin %s (host %s)", getattr(request, "method", "GET"),
                    redact(request.path), _origin(request), request.headers.get_all("Host"))
        self._count_refusal("origin")
        return False

    def _check_token(self, request: Request) -> Response | None:
        """None when the request may go on; else a 401 saying what is missing."""
        if self._access.authorized(request):
            return None
        log.warning("refused %s %s: %s", getattr(request, "method", "GET"), redact(request.path),
                    "no token" if request_token(request) is None else "wrong token")
        self._count_refusal("token")
        return _json(HTTPStatus.UNAUTHORIZED, {"error": self._access.refusal(request)},
                     [("WWW-Authenticate", 'Bearer realm="mindmirror"')])

    def _count_refusal(self, reason: str) -> None:
        if self._refusals is not None:
            self._refusals.requests_refused.labels(reason=reason).inc()

    # --- traces ---

    def _trace(self, query: str) -> Response | Awaitable[Response]:
        low, high, default = TRACE_LAST
        values = [v for k, v in parse_qsl(query, keep_blank_values=True) if k == "last"]
        last = default
        if values:
            text = values[-1]
            if not (text.isascii() and text.isdigit() and len(text) <= 6 and low <= int(text) <= high):
                return _json(HTTPStatus.BAD_REQUEST,
                             {"error": f"last must be a whole number within {low}..{high}, got {text[:20]!r}"})
            last = int(text)
        trace = hook_or_none(self._hooks, "trace")
        if trace is None:
            return _json(HTTPStatus.NOT_FOUND, {"error": "this pipeline keeps no traces"})
        return asyncio.to_thread(self._trace_answer, trace, last)

    @staticmethod
    def _trace_answer(trace: Callable[[int], Any], last: int) -> Response:
        """The trace as JSON, built and encoded off the event loop (a thousand frames' worth
        is a few megabytes)."""
        try:
            return _json(HTTPStatus.OK, trace(last))
        except ValueError as e:  # the hook's own refusal of ``last``
            return _json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except Exception as e:
            log.exception("trace(%d) failed", last)
            return _json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"trace failed: {type(e).__name__}: {e}"})

    # --- models ---

    def _post(self, request: Request, path: str) -> Response | Awaitable[Response]:
        match = MODEL_ACTION.fullmatch(path)
        if match is None:
            return _json(HTTPStatus.NOT_FOUND if path.startswith("/models") else HTTPStatus.METHOD_NOT_ALLOWED,
                         {"error": f"no POST route {path}; POST /models/{{id}}/load or /models/{{id}}/unload"})
        # A page elsewhere can make the browser POST here (a form needs no CORS): the same
        # check as for sockets keeps it from loading and unloading models.
        if not self._same_origin(request):
            return _json(HTTPStatus.FORBIDDEN, {"error": f"origin {_origin(request)} may not do this"})
        refused = self._check_token(request)
        if refused is not None:
            return refused
        avatar, action = match.groups()
        if not AVATAR_ID.fullmatch(avatar):
            return _json(HTTPStatus.BAD_REQUEST,
                         {"error": f"{avatar[:70]!r} is not an avatar id; ids match {AVATAR_ID.pattern}"})
        act = hook_or_none(self._hooks, "model_action")
        if act is None:
            return _json(HTTPStatus.NOT_FOUND, {"error": NO_MODELS})
        return self._off_loop(lambda: act(avatar, action), f"{action} {avatar}")

    def _models(self) -> Response | Awaitable[Response]:
        models = hook_or_none(self._hooks, "models")
        if models is None:
            return _json(HTTPStatus.NOT_FOUND, {"error": NO_MODELS})
        return self._off_loop(models, "list models")

    async def _off_loop(self, call: Callable[[], Any], what: str) -> Response:
        """``call``'s answer, from a worker thread; 202 if it is still running after the wait."""
        task = asyncio.ensure_future(asyncio.to_thread(self._model_answer, call, what))
        done, _ = await asyncio.wait({task}, timeout=self._action_wait_s)
        if task in done:
            return task.result()
        task.add_done_callback(lambda t: log.info("%s finished after its request was answered: HTTP %s",
                                                  what, t.result().status_code))
        return _json(HTTPStatus.ACCEPTED, {"status": "pending",
                                           "message": f"{what} is still running; GET /models shows when it is done"})

    @staticmethod
    def _model_answer(call: Callable[[], Any], what: str) -> Response:
        try:
            return _json(HTTPStatus.OK, call())
        except NotImplementedError as e:
            return _json(HTTPStatus.NOT_FOUND, {"error": str(e) or NO_MODELS})
        except LookupError as e:
            return _json(HTTPStatus.NOT_FOUND, {"error": str(e.args[0]) if e.args else "unknown avatar"})
        except ValueError as e:  # a bad action, or a load that failed (file missing, over budget)
            return _json(HTTPStatus.CONFLICT, {"error": str(e)})
        except Exception as e:
            log.exception("%s failed", what)
            return _json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{what} failed: {type(e).__name__}: {e}"})

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


def _origin(request: Request) -> str:
    """The request's Origin as a log or an answer may quote it: cut, one line."""
    origins = request.headers.get_all("Origin")
    return origins[0][:100] if len(origins) == 1 else f"{len(origins)} Origin headers"


def _json(status: HTTPStatus, value: Any, extra: list[tuple[str, str]] | None = None) -> Response:
    return respond(status, json.dumps(json_safe(value), allow_nan=False).encode(), "application/json", extra)


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
    missing = sorted(set(PAGES.values()) - set(files))
    if missing:
        raise FileNotFoundError(f"no {', '.join(missing)} in {static_dir}")
    return files
