"""GPU figures per rank through NVML: the GPU the rank really uses, and nothing at all
(no error, no import) where there is no GPU or no working NVML."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from core.cuda_devices import nvml_device as physical_device
from runtime.gpu_stats import GpuSampler, cuda_indices


class TableNvml:
    """An NVML that answers from a table (for machines without a GPU): per physical
    index, (uuid, utilisation %, used bytes, total bytes)."""

    def __init__(self, gpus: dict[int, tuple[str, int, int, int]]) -> None:
        self.gpus = gpus
        self.inits = 0

    def nvmlInit(self):
        self.inits += 1

    def nvmlDeviceGetHandleByIndex(self, index):
        if index not in self.gpus:
            raise RuntimeError(f"NVML: no device {index}")
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return next(i for i, g in self.gpus.items() if g[0] == uuid)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=self.gpus[handle][1], memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle):
        _, _, used, total = self.gpus[handle]
        return SimpleNamespace(used=used, total=total, free=total - used)


class NoDriver:
    def nvmlInit(self):
        raise OSError("NVML Shared Library Not Found")


GPUS = {0: ("GPU-aaa", 10, 1 << 30, 80 << 30), 5: ("GPU-bbb", 0, 2 << 30, 80 << 30),
        6: ("GPU-ccc", 95, 70 << 30, 80 << 30)}


def test_a_ranks_cuda_devices_are_its_ordinals():
    assert cuda_indices(["cpu", "cuda:1", "cuda", "cuda:1", "mps"]) == [0, 1]
    assert cuda_indices(["cpu"]) == []


def test_cuda_visible_devices_maps_an_ordinal_to_what_nvml_calls_it():
    assert physical_device(1, None) == 1 and physical_device(1, "") == 1
    assert physical_device(1, "5,6") == 6
    assert physical_device(0, "GPU-ccc,GPU-aaa") == "GPU-ccc"
    with pytest.raises(LookupError, match="CUDA_VISIBLE_DEVICES"):
        physical_device(2, "5,6")


def test_a_cpu_rank_samples_nothing_and_never_starts_nvml():
    nvml = TableNvml(GPUS)
    sampler = GpuSampler(["cpu"], nvml=nvml, visible="")
    assert sampler.sample() == [] and nvml.inits == 0 and not sampler.enabled


def test_the_figures_are_of_the_gpu_the_rank_uses():
    nvml = TableNvml(GPUS)
    sampler = GpuSampler(["cpu", "cuda:1"], nvml=nvml, visible="5,6")
    assert sampler.sample() == [{"gpu": "1", "util": 0.95, "used": 70 << 30, "total": 80 << 30}]
    sampler.sample()
    assert nvml.inits == 1  # started once, not per heartbeat
    by_uuid = GpuSampler(["cuda:0"], nvml=nvml, visible="GPU-bbb")
    assert by_uuid.sample() == [{"gpu": "0", "util": 0.0, "used": 2 << 30, "total": 80 << 30}]


def test_without_a_driver_or_with_a_hidden_gpu_there_are_no_figures_and_no_error(caplog):
    with caplog.at_level(logging.INFO, logger="runtime.gpu_stats"):
        broken = GpuSampler(["cuda:0"], nvml=NoDriver(), visible="")
        assert broken.sample() == [] and broken.sample() == [] and not broken.enabled
    assert caplog.text.count("NVML is not available") == 1  # said once, not per heartbeat
    assert GpuSampler(["cuda:3"], nvml=TableNvml(GPUS), visible="0").sample() == []


def test_the_real_nvml_on_this_machine():
    """Where a GPU and its driver are present: real figures; elsewhere: none, quietly."""
    sampler = GpuSampler(["cuda:0"])
    gpus = sampler.sample()
    if not torch.cuda.is_available():
        assert isinstance(gpus, list)  # no driver here: nothing, and no exception
        return
    (gpu,) = gpus
    assert gpu["gpu"] == "0" and 0.0 <= gpu["util"] <= 1.0 and 0 < gpu["used"] <= gpu["total"]
