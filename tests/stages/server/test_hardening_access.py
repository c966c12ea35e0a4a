"""Who may use the server: foreign origins, the allowlist, the bearer token, the warning a
public bind without one earns, and ``GET /trace``."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

import pytest
from echo_hooks import EchoHooks
from mm_client import Client
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.http11 import Request

from core.config import ConfigError
from stages.server.access import (
    TOKEN_ENV,
    AccessPolicy,
    exposure_warnings,
    is_loopback,
    normalize_origin,
    page_url,
    redact,
    resolve_token,
)
from stages.server.config import ServerConfig
from stages.server.ws_server import WebServer

TOKEN = "s3cret-token_for.tests~0123"


def get(server, path: str, headers: dict | None = None, method: str = "GET") -> tuple[int, dict, bytes]:
    req = urllib.request.Request(server.url.rstrip("/") + path, method=method, headers=headers or {},
                                 data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def request(path: str, **headers: str) -> Request:
    return Request(path, Headers(headers))


# --- the policy, without sockets ---

@pytest.mark.parametrize("origin, normal", [
    ("https://Mirror.Example", "https://mirror.example"),
    ("https://mirror.example:443", "https://mirror.example"),
    ("https://mirror.example:8443/", "https://mirror.example:8443"),
    ("http://127.0.0.1:8765", "http://127.0.0.1:8765"),
    ("http://[::1]:80", "http://[::1]"),
    ("null", None),
    ("file://", None),
    ("https://mirror.example/path", None),
    ("https://user@mirror.example", None),
    ("ws://mirror.example", None),
    ("https://[", None),
    ("https://mirror.example:99999", None),
])
def test_origins_normalize(origin, normal):
    assert normalize_origin(origin) == normal


def test_origin_policy():
    policy = AccessPolicy(token=None, allowed_origins=["https://Studio.example:443"])
    host = {"Host": "127.0.0.1:8765"}
    assert policy.origin_allowed(request("/ws", **host))                                  # not a browser
    assert policy.origin_allowed(request("/ws", Origin="http://127.0.0.1:8765", **host))   # its own page
    assert policy.origin_allowed(request("/ws", Origin="https://studio.example", **host))  # listed
    assert not policy.origin_allowed(request("/ws", Origin="https://studio.example:8443", **host))
    assert not policy.origin_allowed(request("/ws", Origin="http://evil.example", **host))
    assert not policy.origin_allowed(request("/ws", Origin="null", **host))
    assert not policy.origin_allowed(request("/ws", Origin="http://[", **host))
    twice = Request("/ws", Headers([("Host", "127.0.0.1:8765"), ("Origin", "http://127.0.0.1:8765"),
                                    ("Origin", "http://evil.example")]))
    assert not policy.origin_allowed(twice)


def test_token_policy():
    policy = AccessPolicy(token=TOKEN)
    assert policy.token_required
    assert policy.authorized(request(f"/ws?token={TOKEN}"))
    assert policy.authorized(request("/metrics", Authorization=f"Bearer {TOKEN}"))
    assert policy.authorized(request("/metrics", Authorization=f"bearer  {TOKEN} "))
    assert not policy.authorized(request("/ws"))
    assert not policy.authorized(request("/ws?token="))
    assert not policy.authorized(request(f"/ws?token={TOKEN}x"))
    assert not policy.authorized(request("/ws?token=%FF%FE"))
    assert not policy.authorized(request("/metrics", Authorization=f"Basic {TOKEN}"))
    assert "needs its token" in policy.refusal(request("/ws"))
    assert policy.refusal(request("/ws?token=nope")) == "the token is wrong"
    assert AccessPolicy(token=None).authorized(request("/ws"))


def test_tokens_never_reach_a_log():
    assert redact(f"/ws?token={TOKEN}&x=1") == "/ws?token=<redacted>&x=1"
    assert redact("/metrics") == "/metrics"


def test_token_from_the_environment():
    assert resolve_token(None, {}) is None
    assert resolve_token(None, {TOKEN_ENV: ""}) is None
    assert resolve_token(None, {TOKEN_ENV: TOKEN}) == TOKEN
    assert resolve_token(TOKEN + "2", {TOKEN_ENV: TOKEN}) == TOKEN + "2"  # the config wins
    with pytest.raises(ConfigError) as info:
        resolve_token(None, {TOKEN_ENV: "short"})
    assert info.value.path == TOKEN_ENV


@pytest.mark.parametrize("token", ["short", "x" * 257, "has space in it ok", "ünïcödé-ünïcödé-ü"])
def test_config_refuses_weak_or_unsafe_tokens(token):
    with pytest.raises(ConfigError) as info:
        ServerConfig(token=token)
    assert info.value.path == "token"


def test_config_refuses_an_origin_with_a_path():
    with pytest.raises(ConfigError) as info:
        ServerConfig(allowed_origins=("https://ok.example", "https://bad.example/page"))
    assert info.value.path == "allowed_origins[1]"


def test_token_stays_out_of_the_config_repr():
    assert TOKEN not in repr(ServerConfig(token=TOKEN))


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("127.1.2.3", True), ("0.0.0.0", False), ("::", False),
                                            ("192.168.1.5", False), ("mirror.lan", False)])
def test_loopback(host, loopback):
    assert is_loopback(host) is loopback
    assert (exposure_warnings(host, token=False, tls=False) == []) is loopback


def test_page_url_carries_the_token():
    assert page_url("http://h:1/", None) == "http://h:1/"
    assert page_url("https://h:1/", TOKEN) == f"https://h:1/?token={TOKEN}"


# --- over sockets ---

def test_cross_origin_upgrade_refused_by_default_and_counted(server):
    with pytest.raises(InvalidStatus) as info, Client.open(server, origin="http://evil.example"):
        pass
    assert info.value.response.status_code == 403
    assert b"mindmirror_server_requests_refused_total{reason=\"origin\"} 1.0" in server._metrics.exposition()


def test_allowed_origins(start_server):
    server = start_server(allowed_origins=["https://studio.example"])
    with Client.open(server, origin="https://studio.example") as client:
        assert client.text("config.current")["revision"] == 1
    with pytest.raises(InvalidStatus) as info, Client.open(server, origin="https://other.example"):
        pass
    assert info.value.response.status_code == 403


@pytest.fixture
def token_server(start_server):
    return start_server(token=TOKEN)


def test_ws_needs_the_token(token_server):
    with pytest.raises(InvalidStatus) as info, Client.open(token_server):
        pass
    response = info.value.response
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="mindmirror"'
    assert "needs its token" in json.loads(response.body)["error"]
    with pytest.raises(InvalidStatus) as info, Client.open(token_server, path="ws?token=wrong-token-0123456789"):
        pass
    assert json.loads(info.value.response.body) == {"error": "the token is wrong"}
    with Client.open(token_server, path=f"ws?token={TOKEN}") as client:       # as the page does
        client.roundtrip(1)
    with Client.open(token_server, additional_headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        client.roundtrip(2)
    assert token_server.token_required
    assert token_server.page_url == f"{token_server.url}?token={TOKEN}"


@pytest.mark.parametrize("path", ["/metrics", "/trace"])
def test_metrics_and_trace_need_the_token(token_server, path):
    status, headers, body = get(token_server, path)
    assert (status, headers["Content-Type"]) == (401, "application/json")
    assert "error" in json.loads(body)
    assert get(token_server, path, {"Authorization": "Bearer wrong-token-0123456789"})[0] == 401
    status, _, _ = get(token_server, f"{path}?token={TOKEN}")
    assert status == (200 if path == "/metrics" else 404)  # the echo double keeps no traces


def test_model_actions_need_the_token(start_lipsync_server, lipsync_hooks):
    server = start_lipsync_server(token=TOKEN)
    assert get(server, "/models/robot/load", method="POST")[0] == 401
    assert "robot" not in lipsync_hooks.loaded
    assert get(server, "/models/robot/load", {"Authorization": f"Bearer {TOKEN}"}, method="POST")[0] == 200
    assert "robot" in lipsync_hooks.loaded


@pytest.mark.parametrize("path", ["/", "/lipsync", "/app.js", "/health", "/models"])
def test_pages_and_health_stay_public(token_server, path):
    assert get(token_server, path)[0] in (200, 404)  # /models: 404 on a camera pipeline, not 401


def test_token_from_the_environment_guards_the_server(start_server, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    server = start_server()
    assert get(server, "/metrics")[0] == 401
    assert get(server, "/metrics", {"Authorization": f"Bearer {TOKEN}"})[0] == 200


def test_public_bind_without_a_token_warns(start_server, caplog):
    with caplog.at_level(logging.WARNING, logger="stages.server.ws_server"):
        start_server(host="0.0.0.0")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("without a token" in w and "MINDMIRROR_TOKEN" in w for w in warnings), warnings
    assert any("without TLS" in w for w in warnings), warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stages.server.ws_server"):
        start_server(host="0.0.0.0", token=TOKEN)
        start_server()  # loopback: nothing to say
    assert not any("without a token" in r.getMessage() for r in caplog.records)


# --- GET /trace ---

class TraceHooks(EchoHooks):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[int] = []

    def trace(self, last: int) -> dict:
        self.asked.append(last)
        if last == 13:
            raise RuntimeError("trace ring lost")
        events = [{"name": "generator", "ph": "X", "ts": 1000.0 * i, "dur": 800.0, "pid": 2, "tid": 1,
                   "args": {"frame_id": i}} for i in range(last)]
        return {"traceEvents": events, "displayTimeUnit": "ms", "metadata": {"clock_offsets_ms": {"2": 0.1}}}


@pytest.fixture
def trace_server():
    hooks = TraceHooks()
    server = WebServer(ServerConfig(port=0, token=TOKEN, stop_timeout_s=3.0), hooks)
    hooks.sink = server
    server.start()
    yield server, hooks
    server.stop()
    hooks.close()


def test_trace_default_and_n(trace_server):
    server, hooks = trace_server
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, headers, body = get(server, "/trace", auth)
    assert (status, headers["Content-Type"]) == (200, "application/json")
    trace = json.loads(body)
    assert len(trace["traceEvents"]) == 50 and trace["displayTimeUnit"] == "ms"
    status, _, body = get(server, f"/trace?last=1000&token={TOKEN}")
    assert status == 200 and len(json.loads(body)["traceEvents"]) == 1000
    assert hooks.asked == [50, 1000]


@pytest.mark.parametrize("query", ["last=0", "last=1001", "last=-3", "last=abc", "last=", "last=1e3",
                                   "last=%EF%BC%91", "last=99999999999999999999"])
def test_trace_bad_n_is_400(trace_server, query):
    server, hooks = trace_server
    status, _, body = get(server, f"/trace?{query}", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 400 and "last must be a whole number within 1..1000" in json.loads(body)["error"]
    assert hooks.asked == []


def test_trace_hook_failure_is_500(trace_server):
    server, _ = trace_server
    status, _, body = get(server, "/trace?last=13", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 500 and json.loads(body) == {"error": "trace failed: RuntimeError: trace ring lost"}


def test_trace_without_a_trace_hook_is_404(server):
    status, _, body = get(server, "/trace?last=5")
    assert status == 404 and json.loads(body) == {"error": "this pipeline keeps no traces"}
