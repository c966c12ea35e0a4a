"""The lip-sync registry's byte budget: configured, or measured on the GPU; and the NVML
numbering it (and the ranks' GPU metrics) read devices by."""

from __future__ import annotations

import pytest
import torch

from core.cuda_devices import nvml_device
from stages.lipsync.device_memory import capacity_from_device, gpu_free_bytes


def test_capacity_from_configuration_or_measured_free_memory():
    assert capacity_from_device("cpu", configured_bytes=5_000_000) == 5_000_000
    assert capacity_from_device("cuda:1", 0.9, 123) == 123  # configured wins on any device
    with pytest.raises(ValueError, match="device cpu: set capacity_bytes in the config"):
        capacity_from_device("cpu", 0.5)
    asked = []
    free = capacity_from_device(torch.device("cuda", 1), 0.25, None,
                                free_bytes=lambda index: asked.append(index) or 8_000_000)
    assert free == 2_000_000 and asked == [1]
    with pytest.raises(ValueError, match="memory_fraction must be in"):
        capacity_from_device("cuda:0", 1.5, free_bytes=lambda index: 1)
    with pytest.raises(ValueError, match="positive int"):
        capacity_from_device("cpu", configured_bytes=-1)


def test_free_memory_probes_fall_back_in_order_and_name_every_failure():
    def nvml_probe(index):
        raise RuntimeError("NVML Shared Library Not Found")

    assert gpu_free_bytes(2, probes=(nvml_probe, lambda index: 4096 + index)) == 4098
    with pytest.raises(RuntimeError, match="NVML Shared Library Not Found.*set the registry's capacity_bytes"):
        gpu_free_bytes(3, probes=(nvml_probe,))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_free_memory_without_a_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="free memory of cuda:0 unknown"):
        gpu_free_bytes(0)


def test_nvml_numbering_follows_cuda_visible_devices():
    assert nvml_device(1, None) == 1
    assert nvml_device(1, "3,2") == 2
    assert nvml_device(0, "GPU-8e1f2a3b-0000-1111-2222-333344445555") == "GPU-8e1f2a3b-0000-1111-2222-333344445555"
    with pytest.raises(ValueError, match="not among CUDA_VISIBLE_DEVICES"):
        nvml_device(2, "0,1")
