"""A real Mind Mirror job for one benchmark run: started from a config dict, stopped for sure.

    with PipelineJob(config, name="pipeline-single", out_dir=out, world_size=1) as job:
        job.port    # the web server's port, read from rank 0's "open http://HOST:PORT/" line
        job.pids()  # the launcher and every process under it, for CPU sampling

``world_size`` 1 runs ``python launch/mirror.py`` (one process, in-process links);
more runs ``python -m torch.distributed.run --standalone --nproc-per-node N launch/mirror.py``,
exactly as the README starts it. The config is written as ``NAME.yaml`` and everything
the job prints goes to ``NAME.log``, both in ``out_dir``, so a bad figure can be traced
to its run. ``--port 0`` lets the server pick a free port.

Stopping: SIGTERM goes to the ranks themselves (for torchrun, the agent's children), which
stop in order and exit 0, so torchrun exits 0 too; signalling the torchrun agent instead
makes it exit 1 with a traceback even when every rank stopped cleanly. Past
``stop_timeout_s`` the whole job is killed. The job runs in a session of its own, so that
kill reaches every process it started and no rank outlives the benchmark.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launch" / "mirror.py"
READY = re.compile(r"Mind Mirror is running: open (https?://\S+:(\d+)/)")
"""The line ``launch/mirror.py`` prints on rank 0 once every rank is ready."""
STOPPED = "runtime.rank_runtime: stopped"
"""Each rank logs this as the last step of an orderly stop."""
LOG_TAIL_LINES = 40


class JobError(RuntimeError):
    """The job did not start, or did not stop; the message ends with its log's tail."""


@dataclass(kw_only=True, slots=True, frozen=True)
class JobExit:
    """How a job ended."""

    returncode: int | None
    """The launcher's exit status (negative: the signal that ended it)."""
    clean: bool
    """The launcher exited 0, every rank logged an orderly stop, none logged a failure,
    and nothing was killed."""
    killed: bool
    """It outlived the stop bound and was killed."""


class PipelineJob:
    """One launch of ``launch/mirror.py`` (see the module docstring)."""

    def __init__(self, config: dict[str, Any], *, name: str, out_dir: Path, world_size: int = 1,
                 ready_timeout_s: float = 120.0, stop_timeout_s: float = 30.0) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.name = name
        self.world_size = world_size
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        out_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = out_dir / f"{name}.yaml"
        self.log_path = out_dir / f"{name}.log"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.port: int | None = None
        self.url: str | None = None
        self.startup_s: float | None = None
        """Seconds from launch until rank 0 printed its URL."""
        self.stop_s: float | None = None
        """Seconds from the stop signal until every process of the job was gone."""
        self.exit: JobExit | None = None
        self._proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        args = [str(LAUNCHER), "--config", str(self.config_path), "--port", "0"]
        if self.world_size == 1:
            return [sys.executable, *args]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(self.world_size), *args]

    # -- starting --------------------------------------------------------------------

    def start(self) -> int:
        """Launch and wait until rank 0 serves; returns the port. Raises ``JobError`` with
        the log's tail if a process exits or time runs out. Whatever ends the wait early
        (that error, Ctrl-C, anything else) stops the job first, so no rank is orphaned."""
        started = self.launch()
        try:
            self.url, self.port = self._wait_until_ready(started + self.ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        return self.port

    def launch(self) -> float:
        """Start the processes without waiting for them to serve (``start`` waits; a part of
        a job that runs no rank 0, e.g. another node's agent, prints no ready line); returns
        ``time.monotonic()`` at the launch."""
        if self._proc is not None:
            raise JobError(f"job {self.name} was already started")
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                          env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
        return started

    def _wait_until_ready(self, deadline: float) -> tuple[str, int]:
        """(URL, port) from rank 0's ready line; ``JobError`` if the launcher exits or
        ``deadline`` passes first."""
        while True:
            match = READY.search(self.log_text())
            if match:
                return match.group(1), int(match.group(2))
            if self._proc.poll() is not None:
                raise JobError(f"job {self.name} exited with {self._proc.returncode} during startup\n"
                               f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise JobError(f"job {self.name} not ready in {self.ready_timeout_s:g} s\n{self.log_tail()}")
            time.sleep(0.05)

    def __enter__(self) -> "PipelineJob":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- observing -------------------------------------------------------------------

    def pids(self) -> list[int]:
        """The launcher and every live process under it (torchrun's agent and its ranks)."""
        if self._proc is None or self._proc.poll() is not None:
            return []
        try:
            root = psutil.Process(self._proc.pid)
            return [root.pid, *(child.pid for child in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.log_path} ---\n" + "\n".join(tail)

    # -- stopping --------------------------------------------------------------------

    def stop(self) -> JobExit:
        """Orderly stop (SIGTERM to the ranks), then kill the whole job past the bound.
        Safe to call more than once; returns how the job ended."""
        if self._proc is None:
            raise JobError(f"job {self.name} was never started")
        if self.exit is not None:
            return self.exit
        started = time.monotonic()
        ranks = self._rank_pids()
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass  # already gone
        killed = False
        try:
            self._proc.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            killed = True
        killed = self._finish_group(ranks, force=killed) or killed
        self.stop_s = time.monotonic() - started
        text = self.log_text()
        clean = (not killed and self._proc.returncode == 0 and text.count(STOPPED) == self.world_size
                 and "job failed" not in text)
        self.exit = JobExit(returncode=self._proc.returncode, clean=clean, killed=killed)
        return self.exit

    def _rank_pids(self) -> list[int]:
        """Processes that run ranks: the launcher itself for one process, else torchrun's
        direct children (its ranks; grandchildren are theirs to stop)."""
        if self._proc.poll() is not None:
            return []
        if self.world_size == 1:
            return [self._proc.pid]
        try:
            return [child.pid for child in psutil.Process(self._proc.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def _finish_group(self, ranks: list[int], force: bool = False) -> bool:
        """Kill what is left of the job (everything when ``force``, else only survivors
        once the launcher has exited); True if anything had to be killed. torchrun starts
        each rank in a session of its own, so ``ranks``' groups go too, or a rank would
        outlive the killed agent."""
        if force:
            for pid in ranks:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            os.killpg(self._proc.pid, 0)  # raises if no process of the group is left
        except ProcessLookupError:
            return False
        if not force:
            time.sleep(0.5)  # a rank may still be finishing its own orderly exit
            try:
                os.killpg(self._proc.pid, 0)
            except ProcessLookupError:
                return False
        os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait(10)
        return True
