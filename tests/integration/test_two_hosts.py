"""Two hosts for real: each torchrun agent in its own network namespace, linked by a veth
pair, so every cross-node link crosses a real network interface (not loopback).

Needs root and iproute2 (``ip netns``); skipped otherwise. The browser side stays on
host A's loopback, as it would on a head node.
"""

import random
import signal
import subprocess
import sys
import time

import pytest

from runtime.bench.virtual_hosts import VirtualHostsUnavailable, unavailable_reason, veth_pair
from tests.integration.processes import LAUNCHER, REPO, URL, kill_torchrun
from tests.integration.test_torchrun import torchrun_command

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
]


@pytest.fixture
def two_hosts():
    try:
        with veth_pair() as hosts:
            yield hosts
    except VirtualHostsUnavailable as e:
        pytest.skip(f"cannot create network namespaces here: {e}")


def test_mirror_across_two_hosts(two_hosts, tmp_path):
    """4 ranks, 2 per host: rank 0 (server) and vision on A, two generators on B; the
    links between them are TCP links across the veth pair."""
    head_addr = two_hosts[0].address
    port = random.randint(20000, 40000)
    procs, logs = [], []
    for node_rank, host in enumerate(two_hosts):
        logs.append(tmp_path / f"host{node_rank}.log")
        with open(logs[-1], "wb") as log:
            # In a namespace the host name resolves nowhere: name the interface gloo
            # uses; the static rendezvous puts node 0, and so rank 0, on host A.
            procs.append(subprocess.Popen(
                host.command("env", f"GLOO_SOCKET_IFNAME={host.interface}", "PYTHONUNBUFFERED=1",
                             *torchrun_command(), "--nnodes", "2", "--nproc-per-node", "2",
                             "--node-rank", str(node_rank), "--rdzv-backend", "static",
                             "--rdzv-endpoint", f"{head_addr}:{port}", "--rdzv-conf", "timeout=60",
                             str(LAUNCHER), "--port", "8765"),
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True))
    try:
        deadline = time.monotonic() + 120
        while not URL.search(logs[0].read_text(errors="replace")):
            assert all(p.poll() is None for p in procs), "\n".join(p.read_text() for p in logs)
            assert time.monotonic() < deadline, "\n".join(p.read_text() for p in logs)
            time.sleep(0.3)
        # The WebSocket client must run inside host A's namespace: a child process
        # (``-c`` with cwd at the repo root makes ``tests`` importable there).
        client = subprocess.run(two_hosts[0].command(sys.executable, "-c", CLIENT),
                                capture_output=True, text=True, timeout=120, cwd=REPO)
        assert client.returncode == 0, client.stdout + client.stderr
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
        text = "".join(p.read_text(errors="replace") for p in logs)
        assert text.count("INFO runtime.rank_runtime: stopped") == 4, text[-3000:]
        assert "job failed" not in text
    finally:
        for p in procs:
            kill_torchrun(p)


CLIENT = """
from tests.integration.test_distributed import stream_and_collect
from tests.integration.test_single_process import check_stream
(got,) = stream_and_collect(8765, frames=12)
check_stream(got, 11)
stats = got.of_type("stats")[-1]
assert [r["role"] for r in stats["ranks"]] == ["server+ingest+display", "vision", "generator", "generator"]
assert all(r["alive"] for r in stats["ranks"])
# Frames crossed the hosts both ways: the links between them are TCP links.
nodes = {r["rank"]: r["node"] for r in stats["ranks"]}
assert {nodes[0], nodes[1]} == {nodes[0]} and {nodes[2], nodes[3]} == {nodes[2]} and nodes[0] != nodes[2], nodes
"""
