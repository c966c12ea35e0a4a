"""GPU utilisation and memory of the GPUs a rank computes on, through NVML (``pynvml``).

Each rank samples its own GPUs when it builds a heartbeat snapshot, so rank 0's
/metrics shows every rank's GPUs without rank 0 needing to see them. It costs a few
NVML calls (microseconds) per heartbeat.

Without a GPU, without ``pynvml`` (``nvidia-ml-py``), or when NVML cannot start (no
driver, a container without the device), ``GpuSampler.sample`` returns an empty list and
logs why once: metrics are advisory and never stop a rank.

Which GPU: a rank's device is ``cuda:N`` in the numbering CUDA gives the process, which
``CUDA_VISIBLE_DEVICES`` may remap; NVML numbers the physical devices. The sampler
follows the mapping (indices or ``GPU-...`` UUIDs) so the figures are of the GPU the
rank really uses.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from core.cuda_devices import nvml_device

log = logging.getLogger(__name__)


def cuda_indices(devices: list[str]) -> list[int]:
    """The distinct CUDA ordinals among ``devices`` ('cuda' counts as 'cuda:0'), sorted."""
    out = set()
    for device in devices:
        kind, _, index = str(device).partition(":")
        if kind == "cuda":
            out.add(int(index) if index else 0)
    return sorted(out)


class GpuSampler:
    """Samples the GPUs of ``devices`` (a rank's device strings); see the module docstring.

    ``nvml`` replaces the ``pynvml`` module (tests on machines without a GPU)."""

    def __init__(self, devices: list[str], nvml: Any = None, visible: str | None = None) -> None:
        self.ordinals = cuda_indices(devices)
        self._nvml = nvml
        self._visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
        self._handles: list[tuple[str, Any]] | None = None
        """(label, NVML handle) per GPU once NVML started; [] when it cannot."""
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.ordinals) and self._handles != []

    def sample(self) -> list[dict[str, Any]]:
        """``[{"gpu": "0", "util": 0.0..1.0, "used": bytes, "total": bytes}]`` per GPU;
        ``gpu`` is the rank's CUDA ordinal. Empty without GPUs or NVML."""
        if not self.ordinals:
            return []
        with self._lock:
            if self._handles is None:
                self._handles = self._open()
            handles = self._handles
        out = []
        for label, handle in handles:
            try:
                util = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception as e:  # a GPU that fell off the bus must not stop heartbeats
                log.debug("NVML could not read cuda:%s: %s", label, e)
                continue
            out.append({"gpu": label, "util": round(float(util.gpu) / 100.0, 4),
                        "used": int(memory.used), "total": int(memory.total)})
        return out

    def _open(self) -> list[tuple[str, Any]]:
        try:
            if self._nvml is None:
                import pynvml
                self._nvml = pynvml
            self._nvml.nvmlInit()
        except Exception as e:  # ImportError, NVMLError (no driver), OSError (no library)
            log.info("no GPU metrics on this rank: NVML is not available (%s)", e)
            return []
        handles = []
        for ordinal in self.ordinals:
            try:
                device = nvml_device(ordinal, self._visible)
                if isinstance(device, int):
                    handle = self._nvml.nvmlDeviceGetHandleByIndex(device)
                else:
                    handle = self._nvml.nvmlDeviceGetHandleByUUID(device)
            except Exception as e:
                log.info("no GPU metrics for cuda:%d: %s", ordinal, e)
                continue
            handles.append((str(ordinal), handle))
        return handles
