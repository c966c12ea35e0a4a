"""The README's way to run: torchrun launches the ranks; a WebSocket client drives them."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.processes import LAUNCHER, REPO, URL, free_port, kill_torchrun
from tests.integration.test_distributed import stream_and_collect
from tests.integration.test_single_process import check_stream

pytestmark = pytest.mark.timeout(180)


def torchrun_command() -> list[str]:
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


@contextlib.contextmanager
def torchrun_job(tmp_path):
    """torchrun with 3 ranks in a session of its own; yields it, its log and the page's port
    once rank 0 serves, and kills what is left at the end."""
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*torchrun_command(), "--standalone", "--nproc-per-node", "3", str(LAUNCHER), "--port", "0"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"),
            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not (match := URL.search(log_path.read_text(errors="replace"))):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        yield proc, log_path, int(match.group(2))
    finally:
        kill_torchrun(proc)


def test_torchrun_three_ranks_serve_a_session_and_stop_on_sigterm(tmp_path):
    with torchrun_job(tmp_path) as (proc, log_path, port):
        (got,) = stream_and_collect(port, frames=12)
        check_stream(got, 11)
        assert [r["role"] for r in got.of_type("stats")[-1]["ranks"]] == [
            "server+ingest+display", "vision", "generator"]

        proc.send_signal(signal.SIGTERM)  # torchrun forwards it to every rank
        proc.wait(30)
        text = log_path.read_text(errors="replace")
        assert text.count("INFO runtime.rank_runtime: stopped") == 3, text[-3000:]
        assert "job failed" not in text
    leftovers = subprocess.run(["pgrep", "-f", f"{LAUNCHER} --port 0"], capture_output=True, text=True).stdout
    assert not leftovers.strip(), f"orphan rank processes: {leftovers}"


def test_ctrl_c_on_torchrun_stops_every_rank_in_order(tmp_path):
    """What the README says of Ctrl-C: every rank stops cleanly; torchrun itself exits 0,
    or (as torch's elastic agent does today) 1 with its SignalException."""
    with torchrun_job(tmp_path) as (proc, log_path, _):
        proc.send_signal(signal.SIGINT)  # a terminal's Ctrl-C reaches torchrun, not its workers' sessions
        code = proc.wait(30)
        text = log_path.read_text(errors="replace")
        assert text.count("INFO runtime.rank_runtime: stopped") == 3, text[-3000:]
        assert text.count("INFO runtime.lifecycle: stopping: ") == 3 and "job failed" not in text
        assert code == 0 or (code == 1 and "SignalException" in text), text[-3000:]


def test_torchrun_two_nodes_with_c10d_rendezvous(tmp_path):
    """Two torchrun agents (two "nodes" on loopback) meet through c10d; rank 0's node serves."""
    port = free_port()
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    procs = []
    for log_path in logs:
        with open(log_path, "wb") as log:
            procs.append(subprocess.Popen(
                [*torchrun_command(), "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"mm-{port}", str(LAUNCHER), "--port", "0"],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                start_new_session=True))
    try:
        deadline = time.monotonic() + 120
        while not (match := next(filter(None, (URL.search(p.read_text(errors="replace")) for p in logs)), None)):
            assert all(p.poll() is None for p in procs), "\n".join(p.read_text() for p in logs)
            assert time.monotonic() < deadline, "\n".join(p.read_text() for p in logs)
            time.sleep(0.2)
        (got,) = stream_and_collect(int(match.group(2)), frames=12)
        check_stream(got, 11)
        ranks = got.of_type("stats")[-1]["ranks"]
        assert [r["role"] for r in ranks] == ["server+ingest+display", "vision", "generator", "generator"]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
        text = "".join(p.read_text(errors="replace") for p in logs)
        assert text.count("INFO runtime.rank_runtime: stopped") == 4, text[-3000:]
    finally:
        for p in procs:
            kill_torchrun(p)
