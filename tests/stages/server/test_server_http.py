"""Plain HTTP on the server's port: the page, /health, /metrics, 404s and the origin check."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from mm_client import Client
from prometheus_client import CONTENT_TYPE_LATEST
from websockets.exceptions import InvalidStatus


def get(server, path: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(server.url.rstrip("/") + path, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_page_and_its_files(server):
    status, headers, body = get(server, "/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert b'<script type="module" src="app.js">' in body
    assert "Content-Security-Policy" in headers
    for name in ("app.js", "wire.js", "capture.js", "meters.js", "stats_view.js"):
        status, headers, body = get(server, f"/{name}")
        assert (status, headers["Content-Type"]) == (200, "text/javascript; charset=utf-8"), name
        assert body
    status, headers, _ = get(server, "/style.css?v=2")
    assert (status, headers["Content-Type"]) == (200, "text/css; charset=utf-8")


def test_health(server, hooks):
    status, headers, body = get(server, "/health")
    assert (status, headers["Content-Type"]) == (200, "application/json")
    health = json.loads(body)
    assert health["ok"] is True and health["ranks"][0]["rank"] == 0
    hooks.healthy = False
    status, _, body = get(server, "/health")
    assert status == 503 and json.loads(body)["ok"] is False


def test_health_hook_failure_is_503(server, hooks, monkeypatch):
    monkeypatch.setattr(hooks, "health", lambda: 1 / 0)
    status, _, body = get(server, "/health")
    assert status == 503
    assert json.loads(body) == {"ok": False, "error": "health check failed: division by zero"}


def test_metrics(server):
    with Client.open(server) as client:
        client.text("config.current")
        status, headers, body = get(server, "/metrics")
    assert (status, headers["Content-Type"]) == (200, CONTENT_TYPE_LATEST)
    text = body.decode()
    assert "mirror_output_fps 0.0" in text                  # the runtime's
    assert "mindmirror_server_sessions 1.0" in text         # the server's own
    assert "mindmirror_server_sessions_opened_total 1.0" in text


@pytest.mark.parametrize("path", ["/nope", "/static/app.js", "/../hooks.py", "/..%2fhooks.py", "/index.htm"])
def test_unknown_paths_are_404(server, path):
    status, _, body = get(server, path)
    assert status == 404 and b"not found" in body


def test_ws_path_without_upgrade_is_refused(server):
    status, _, _ = get(server, "/ws")
    assert status == 426  # Upgrade Required, from websockets itself


def test_websocket_only_at_ws(server):
    with pytest.raises(InvalidStatus) as info, Client.open(server, path="health"):
        pass
    assert info.value.response.status_code == 200  # answered as HTTP, no handshake
    with pytest.raises(InvalidStatus) as info, Client.open(server, path="elsewhere"):
        pass
    assert info.value.response.status_code == 404


def test_cross_origin_handshake_is_refused(server):
    with pytest.raises(InvalidStatus) as info, Client.open(server, origin="http://evil.example"):
        pass
    assert info.value.response.status_code == 403
    with Client.open(server, origin=f"http://127.0.0.1:{server.port}") as client:
        assert client.text("config.current")["revision"] == 1
