"""CPU and GPU use while a benchmark run measures, sampled on a background thread.

    monitor = SysMonitor(job.pids)          # re-asked every sample: torchrun's ranks appear late
    monitor.start()
    ... run the client ...
    monitor.stop()
    usage = monitor.summary(since, until)   # only the samples inside the measured window

Per sample:

- ``job_cpu_pct``: CPU time the job's processes (the launcher and everything under it)
  used since the previous sample, as % of one core (200 = two cores busy). It comes from
  each process's own user+system times, so processes that start or exit between samples
  count for what they used while seen;
- ``job_machine_pct``: the same as % of all the machine's cores;
- ``system_cpu_pct``: the whole machine, as % of all its cores;
- ``other_cpu_pct``: the part of that which was neither the job nor this process (the
  benchmark client): other programs competing for the cores, which no figure of the run
  should be blamed on;
- ``gpu_util_pct`` / ``gpu_mem_mb``: through NVML, summed memory and the busiest device's
  utilisation, only when a GPU is present (``gpu_skip`` says why not otherwise).

If taking a sample raises, sampling stops and the error is kept (``SysMonitor.error``,
``Usage.sampling_error``): figures from the samples before it would otherwise pass for
the whole window's, with nothing to say why they are few or missing.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil

from runtime.bench.stats import summarize

log = logging.getLogger(__name__)

FIGURES = ("job_cpu_pct", "job_machine_pct", "system_cpu_pct", "other_cpu_pct", "gpu_util_pct", "gpu_mem_mb")


@dataclass(kw_only=True, slots=True)
class Sample:
    at: float
    """``time.monotonic()`` at the end of the interval this sample covers."""
    job_cpu_pct: float
    job_machine_pct: float
    system_cpu_pct: float
    other_cpu_pct: float
    gpu_util_pct: float | None = None
    gpu_mem_mb: float | None = None


@dataclass(kw_only=True, slots=True)
class Usage:
    """Mean and max of each figure over the samples of a window (NaN-free: a figure with
    no samples is left out)."""

    samples: int
    mean: dict[str, float] = field(default_factory=dict)
    max: dict[str, float] = field(default_factory=dict)
    gpu_skip: str | None = None
    """Why there are no GPU figures (no NVML, no device); None when there are."""
    sampling_error: str | None = None
    """The error that stopped sampling early; None when it ran until ``stop()``."""


class _Gpus:
    """NVML handles for every device, or the reason there are none."""

    def __init__(self) -> None:
        self.handles: list = []
        self.skip: str | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._nvml = pynvml
        except Exception as e:  # no package, no driver, no device: all mean "no GPU figures"
            self.skip = f"no GPU figures: NVML unavailable ({type(e).__name__}: {e})"
            return
        if not self.handles:
            self.skip = "no GPU figures: NVML sees no device"

    def read(self) -> tuple[float, float] | tuple[None, None]:
        """(busiest device's utilisation %, memory used in MB summed over devices)."""
        if not self.handles:
            return None, None
        util = max(self._nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles)
        mem = sum(self._nvml.nvmlDeviceGetMemoryInfo(h).used for h in self.handles) / 2**20
        return float(util), float(mem)

    def close(self) -> None:
        if self.handles:
            self._nvml.nvmlShutdown()


class SysMonitor:
    """Samples every ``interval_s`` between ``start()`` and ``stop()``."""

    def __init__(self, pids: Callable[[], list[int]], interval_s: float = 0.25) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._pids = pids
        self.interval_s = interval_s
        self.cores = psutil.cpu_count() or 1
        self.samples: list[Sample] = []
        self._procs: dict[int, psutil.Process] = {}
        self._cpu_seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gpus: _Gpus | None = None
        self._me = psutil.Process()
        self._my_cpu = 0.0
        self.error: str | None = None
        """The error that stopped sampling early (set by the sampler thread); None otherwise."""

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("SysMonitor.start() called twice")
        self._gpus = _Gpus()
        psutil.cpu_percent(None)  # the first call only sets the reference point
        self._job_cpu_seconds(baseline=True)
        self._my_cpu_seconds()
        self._thread = threading.Thread(target=self._run, name="bench-sysmon", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        if self._gpus is not None:
            self._gpus.close()

    def __enter__(self) -> "SysMonitor":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def summary(self, since: float = float("-inf"), until: float = float("inf")) -> Usage:
        """Mean and max over the samples whose interval ended within [since, until]."""
        chosen = [s for s in self.samples if since <= s.at <= until]
        usage = Usage(samples=len(chosen), gpu_skip=self._gpus.skip if self._gpus else "not started",
                      sampling_error=self.error)
        for name in FIGURES:
            values = [getattr(s, name) for s in chosen if getattr(s, name) is not None]
            if values:
                figures = summarize(values)
                usage.mean[name], usage.max[name] = figures["mean"], figures["max"]
        return usage

    def _run(self) -> None:
        """The sampler thread: samples until stopped or until taking one raises."""
        try:
            self._sample_until_stopped()
        except Exception as e:  # an exception would otherwise end the thread unseen
            log.error("CPU/GPU sampling stopped", exc_info=e)
            self.error = f"{type(e).__name__}: {e}"

    def _sample_until_stopped(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            job_pct = 100.0 * self._job_cpu_seconds() / (now - last)
            my_pct = 100.0 * self._my_cpu_seconds() / (now - last)
            system = psutil.cpu_percent(None)
            util, mem = self._gpus.read()
            self.samples.append(Sample(
                at=now, job_cpu_pct=job_pct, job_machine_pct=job_pct / self.cores, system_cpu_pct=system,
                other_cpu_pct=max(0.0, system - (job_pct + my_pct) / self.cores),
                gpu_util_pct=util, gpu_mem_mb=mem))
            last = now

    def _my_cpu_seconds(self) -> float:
        """CPU seconds this process (the benchmark and its client) used since the previous call."""
        times = self._me.cpu_times()
        total = times.user + times.system
        used, self._my_cpu = total - self._my_cpu, total
        return used

    def _job_cpu_seconds(self, baseline: bool = False) -> float:
        """CPU seconds the job's processes used since the previous call. ``baseline``: only
        note where each process stands. A process first seen later counts from its start:
        it started after the previous call (or it would have been seen then)."""
        used = 0.0
        for pid in self._pids():
            if pid not in self._procs:
                try:
                    self._procs[pid] = psutil.Process(pid)
                except psutil.NoSuchProcess:
                    continue
        for pid, proc in list(self._procs.items()):
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                del self._procs[pid]  # what it used since the last sample is lost with it
                continue
            total = times.user + times.system
            used += total - self._cpu_seen.get(pid, total if baseline else 0.0)
            self._cpu_seen[pid] = total
        return used
