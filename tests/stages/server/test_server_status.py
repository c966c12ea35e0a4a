"""The job's word to the pages when it loses a rank: a ``status`` to every session (and to
one that connects while the job is degraded), and, when the job ends for it, a 1012
close with the reason, after that ``status``."""

from __future__ import annotations

import contextlib

import pytest
from mm_client import Client
from websockets.exceptions import ConnectionClosed

LOST = [{"rank": 3, "role": "generator", "cause": "died"}]
DEGRADED = {"state": "degraded", "message": "rank 3 (generator) died; its 'generator' frames go to rank 2",
            "lost": LOST}


def test_a_status_reaches_every_session_and_they_stay_open(server):
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(Client.open(server)) for _ in range(2)]
        for client in clients:
            client.text("config.current")
        server.deliver_status(DEGRADED["state"], DEGRADED["message"], LOST)
        for i, client in enumerate(clients):
            assert client.text("status") == DEGRADED
            client.roundtrip(i)  # frames keep flowing


def test_a_page_that_connects_while_the_job_is_degraded_hears_it_at_once(server, hooks):
    hooks.job_status = lambda: DEGRADED
    with Client.open(server) as client:
        client.text("config.current")
        assert client.text("status") == DEGRADED
    hooks.job_status = lambda: None
    with Client.open(server) as client:
        client.text("config.current")
        client.roundtrip(1)
        assert not [m for m in client.texts if m["type"] == "status"]


def test_a_restart_closes_every_page_with_1012_after_the_status(server):
    reason = "rank 2 (generator) died and nothing else can serve 'generator'; the job is restarting " \
             "(torchrun restart 1 of 1)"
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(Client.open(server)) for _ in range(2)]
        for i, client in enumerate(clients):
            client.roundtrip(i)
        server.deliver_status("restarting", reason, [{"rank": 2, "role": "generator", "cause": "died"}])
        server.stop(restart_reason=reason)
        for client in clients:
            texts = []
            with pytest.raises(ConnectionClosed):
                while True:
                    message = client.ws.recv(timeout=2)
                    if isinstance(message, str):
                        texts.append(message)
            assert any('"type":"status"' in t and '"state":"restarting"' in t for t in texts), texts
            assert (client.ws.close_code, client.ws.close_reason) == (1012, reason)


def test_a_long_restart_reason_is_cut_to_fit_the_close_frame(server):
    with Client.open(server) as client:
        client.text("config.current")
        server.stop(restart_reason="rank 7 (diffusion) stalled " + "and more " * 30)
        with pytest.raises(ConnectionClosed):
            while True:
                client.ws.recv(timeout=2)
        assert client.ws.close_code == 1012
        assert client.ws.close_reason.startswith("rank 7 (diffusion) stalled and more")
        assert client.ws.close_reason.endswith("...") and len(client.ws.close_reason.encode()) <= 123
