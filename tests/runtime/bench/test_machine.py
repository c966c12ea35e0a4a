"""The machine description: CPU, memory, versions, GPUs and the checkout's commit."""

import dataclasses
import json
import re
import shutil
import subprocess

import pytest
import torch

from runtime.bench.machine import cpu_model, describe, git_state


def test_describe_states_what_the_readme_performance_section_needs():
    machine = describe()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", machine.date_utc)
    assert machine.cpu and 1 <= machine.usable_cores <= machine.logical_cores and machine.ram_gib > 0
    assert machine.os and machine.python.count(".") == 2
    assert machine.torch == torch.__version__ and machine.cuda == torch.version.cuda
    assert len(machine.gpus) >= torch.cuda.device_count()
    assert (machine.gpu_driver is None) == (not machine.gpus)
    json.dumps(dataclasses.asdict(machine))  # plain data only


def test_cpu_model_reads_the_first_model_name(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n\n"
                       "processor\t: 1\nmodel name\t: AMD EPYC 7B13\n")
    assert cpu_model(cpuinfo) == "AMD EPYC 7B13"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # e.g. some ARM kernels
    assert cpu_model(cpuinfo)  # falls back to the platform's name
    assert cpu_model(tmp_path / "missing")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_state_gives_the_short_commit_and_whether_the_tree_differs(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.com",
                               *args], check=True, capture_output=True, text=True).stdout.strip()

    assert git_state(tmp_path) == ("unknown", False)  # not a checkout
    git("init", "-q")
    (tmp_path / "a.txt").write_text("a\n")
    git("add", "a.txt")
    git("commit", "-q", "-m", "first")
    assert git_state(tmp_path) == (git("rev-parse", "--short", "HEAD"), False)
    (tmp_path / "a.txt").write_text("changed\n")
    assert git_state(tmp_path)[1] is True
