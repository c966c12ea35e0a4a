"""What a link is: its two ends and the transport decided for it.

The planner decides each link's transport and backend once, from where its two stages
run and the ``transport`` settings; ``comms.links.create_links`` builds what a
``LinkSpec`` says and decides nothing. This module imports no implementation, so the
implementations and ``comms.links`` can all use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch

from core.config import check, check_choice

TORCH_BACKENDS = ("gloo", "nccl")
"""What may carry a ``Transport.TORCH`` link's payloads (headers and credits always use gloo)."""


class Transport(StrEnum):
    """How a link's messages travel."""

    IN_PROCESS = "in-process"
    """Both stages on one rank: a bounded queue, messages passed by reference."""
    SAME_HOST = "same-host"
    """Two ranks of one host (one torchrun node): frames over a Unix socket, payloads
    through shared memory."""
    TCP = "tcp"
    """Two ranks on different hosts whose payloads are CPU tensors: frames and payloads
    over one TCP connection, on the caller's thread (``comms.socket_link``)."""
    TORCH = "torch"
    """Any two ranks: torch.distributed point-to-point sends, payloads on ``backend``."""


@dataclass(kw_only=True, slots=True, frozen=True)
class LinkSpec:
    """One directed link; every rank passes the same list to ``create_links``."""

    name: str
    """Unique link name, the key of ``create_links``' result."""
    src_rank: int
    """Global rank that sends."""
    dst_rank: int
    """Global rank that receives; the same as ``src_rank`` exactly for IN_PROCESS."""
    transport: Transport
    backend: str | None = None
    """TORCH only, and required there: 'gloo' or 'nccl' (CUDA devices at both ends)."""
    src_device: str = "cpu"
    """Device of the sending stage ('cpu', 'cuda', 'cuda:1')."""
    dst_device: str = "cpu"
    """Device of the receiving stage; received tensors are placed there."""

    def __post_init__(self) -> None:
        check(isinstance(self.name, str) and bool(self.name), "name", f"must be a non-empty string, got {self.name!r}")
        ranks_valid = True
        for field_name in ("src_rank", "dst_rank"):
            value = getattr(self, field_name)
            ranks_valid &= check(isinstance(value, int) and not isinstance(value, bool) and value >= 0, field_name,
                                 f"must be an integer >= 0, got {value!r}")
        devices = {field_name: _device_type(getattr(self, field_name)) for field_name in ("src_device", "dst_device")}
        for field_name, device_type in devices.items():
            check(device_type in ("cpu", "cuda"), field_name,
                  f"must be 'cpu' or a CUDA device like 'cuda:0', got {getattr(self, field_name)!r}")
        if not check(isinstance(self.transport, Transport), "transport",
                     f"got {self.transport!r}; allowed: {', '.join(repr(t.value) for t in Transport)} "
                     "(a Transport)"):
            return
        if ranks_valid:
            same_rank = self.src_rank == self.dst_rank
            if self.transport == Transport.IN_PROCESS:
                check(same_rank, "dst_rank", f"must equal src_rank ({self.src_rank}) for an in-process link, "
                                             f"got {self.dst_rank}")
            else:
                check(not same_rank, "dst_rank", f"must differ from src_rank ({self.src_rank}) for a "
                                                 f"{self.transport} link; use in-process within a rank")
        if self.transport != Transport.TORCH:
            check(self.backend is None, "backend", f"only torch links have a backend, got {self.backend!r} "
                                                   f"on a {self.transport} link")
        elif check_choice(self.backend, "backend", TORCH_BACKENDS) and self.backend == "nccl":
            check(set(devices.values()) == {"cuda"}, "backend",
                  f"'nccl' needs CUDA devices at both ends, got {self.src_device} -> {self.dst_device}")


def _device_type(value: object) -> str | None:
    """'cpu' or 'cuda' for a device string, None for anything else."""
    try:
        return torch.device(value).type
    except (RuntimeError, TypeError):
        return None
