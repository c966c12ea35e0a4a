"""The launcher's command line: dry-run plans and clear refusals, without starting anything."""

import re
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
    assert "process group: nccl" in result.stdout


def test_dry_run_shows_control_links_and_each_links_transport_and_backend():
    result = run("--config", "configs/mirror-2node.yaml", "--dry-run", "--world-size", "8", "--nnodes", "2",
                 "--gpus-per-node", "4")
    out = result.stdout
    assert "links (31: 17 data, 7 control, 7 status):" in out
    assert re.search(r"^  control\s+control:0->5\s+0 -> 5\s+cpu -> cpu\s+tcp$", out, re.M)  # between nodes
    assert re.search(r"^  status\s+status:2->0\s+2 -> 0\s+cpu -> cpu\s+same-host$", out, re.M)
    assert re.search(r"^  data\s+vision#0->generator#1\s+1 -> 4\s+cuda:1 -> cuda:0\s+torch \(nccl\)$", out, re.M)
    # ... and what each rank runs, wired to those links.
    assert "rank 4 (generator) on node 1, cuda:0:" in out
    assert "  control client: sends status:4->0; receives control:0->4" in out


def test_dry_run_refuses_a_world_too_small_and_names_the_field():
    result = run("--config", "configs/mirror-2node.yaml", "--dry-run", "--world-size", "3")
    assert result.returncode == 2
    assert "pipeline.stages[2].replicas: not enough ranks" in result.stderr
    assert "Run with world size 4" in result.stderr
    assert result.stderr.count("not enough ranks") == 1


def test_uneven_nodes_and_bad_config_are_refused(tmp_path):
    result = run("--dry-run", "--world-size", "9", "--nnodes", "2")
    assert result.returncode == 2 and "world_size: world size 9 does not split evenly" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("vision:\n  detect_every: 0\n")
    result = run("--config", str(bad), "--dry-run")
    assert result.returncode == 2 and "vision.detect_every: must be within 1..30, got 0" in result.stderr
    result = run("--config", str(tmp_path / "missing.yaml"), "--dry-run")
    assert result.returncode == 2 and "config file not found" in result.stderr


def test_every_problem_in_a_config_file_is_reported_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("vision:\n  detect_every: 0\n  detect_widht: 300\nserver:\n  port: 70000\n"
                   "pipeline:\n  stages:\n    - {name: ingest, placement: server, replicas: two}\n"
                   "runtime:\n  style: sepia\n")
    result = run("--config", str(bad), "--dry-run")
    assert result.returncode == 2
    assert "5 problems:" in result.stderr and result.stderr.count("pipeline.stages[0].replicas") == 1
    for line in ("vision.detect_every: must be within 1..30, got 0",
                 "vision.detect_widht: unknown key; allowed:",
                 "server.port: must be within 0..65535, got 70000",
                 "pipeline.stages[0].replicas: expected an integer >= 1 or 'auto', got 'two'",
                 "runtime.style: got 'sepia'; allowed: 'auto', 'neon'"):
        assert f"  {line}" in result.stderr, result.stderr


def test_host_and_port_flags_override_the_config(tmp_path):
    result = run("--dry-run", "--port", "70000")
    assert result.returncode == 2 and "server.port: must be within 0..65535, got 70000" in result.stderr
