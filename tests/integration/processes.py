"""Starting the real launcher as separate rank processes (as torchrun would) for tests.

The ranks get the same environment torchrun gives them (RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR/PORT) but no elastic agent: nothing restarts or kills
them for us, so these tests see the runtime's own failure handling.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launch" / "mirror.py"
URL = re.compile(r"open (http://127\.0\.0\.1:(\d+)/)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankProcesses:
    def __init__(self, world_size: int, config: Path | None, log_dir: Path, extra: list[str] = ()) -> None:
        self.world_size = world_size
        master = str(free_port())
        self.procs: list[subprocess.Popen] = []
        self.logs = [log_dir / f"rank{r}.log" for r in range(world_size)]
        args = [sys.executable, str(LAUNCHER), "--port", "0", *extra]
        if config is not None:
            args += ["--config", str(config)]
        for rank in range(world_size):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=master,
                       PYTHONUNBUFFERED="1")
            with open(self.logs[rank], "wb") as log:
                self.procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                   cwd=REPO))

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> int:
        """The web server's port once rank 0 printed its URL."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = URL.search(self.log(0))
            if match:
                return int(match.group(2))
            for rank, p in enumerate(self.procs):
                if p.poll() is not None:
                    raise AssertionError(f"rank {rank} exited with {p.returncode} during startup:\n{self.log(rank)}")
            time.sleep(0.1)
        raise AssertionError(f"not ready in {timeout} s; rank 0 log:\n{self.log(0)}")

    def signal(self, rank: int, signum: int) -> None:
        self.procs[rank].send_signal(signum)

    def wait_all(self, timeout: float, ranks: list[int] | None = None) -> list[int | None]:
        """Exit codes (None: still running) after waiting for ``ranks`` (default: all)."""
        deadline = time.monotonic() + timeout
        for p in (self.procs if ranks is None else [self.procs[r] for r in ranks]):
            try:
                p.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return [p.poll() for p in self.procs]

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait(5)


def _children(parent: int) -> dict[int, list[bytes]]:
    """The processes whose parent is ``parent``: pid -> their environment entries."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            found[int(entry.name)] = environ
    return found


def worker_pid(agent: int, rank: int, timeout: float = 10.0) -> int:
    """The pid of torchrun worker ``rank`` (a child of the agent whose environment says RANK)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid, environ in _children(agent).items():
            if f"RANK={rank}".encode() in environ:
                return pid
        time.sleep(0.1)
    raise AssertionError(f"no worker with RANK={rank} under torchrun pid {agent}")


def kill_torchrun(proc: subprocess.Popen) -> None:
    """SIGKILL a torchrun started with ``start_new_session`` and every worker it runs. Its
    workers have sessions of their own (torch's subprocess handler starts them so), so
    killing torchrun's process group alone would leave them running, orphaned."""
    if proc.poll() is not None:
        return
    workers = _children(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(10)

