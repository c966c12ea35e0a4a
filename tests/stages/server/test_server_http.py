"""Plain HTTP on the server's port: the page, /health, /metrics, 404s and the origin check."""

from __future__ import annotations

import json
import time
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


# --- lip-sync: its page and the model routes ---

def request(server, path: str, method: str = "POST", headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(server.url.rstrip("/") + path, data=b"" if method == "POST" else None,
                                 method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_lipsync_page_and_the_link_to_it(server):
    status, headers, body = get(server, "/lipsync")
    assert (status, headers["Content-Type"]) == (200, "text/html; charset=utf-8")
    assert b'<script type="module" src="lipsync.js">' in body and "Content-Security-Policy" in headers
    _, _, index = get(server, "/")
    assert b'href="lipsync"' in index
    for name in ("lipsync.js", "audio_pcm.js", "av_schedule.js", "audio_in.js", "mic_worklet.js"):
        status, headers, _ = get(server, f"/{name}")
        assert (status, headers["Content-Type"]) == (200, "text/javascript; charset=utf-8"), name


def test_models_lists_what_the_pipeline_serves(lipsync_server):
    status, headers, body = get(lipsync_server, "/models")
    assert (status, headers["Content-Type"]) == (200, "application/json")
    models = json.loads(body)
    assert models["avatars"] == {"astronaut": {"replicas": [0], "state": "resident", "assigned": 0}}
    assert models["replicas"][0]["used_bytes"] == 48_000_000


def test_load_and_unload(lipsync_server):
    status, _, body = request(lipsync_server, "/models/robot/load")
    assert status == 200 and json.loads(body) == {"avatar": "robot", "action": "load", "accepted": True, "replica": 0}
    assert json.loads(get(lipsync_server, "/models")[2])["avatars"]["robot"]["state"] == "resident"
    status, _, body = request(lipsync_server, "/models/robot/unload")
    assert status == 200 and json.loads(body)["action"] == "unload"
    assert "robot" not in json.loads(get(lipsync_server, "/models")[2])["avatars"]
    status, _, body = request(lipsync_server, "/models/robot/unload")  # already out: still fine
    assert status == 200


@pytest.mark.parametrize("path, status, error", [
    ("/models/nobody/load", 404, "unknown avatar 'nobody'"),
    ("/models/broken/load", 409, "cannot load avatar 'broken': unet.pth: missing tensors conv1.weight"),
    ("/models/Robot/load", 400, "'Robot' is not an avatar id; ids match [a-z0-9][a-z0-9_-]{0,63}"),
    ("/models/a.b/unload", 400, "'a.b' is not an avatar id; ids match [a-z0-9][a-z0-9_-]{0,63}"),
    ("/models/" + "a" * 65 + "/load", 400, None),
    ("/models//load", 400, None),
    ("/models/robot/reload", 404, None),
    ("/models/robot", 404, None),
    ("/health", 405, None),
])
def test_model_route_refusals(lipsync_server, lipsync_hooks, path, status, error):
    got, headers, body = request(lipsync_server, path)
    assert (got, headers["Content-Type"]) == (status, "application/json")
    if error is not None:
        assert json.loads(body) == {"error": error}
    assert set(lipsync_hooks.loaded) == {"astronaut"}  # nothing changed


def test_model_action_is_a_post(lipsync_server, lipsync_hooks):
    status, headers, _ = get(lipsync_server, "/models/robot/load")
    assert (status, headers["Allow"]) == (405, "POST")
    assert "robot" not in lipsync_hooks.loaded
    status, headers, _ = request(lipsync_server, "/", method="DELETE")
    assert status == 405 and headers["Allow"] == "GET, POST"


def test_model_hook_failure_is_500(lipsync_server, lipsync_hooks):
    lipsync_hooks.fail_next = RuntimeError("device lost")
    status, _, body = request(lipsync_server, "/models/robot/load")
    assert status == 500 and json.loads(body) == {"error": "load robot failed: RuntimeError: device lost"}
    lipsync_hooks.fail_next = RuntimeError("registry gone")
    status, _, body = get(lipsync_server, "/models")
    assert status == 500 and "registry gone" in json.loads(body)["error"]


def test_slow_load_is_answered_202_and_finishes(start_lipsync_server, lipsync_hooks):
    server = start_lipsync_server(model_action_wait_s=0.05)
    lipsync_hooks.model_delay_s = 0.4
    status, _, body = request(server, "/models/robot/load")
    assert status == 202 and json.loads(body)["status"] == "pending"
    # The server kept serving while the load ran in its thread.
    assert get(server, "/health")[0] == 200
    deadline = time.monotonic() + 3
    while "robot" not in lipsync_hooks.loaded and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "robot" in lipsync_hooks.loaded


def test_model_post_from_another_origin_is_refused(lipsync_server, lipsync_hooks):
    status, _, body = request(lipsync_server, "/models/robot/load", headers={"Origin": "http://evil.example"})
    assert status == 403 and "evil.example" in json.loads(body)["error"]
    assert "robot" not in lipsync_hooks.loaded
    origin = f"http://127.0.0.1:{lipsync_server.port}"
    assert request(lipsync_server, "/models/robot/load", headers={"Origin": origin})[0] == 200


def test_a_camera_pipeline_serves_no_models(server):
    for status, headers, body in (get(server, "/models"), request(server, "/models/astronaut/load")):
        assert (status, headers["Content-Type"]) == (404, "application/json")
        assert json.loads(body) == {"error": "this pipeline serves no models"}


@pytest.mark.parametrize("error, text", [
    (NotImplementedError(), "this pipeline serves no models"),
    (LookupError("pipeline 'mirror' serves no models"), "pipeline 'mirror' serves no models"),
])
def test_models_hook_saying_there_are_none_is_404(lipsync_server, lipsync_hooks, monkeypatch, error, text):
    def no_models(*args):
        raise error

    monkeypatch.setattr(lipsync_hooks, "models", no_models)
    monkeypatch.setattr(lipsync_hooks, "model_action", no_models)
    for status, _, body in (get(lipsync_server, "/models"), request(lipsync_server, "/models/robot/load")):
        assert status == 404 and json.loads(body) == {"error": text}
