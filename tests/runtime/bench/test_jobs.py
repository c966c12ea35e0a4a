"""PipelineJob: the launch command, readiness from rank 0's line, failures with the log's
tail, and a stop that leaves no process behind."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time

import psutil
import pytest

from runtime.bench import jobs
from runtime.bench.jobs import LAUNCHER, READY, STOPPED, JobError, PipelineJob
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


def stand_in_launcher(exit_code: int) -> list[str]:
    """A launcher that prints the ready line at once and, on SIGTERM, logs an orderly stop
    and exits with ``exit_code``: the job's log says clean, only its exit status may not."""
    source = textwrap.dedent(f"""
        import signal, sys, time

        def stop(*_):
            print({STOPPED!r}, flush=True)
            sys.exit({exit_code})

        signal.signal(signal.SIGTERM, stop)
        print("Mind Mirror is running: open http://127.0.0.1:1234/", flush=True)
        time.sleep(60)
    """)
    return [sys.executable, "-c", source]


@pytest.mark.parametrize("exit_code, clean", [(0, True), (1, False)])
def test_a_stop_is_clean_only_if_the_launcher_exits_0(tmp_path, monkeypatch, exit_code, clean):
    job = PipelineJob({}, name="stand-in", out_dir=tmp_path)
    monkeypatch.setattr(job, "command", lambda: stand_in_launcher(exit_code))
    assert job.start() == 1234
    assert job.stop() == jobs.JobExit(returncode=exit_code, clean=clean, killed=False)


class InterruptOnceSpawned:
    """Stands in for the ready-line pattern: Ctrl-C arrives once the launcher has started a child."""

    def search(self, text):
        if "child started" in text:
            raise KeyboardInterrupt


def test_an_interrupted_start_stops_the_job_before_passing_the_interrupt_on(tmp_path, monkeypatch):
    job = PipelineJob({}, name="interrupted", out_dir=tmp_path)
    spawning_launcher = ("import subprocess, sys, time\n"
                         "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                         "print('child started', flush=True)\n"
                         "time.sleep(60)")
    monkeypatch.setattr(job, "command", lambda: [sys.executable, "-c", spawning_launcher])
    monkeypatch.setattr(jobs, "READY", InterruptOnceSpawned())
    with pytest.raises(KeyboardInterrupt):
        job.start()
    # SIGTERM ended the launcher; its child survived that and was killed with the group.
    assert job.exit == jobs.JobExit(returncode=-signal.SIGTERM, clean=False, killed=True)
    assert group_gone(job._proc.pid)


def group_gone(pgid: int, within_s: float = 5.0) -> bool:
    """Whether no process of the group is left within ``within_s`` (a killed orphan
    lingers until whoever adopted it reaps it)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


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
