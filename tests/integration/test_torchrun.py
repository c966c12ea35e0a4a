"""The README's way to run: torchrun launches the ranks; a WebSocket client drives them."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.processes import LAUNCHER, REPO, URL
from tests.integration.test_distributed import stream_and_collect
from tests.integration.test_single_process import check_stream

pytestmark = pytest.mark.timeout(180)


def torchrun_command() -> list[str]:
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def test_torchrun_three_ranks_serve_a_session_and_stop_on_sigterm(tmp_path):
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
        (got,) = stream_and_collect(int(match.group(2)), frames=12)
        check_stream(got, 11)
        assert [r["role"] for r in got.of_type("stats")[-1]["ranks"]] == [
            "server+ingest+display", "vision", "generator"]

        proc.send_signal(signal.SIGTERM)  # torchrun forwards it to every rank
        proc.wait(30)
        text = log_path.read_text(errors="replace")
        assert text.count("INFO runtime.rank_runtime: stopped") == 3, text[-3000:]
        assert "job failed" not in text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    leftovers = subprocess.run(["pgrep", "-f", f"{LAUNCHER} --port 0"], capture_output=True, text=True).stdout
    assert not leftovers.strip(), f"orphan rank processes: {leftovers}"
