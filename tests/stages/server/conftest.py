from __future__ import annotations

import pytest

# Helpers beside the tests are imported by name: this folder has no __init__.py, so
# pytest puts it on sys.path itself.
from echo_hooks import EchoHooks, LipSyncEchoHooks

from stages.server.config import ServerConfig
from stages.server.ws_server import WebServer


@pytest.fixture
def hooks():
    h = EchoHooks()
    yield h
    h.close()


def make_server(hooks: EchoHooks, **overrides) -> WebServer:
    values = {"port": 0, "stats_interval_s": 0.2, "max_message_bytes": 256 * 1024, "max_sessions": 4,
              "close_timeout_s": 1.0, "stop_timeout_s": 3.0}
    values.update(overrides)
    server = WebServer(ServerConfig(**values), hooks)
    hooks.sink = server
    server.start()
    return server


@pytest.fixture
def start_server(hooks):
    """Start servers with other settings; all are stopped after the test."""
    servers: list[WebServer] = []

    def start(**overrides) -> WebServer:
        servers.append(make_server(hooks, **overrides))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def server(start_server):
    return start_server()


@pytest.fixture
def lipsync_hooks():
    h = LipSyncEchoHooks()
    yield h
    h.close()


@pytest.fixture
def start_lipsync_server(lipsync_hooks):
    """Start servers on the lip-sync double with other settings; all are stopped after the test."""
    servers: list[WebServer] = []

    def start(**overrides) -> WebServer:
        servers.append(make_server(lipsync_hooks, **overrides))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def lipsync_server(start_lipsync_server):
    return start_lipsync_server()
