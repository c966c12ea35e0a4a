"""What a benchmark ran on: the machine and the code, as the README's Performance section states them.

Figures mean little without the CPU model and core count, memory, OS, Python and torch
versions, the GPUs and their driver, and the exact commit (and whether the working tree
differed from it). ``describe()`` collects these once, at the start of a run. Every probe
falls back to 'unknown' (or no GPUs) instead of raising: a missing ``git`` binary or
NVML library must not cost a benchmark run its results.

GPUs are listed through NVML (``pynvml``, from ``nvidia-ml-py``) rather than
``torch.cuda``: asking torch for a device's name initialises CUDA in this process, and
sections started afterwards could no longer fork a CUDA-using child.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
UNKNOWN = "unknown"


@dataclass(kw_only=True, slots=True)
class Machine:
    date_utc: str
    """When the run started, ISO 8601 in UTC, e.g. '2026-11-23T14:03:12Z'."""
    cpu: str
    """CPU model name from /proc/cpuinfo (what the hypervisor exposes, on a VM)."""
    logical_cores: int
    usable_cores: int
    """Cores this process may run on (its CPU affinity); fewer than logical in a container."""
    ram_gib: float
    os: str
    python: str
    torch: str
    cuda: str | None
    """CUDA version torch was built with; None for a CPU-only build."""
    gpus: list[str]
    """One entry per device: name and memory, e.g. 'NVIDIA H100 80GB HBM3 (79.6 GiB)'."""
    gpu_driver: str | None
    commit: str
    """Short hash of HEAD, or 'unknown' outside a git checkout."""
    dirty: bool
    """True when tracked or untracked (not ignored) files differ from the commit."""


def describe(repo: Path = REPO) -> Machine:
    """The machine this process runs on and the state of the checkout at ``repo``."""
    gpus, driver = gpu_devices()
    commit, dirty = git_state(repo)
    return Machine(
        date_utc=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        cpu=cpu_model(), logical_cores=os.cpu_count() or 1, usable_cores=usable_cores(),
        ram_gib=round(ram_bytes() / 2**30, 1), os=os_name(), python=platform.python_version(),
        torch=torch.__version__, cuda=torch.version.cuda, gpus=gpus, gpu_driver=driver,
        commit=commit, dirty=dirty)


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The first 'model name' in ``cpuinfo``; the platform's processor name elsewhere."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or UNKNOWN


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ram_bytes() -> int:
    """Physical memory of the machine (0 when the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def os_name() -> str:
    """Distribution (when known) plus kernel, e.g. 'Debian GNU/Linux 12 (bookworm), Linux 6.1.0 x86_64'."""
    kernel = f"{platform.system()} {platform.release()} {platform.machine()}".strip()
    try:
        distro = platform.freedesktop_os_release().get("PRETTY_NAME", "")
    except OSError:
        distro = ""
    return f"{distro}, {kernel}" if distro else kernel


def gpu_devices() -> tuple[list[str], str | None]:
    """(one 'name (memory)' per NVIDIA device, driver version) from NVML; ([], None) without it."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no package, no NVML library, no driver: nothing to list
        return [], None
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30
            gpus.append(f"{_text(pynvml.nvmlDeviceGetName(handle))} ({memory:.1f} GiB)")
        return gpus, driver
    except pynvml.NVMLError:
        return [], None
    finally:
        pynvml.nvmlShutdown()


def git_state(repo: Path) -> tuple[str, bool]:
    """(short commit hash, working tree differs from it) of ``repo``; ('unknown', False) without git."""
    commit = _git(repo, "rev-parse", "--short", "HEAD")
    if commit is None:
        return UNKNOWN, False
    return commit, bool(_git(repo, "status", "--porcelain"))


def _git(repo: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _text(value: str | bytes) -> str:
    """NVML returns bytes in older pynvml releases and str in newer ones."""
    return value.decode() if isinstance(value, bytes) else value
