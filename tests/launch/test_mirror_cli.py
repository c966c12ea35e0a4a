"""The launcher's command line: dry-run plans and clear refusals, without starting anything."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "mirror.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_dry_run_prints_every_rank_with_node_device_and_role():
    result = run("--config", "configs/mirror-2node.yaml", "--dry-run", "--world-size", "8", "--nnodes", "2",
                 "--gpus-per-node", "4")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("pipeline 'mirror-2node': world size 8 = 2 node(s) x 4 process(es)")
    rows = [line.split() for line in lines[2:10]]
    assert [r[0] for r in rows] == [str(i) for i in range(8)]
    assert rows[0][4] == "server+ingest+display" and rows[1][4] == "vision" and rows[7][4] == "generator"
    assert rows[4][1] == "1" and rows[4][3] == "cuda:0"  # rank 4: first process of node 1
    assert "backend: nccl" in result.stdout


def test_dry_run_refuses_a_world_too_small_and_names_the_field():
    result = run("--config", "configs/mirror-2node.yaml", "--dry-run", "--world-size", "3")
    assert result.returncode == 2
    assert "cannot place the pipeline: pipeline.stages[2].replicas: not enough ranks" in result.stderr
    assert "Run with world size 4" in result.stderr


def test_uneven_nodes_and_bad_config_are_refused(tmp_path):
    result = run("--dry-run", "--world-size", "9", "--nnodes", "2")
    assert result.returncode == 2 and "world_size: world size 9 does not split evenly" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("vision:\n  detect_every: 0\n")
    result = run("--config", str(bad), "--dry-run")
    assert result.returncode == 2 and "vision.detect_every: must be within 1..30, got 0" in result.stderr
    result = run("--config", str(tmp_path / "missing.yaml"), "--dry-run")
    assert result.returncode == 2 and "config file not found" in result.stderr


def test_host_and_port_flags_override_the_config(tmp_path):
    result = run("--dry-run", "--port", "70000")
    assert result.returncode == 2 and "server.port: must be within 0..65535, got 70000" in result.stderr
