"""launch/slurm.py against a real SLURM: two nodes (network namespaces) on this machine.

The script launch/slurm.py writes is submitted as it is; a WebSocket client in the root
namespace, a browser's stand-in off the cluster, streams camera frames to the head node's
address and gets them back through ranks on both nodes. Then ``scancel`` must leave no
process of the job behind, and a job that fails must fail in SLURM's records too.
Needs root, iproute2, SLURM and munge (.ci/run installs them); skipped otherwise.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.mirror_client import MirrorClient
from tests.integration.slurm_cluster import (
    SlurmCluster,
    processes_with_env,
    slurm_cluster,
    unavailable_reason,
)
from tests.integration.test_single_process import check_stream

REPO = Path(__file__).resolve().parents[2]
URL_LINE = re.compile(r"Mind Mirror is running: open (http://(\S+):(\d+)/)")
# The nodes are fresh network namespaces: below the ephemeral range (slurmd, srun) these
# ports are free. Each test's job has its own, so a job left over cannot take the next one's.
PORTS = {"mirror": (8765, 29400), "failing": (8766, 29401)}
FRAMES = 12

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One cluster for the module's jobs (bringing one up and down takes ~3 s)."""
    with slurm_cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


def write_and_submit(cluster: SlurmCluster, log_dir: Path, ports: tuple[int, int], *extra: str) -> tuple[str, Path]:
    """launch/slurm.py's script for 2 nodes x 2 processes of the mirror, submitted by its
    own --submit; the job id and the batch log."""
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "slurm.py"), "--config", "configs/mirror.yaml", "--nodes", "2",
         "--nproc-per-node", "2", "--ifname", "eth0", "--port", str(ports[0]), "--rdzv-port", str(ports[1]),
         "--time", "5", "--join-timeout", "60", "--output-dir", str(log_dir), "--submit", *extra],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    job_id = re.search(r"submitted job (\d+)", result.stdout + result.stderr).group(1)
    return job_id, log_dir / f"mindmirror-{job_id}.out"


def job_logs(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(log_dir.glob("*.*")))


def wait_for_url(cluster: SlurmCluster, job_id: str, batch_log: Path, timeout: float = 120) -> re.Match:
    """Rank 0's URL line, once the batch script copied it from the head's log."""
    deadline = time.monotonic() + timeout
    while not (found := URL_LINE.search(batch_log.read_text(errors="replace") if batch_log.exists() else "")):
        state = cluster.job(job_id).get("JobState")
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {state}\n{job_logs(batch_log.parent)}"
        assert time.monotonic() < deadline, f"no URL in {timeout} s\n{job_logs(batch_log.parent)}"
        time.sleep(0.5)
    return found


BOTH_WAYS = {("0", "1"), ("1", "0")}


def crossings(stats: dict) -> set[tuple[str, str]]:
    """(source node, destination node) of every data hop that carried frames."""
    return {(h.get("src_node"), h.get("dst_node")) for name, h in stats["hops"].items()
            if "->" in name and (h.get("bytes_sent") or h.get("hop_ms", {}).get("count"))}


def stream(address: str, port: int) -> tuple:
    """Frames through the page's WebSocket at ``address``, as a browser off the cluster would."""
    async def scenario():
        client = MirrorClient(port)
        client.url = f"ws://{address}:{port}/ws"
        async with client:
            await client.stream(FRAMES, fps=12)
            assert await client.wait_for(lambda g: g.outputs and g.outputs[-1].frame_id == FRAMES - 1, 60)
            # Each rank reports its links in heartbeats: wait until rank 0 heard of both ways.
            await client.wait_for(lambda g: g.of_type("stats") and crossings(g.of_type("stats")[-1]) >= BOTH_WAYS, 15)
            return client.got

    got = asyncio.run(scenario())
    trace = json.load(urllib.request.urlopen(f"http://{address}:{port}/trace?last=3", timeout=10))
    return got, trace


