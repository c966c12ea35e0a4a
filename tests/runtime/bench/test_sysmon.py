"""SysMonitor: CPU of a process tree and of the machine, GPU through NVML or a clean skip."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import time

import psutil
import pytest

from runtime.bench.sysmon import Sample, SysMonitor

SPIN = "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass\n"
SLEEPING_PARENT = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {SPIN!r}])"


def tree(pid: int) -> list[int]:
    try:
        return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def test_a_spinning_child_shows_up_in_the_job_figures():
    # The parent sleeps and its child spins: only a sum over the tree sees the work.
    parent = subprocess.Popen([sys.executable, "-c", SLEEPING_PARENT])
    try:
        with SysMonitor(lambda: tree(parent.pid), interval_s=0.1) as monitor:
            time.sleep(1.2)
        usage = monitor.summary()
    finally:
        parent.wait(10)
    assert usage.samples >= 5
    cores = psutil.cpu_count()
    assert 0 < usage.max["job_cpu_pct"] <= 100 * cores * 1.2
    assert math.isclose(usage.mean["job_machine_pct"], usage.mean["job_cpu_pct"] / cores)
    assert 0 <= usage.mean["system_cpu_pct"] <= 100
    assert 0 <= usage.mean["other_cpu_pct"] <= usage.mean["system_cpu_pct"]


def test_processes_that_exit_are_dropped_without_error():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    with SysMonitor(lambda: [child.pid], interval_s=0.05) as monitor:
        child.wait(10)
        time.sleep(0.2)
    assert monitor.summary().samples >= 1


def test_gpu_figures_or_the_reason_there_are_none():
    with SysMonitor(lambda: [], interval_s=0.05) as monitor:
        time.sleep(0.15)
    usage = monitor.summary()
    if usage.gpu_skip is None:
        assert usage.max["gpu_util_pct"] >= 0 and usage.max["gpu_mem_mb"] > 0
    else:
        assert usage.gpu_skip.startswith("no GPU figures") and "gpu_util_pct" not in usage.mean


def test_summary_uses_only_the_samples_inside_the_window():
    monitor = SysMonitor(lambda: [])
    monitor.samples = [Sample(at=t, job_cpu_pct=v, job_machine_pct=v / 2, system_cpu_pct=50.0,
                              other_cpu_pct=5.0)
                       for t, v in ((1.0, 500.0), (2.0, 100.0), (3.0, 50.0), (4.0, 900.0))]
    usage = monitor.summary(since=1.5, until=3.0)
    assert usage.samples == 2
    assert usage.mean["job_cpu_pct"] == 75.0 and usage.max["job_cpu_pct"] == 100.0
    assert monitor.summary(since=10).samples == 0 and monitor.summary(since=10).mean == {}


def test_an_error_while_sampling_stops_sampling_and_is_kept():
    calls = itertools.count()

    def pids():
        if next(calls):  # the first call is start()'s baseline; every sample's call fails
            raise RuntimeError("process table unreadable")
        return []

    with SysMonitor(pids, interval_s=0.02) as monitor:
        time.sleep(0.2)
        assert not monitor._thread.is_alive()
    assert monitor.error == "RuntimeError: process table unreadable"
    usage = monitor.summary()
    assert usage.sampling_error == monitor.error and usage.samples == 0


def test_bad_interval_is_refused():
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        SysMonitor(lambda: [], interval_s=0)
