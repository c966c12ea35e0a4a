"""Two hosts for real: each torchrun agent in its own network namespace, linked by a veth
pair, so every cross-node link crosses a real network interface (not loopback).

Needs root and iproute2 (``ip netns``); skipped otherwise. The browser side stays on
host A's loopback, as it would on a head node.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.processes import LAUNCHER, REPO, URL
from tests.integration.test_torchrun import torchrun_command

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"),
]


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


@pytest.fixture
def two_hosts():
    """Namespaces mm<id>a / mm<id>b with 10.<n>.<m>.1 and .2 on a veth pair."""
    tag = f"{os.getpid() % 10000}{random.randint(0, 99)}"
    net = f"10.{random.randint(100, 199)}.{random.randint(0, 255)}"
    hosts = [(f"mm{tag}a", f"mv{tag}a", f"{net}.1"), (f"mm{tag}b", f"mv{tag}b", f"{net}.2")]
    try:
        for ns, _, _ in hosts:
            sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", hosts[0][1], "type", "veth", "peer", "name", hosts[1][1])
        for ns, dev, addr in hosts:
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"cannot create network namespaces here: {e}")
    yield hosts
    for ns, _, _ in hosts:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def test_mirror_across_two_hosts(two_hosts, tmp_path):
    """4 ranks, 2 per host: rank 0 (server) and vision on A, two generators on B."""
    head_addr = two_hosts[0][2]
    port = random.randint(20000, 40000)
    procs, logs = [], []
    for i, (ns, dev, addr) in enumerate(two_hosts):
        logs.append(tmp_path / f"host{i}.log")
        with open(logs[-1], "wb") as log:
            # In a namespace the hostname resolves nowhere: name the address torchrun
            # advertises, the interface gloo uses, and which agent hosts the rendezvous.
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, "env", f"GLOO_SOCKET_IFNAME={dev}", "PYTHONUNBUFFERED=1",
                 *torchrun_command(), "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", f"{head_addr}:{port}", "--rdzv-id", f"two-hosts-{port}",
                 "--rdzv-conf", f"is_host={'true' if i == 0 else 'false'}", "--local-addr", addr,
                 str(LAUNCHER), "--port", "8765"],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True))
    try:
        deadline = time.monotonic() + 120
        while not URL.search(logs[0].read_text(errors="replace")):
            assert all(p.poll() is None for p in procs), "\n".join(p.read_text() for p in logs)
            assert time.monotonic() < deadline, "\n".join(p.read_text() for p in logs)
            time.sleep(0.3)
        # The WebSocket client must run inside host A's namespace: a child process
        # (``-c`` with cwd at the repo root makes ``tests`` importable there).
        client = subprocess.run(["ip", "netns", "exec", two_hosts[0][0], sys.executable, "-c", CLIENT],
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
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


CLIENT = """
from tests.integration.test_distributed import stream_and_collect
from tests.integration.test_single_process import check_stream
(got,) = stream_and_collect(8765, frames=12)
check_stream(got, 11)
stats = got.of_type("stats")[-1]
assert [r["role"] for r in stats["ranks"]] == ["server+ingest+display", "vision", "generator", "generator"]
assert all(r["alive"] for r in stats["ranks"])
"""