def job_processes(job_id: str) -> list[str]:
    """Command lines of this machine's processes that belong to the job (SLURM gives every
    process of a job SLURM_JOB_ID in its environment)."""
    found = []
    for pid in processes_with_env(f"SLURM_JOB_ID={job_id}".encode()):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it ended meanwhile
            continue
        found.append(f"{pid}: {command}")
    return found


def assert_none_left(job_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while left := job_processes(job_id):
        assert time.monotonic() < deadline, f"job {job_id} ended but these still run: {left}"
        time.sleep(0.5)


def test_mirror_on_two_slurm_nodes_serves_the_host_and_scancel_stops_everything(cluster, tmp_path):
    head = cluster.nodes[0]
    web_port = PORTS["mirror"][0]
    job_id, batch_log = write_and_submit(cluster, tmp_path / "logs", PORTS["mirror"])
    url = wait_for_url(cluster, job_id, batch_log)
    # A wildcard bind names the head by its host name; from here its address reaches it.
    assert url.group(2) == head.name and int(url.group(3)) == web_port, url.group(0)

    got, trace = stream(head.host.address, web_port)
    check_stream(got, FRAMES - 1)
    stats = got.of_type("stats")[-1]
    assert [(r["rank"], r["role"], r["node"], r["alive"]) for r in stats["ranks"]] == [
        (0, "server+ingest+display", "0", True), (1, "vision", "0", True),
        (2, "generator", "1", True), (3, "generator", "1", True)], stats["ranks"]
    # The frames crossed the nodes: into a generator on node 1 and back to rank 0 on node 0.
    assert crossings(stats) >= BOTH_WAYS, stats["hops"]
    # ... and the nodes are real SLURM nodes: each rank reports its machine's host name,
    # and rank 0's is the allocation's first node.
    hosts = {rank: info["host"] for rank, info in trace["metadata"]["ranks"].items()}
    other = cluster.nodes[1].name
    assert hosts == {"0": head.name, "1": head.name, "2": other, "3": other}, hosts
    job = cluster.job(job_id)
    assert job["BatchHost"] == head.name and job["NodeList"] == "node[0-1]", job

    log = batch_log.read_text()
    plan_at, head_at, url_at = (log.index(s) for s in (
        "pipeline 'mirror': world size 4 = 2 node(s) x 2 process(es)", f"head {head.name} ({head.host.address})",
        url.group(0)))
    assert head_at < plan_at < url_at, log  # the plan printed before anything starts
    assert "open http" in (tmp_path / "logs" / f"mindmirror-{job_id}-{head.name}.log").read_text()

    assert job_processes(job_id), "the job's processes should be visible while it runs"
    cluster.run("scancel", job_id)
    ended = cluster.wait_job_ended(job_id, 60)
    assert ended["JobState"] == "CANCELLED", ended
    assert_none_left(job_id)
    # scancel's SIGTERM reached every rank through srun and torchrun: each stopped in order.
    node_logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*.log"))
    assert node_logs.count("INFO runtime.rank_runtime: stopped\n") == 4, node_logs[-3000:]


def test_a_failing_job_fails_in_slurms_records(cluster, tmp_path):
    """Rank 0 cannot bind the web server (the address is not the head's) once the plan
    passed: the head's torchrun fails, srun's --kill-on-bad-exit ends the other node, and
    the batch script exits with srun's status, which SLURM records as the job's."""
    job_id, batch_log = write_and_submit(cluster, tmp_path / "logs", PORTS["failing"], "--host",
                                         cluster.controller_address)
    ended = cluster.wait_job_ended(job_id, 120)
    assert ended["JobState"] == "FAILED" and ended["ExitCode"] != "0:0", ended
    status = int(ended["ExitCode"].split(":")[0])
    assert f"srun exited with status {status}" in batch_log.read_text(), job_logs(batch_log.parent)
    assert_none_left(job_id)
