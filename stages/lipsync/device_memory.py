"""How many bytes a lip-sync registry may fill on its device.

A configured budget wins on any device; on a GPU without one, a share of the memory free
at start, read through NVML (no CUDA context needed; ``core.cuda_devices`` maps torch's
numbering to NVML's) or else the CUDA runtime.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from core.cuda_devices import nvml_device


def capacity_from_device(device: torch.device | str, fraction: float = 0.5, configured_bytes: int | None = None,
                         *, free_bytes: Callable[[int], int] | None = None) -> int:
    """The registry's byte budget on ``device``: ``configured_bytes`` when given (any
    device); else, on CUDA, the device's free memory now × ``fraction`` (the rest is left
    to activations, batches and other stages). A CPU (or other) device needs a configured
    value. ``free_bytes(index)`` replaces the measurement (tests; default ``gpu_free_bytes``)."""
    if configured_bytes is not None:
        if isinstance(configured_bytes, bool) or not isinstance(configured_bytes, int) or configured_bytes <= 0:
            raise ValueError(f"registry capacity_bytes must be a positive int or null, got {configured_bytes!r}")
        return configured_bytes
    if not 0 < fraction <= 1:
        raise ValueError(f"registry memory_fraction must be in (0, 1], got {fraction!r}")
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"registry on device {device}: set capacity_bytes in the config "
                         f"(free memory is only measured on CUDA devices)")
    index = device.index
    if index is None:
        index = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
    return int((free_bytes or gpu_free_bytes)(index) * fraction)


def gpu_free_bytes(index: int, probes: Sequence[Callable[[int], int]] | None = None) -> int:
    """Free memory of CUDA device ``index`` (as torch numbers devices): NVML first (no CUDA
    context needed), else ``torch.cuda.mem_get_info``; a RuntimeError names why both failed."""
    errors = []
    for probe in probes if probes is not None else (nvml_free_bytes, torch_free_bytes):
        try:
            return int(probe(index))
        except Exception as e:  # noqa: BLE001 - no package, no driver, no device: try the next probe
            errors.append(f"{getattr(probe, '__name__', 'probe')}: {type(e).__name__}: {e}")
    raise RuntimeError(f"free memory of cuda:{index} unknown ({'; '.join(errors)}); "
                       f"set the registry's capacity_bytes in the config")


def nvml_free_bytes(index: int) -> int:
    """Free bytes of torch's CUDA device ``index`` according to NVML (``nvidia-ml-py``)."""
    import pynvml

    target = nvml_device(index, os.environ.get("CUDA_VISIBLE_DEVICES"))
    pynvml.nvmlInit()
    try:
        if isinstance(target, int):
            handle = pynvml.nvmlDeviceGetHandleByIndex(target)
        else:
            handle = pynvml.nvmlDeviceGetHandleByUUID(target)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
    finally:
        pynvml.nvmlShutdown()


def torch_free_bytes(index: int) -> int:
    """Free bytes of CUDA device ``index`` according to the CUDA runtime (creates a context)."""
    free, _total = torch.cuda.mem_get_info(index)
    return int(free)
