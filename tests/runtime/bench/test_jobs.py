"""PipelineJob: the launch command, readiness from rank 0's line, failures with the log's
tail, and a stop that leaves no process behind."""

from __future__ import annotations

import os
import sys

import psutil
import pytest

from runtime.bench.jobs import LAUNCHER, READY, JobError, PipelineJob
from runtime.config import load_config

SYNTHETIC = {"pipeline": {"name": "jobtest", "stages": [
    {"name": "ingest", "placement": "server"},
    {"name": "s1", "kind": "synthetic", "options": {"cost_ms": 1}},
    {"name": "display", "placement": "server"}]}}


def test_command_runs_the_launcher_alone_or_under_torchrun(tmp_path):
    single = PipelineJob({}, name="a", out_dir=tmp_path)
    assert single.command() == [sys.executable, str(LAUNCHER), "--config", str(tmp_path / "a.yaml"), "--port", "0"]
    dist = PipelineJob({}, name="b", out_dir=tmp_path, world_size=4)
    assert dist.command()[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  "--nproc-per-node", "4"]
    assert dist.command()[6:] == [str(LAUNCHER), "--config", str(tmp_path / "b.yaml"), "--port", "0"]
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        PipelineJob({}, name="c", out_dir=tmp_path, world_size=0)


def test_config_is_written_as_yaml_the_launcher_loads(tmp_path):
    job = PipelineJob(SYNTHETIC, name="cfg", out_dir=tmp_path / "logs")
    config = load_config(job.config_path)
    assert [s.name for s in config.pipeline.stages] == ["ingest", "s1", "display"]
    assert config.stage_config(config.pipeline.stage("s1")).cost_ms == 1.0


def test_ready_line_gives_url_and_port():
    match = READY.search("noise\nMind Mirror is running: open http://127.0.0.1:40123/\n")
    assert match.group(1) == "http://127.0.0.1:40123/" and int(match.group(2)) == 40123


def test_a_job_that_exits_during_startup_fails_with_its_log(tmp_path):
    job = PipelineJob({"pipeline": {"stages": "nope"}}, name="bad", out_dir=tmp_path, ready_timeout_s=60)
    with pytest.raises(JobError, match=r"(?s)exited with 2 during startup.*last \d+ lines of .*bad\.log.*"
                                       r"pipeline\.stages: expected a list"):
        job.start()


def test_stop_before_start_is_an_error(tmp_path):
    with pytest.raises(JobError, match="never started"):
        PipelineJob({}, name="x", out_dir=tmp_path).stop()


def test_single_process_job_starts_serves_and_stops_cleanly(tmp_path):
    with PipelineJob(SYNTHETIC, name="one", out_dir=tmp_path, world_size=1) as job:
        assert job.port > 0 and job.url.endswith(f":{job.port}/") and job.startup_s > 0
        pids = job.pids()
        assert pids[0] == job._proc.pid and all(psutil.pid_exists(p) for p in pids)
    assert job.exit.clean and job.exit.returncode == 0 and not job.exit.killed
    assert job.stop() is job.exit  # idempotent
    assert job.pids() == []
    with pytest.raises(ProcessLookupError):
        os.killpg(job._proc.pid, 0)  # nothing of the job's process group is left
