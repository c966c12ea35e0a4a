"""What NVML calls a process's CUDA device: one mapping for every layer that asks NVML.

torch numbers only the GPUs in ``CUDA_VISIBLE_DEVICES`` (cuda:0 is the first listed);
NVML numbers every GPU of the machine. Reading a device's memory or utilisation through
NVML (the lip-sync registry's byte budget, the ranks' GPU metrics) must map through the
variable, or a rank given GPU 3 would report GPU 0.
"""

from __future__ import annotations


class DeviceNotVisible(LookupError, ValueError):
    """The ordinal is not among ``CUDA_VISIBLE_DEVICES``, or its entry names no device."""


def nvml_device(ordinal: int, visible: str | None) -> int | str:
    """NVML's name for CUDA ordinal ``ordinal`` given ``CUDA_VISIBLE_DEVICES`` (None or
    empty: unset): an NVML index, or a 'GPU-…'/'MIG-…' UUID to look up by."""
    if visible is None or not visible.strip():
        return ordinal
    entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
    if not 0 <= ordinal < len(entries):
        raise DeviceNotVisible(f"cuda:{ordinal} is not among CUDA_VISIBLE_DEVICES={visible!r}")
    entry = entries[ordinal]
    if entry.isdigit():
        return int(entry)
    if entry.startswith(("GPU-", "MIG-")):
        return entry
    raise DeviceNotVisible(f"CUDA_VISIBLE_DEVICES entry {entry!r} is neither an index nor a full UUID")
