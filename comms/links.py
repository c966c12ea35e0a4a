"""Declaring the links between ranks and setting them up.

``create_links`` is collective: every rank calls it with the same list of
``LinkSpec``s, in the same order, because ``torch.distributed.new_group`` must be
called by all ranks. Each rank gets back the channel ends it owns: a ``SocketChannel``
for a link within one host (``is_local``), a ``TorchChannel`` otherwise.
"""

from __future__ import annotations

import logging
import secrets
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from comms.config import TransportConfig
from comms.channel import Channel
from comms.errors import TransportError
from comms.local_link import SocketChannel
from comms.torch_p2p import TorchChannel
from runtime.config_loader import check

log = logging.getLogger(__name__)

_NAME_BYTES = 64
"""Room for a same-host link's socket name as it travels to the sender."""


@dataclass(kw_only=True, slots=True, frozen=True)
class LinkSpec:
    """One directed link between two ranks; every rank passes the same list."""

    name: str
    """Unique link name, the key of ``create_links``' result."""
    src_rank: int
    """Global rank that sends."""
    dst_rank: int
    """Global rank that receives; must differ from ``src_rank``."""
    src_device: str = "cpu"
    """Device of the sending stage ('cpu', 'cuda', 'cuda:1')."""
    dst_device: str = "cpu"
    """Device of the receiving stage; received tensors are placed there."""
    same_host: bool = False
    """Both ends run on one host (one torchrun node): the link may then be a
    ``SocketChannel`` with payloads in shared memory (``TransportConfig.shared_memory``)."""

    def __post_init__(self) -> None:
        check(isinstance(self.name, str) and bool(self.name), "name", f"must be a non-empty string, got {self.name!r}")
        for field_name in ("src_rank", "dst_rank"):
            value = getattr(self, field_name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 0, field_name,
                  f"must be an integer >= 0, got {value!r}")
        check(self.src_rank != self.dst_rank, "dst_rank",
              f"must differ from src_rank ({self.src_rank}); use InProcessChannel within a rank")
        for field_name in ("src_device", "dst_device"):
            value = getattr(self, field_name)
            try:
                device = torch.device(value)
            except (RuntimeError, TypeError):
                device = None
            check(device is not None and device.type in ("cpu", "cuda"), field_name,
                  f"must be 'cpu' or a CUDA device like 'cuda:0', got {value!r}")


def data_backend_for(spec: LinkSpec, config: TransportConfig) -> str:
    """The backend that carries ``spec``'s payloads under ``config``."""
    both_cuda = torch.device(spec.src_device).type == "cuda" and torch.device(spec.dst_device).type == "cuda"
    if config.backend == "nccl":
        check(both_cuda, "backend", f"'nccl' needs CUDA devices at both ends, link {spec.name!r} has "
                                    f"{spec.src_device} -> {spec.dst_device}; allowed: 'auto', 'gloo'")
        return "nccl"
    return "nccl" if config.backend == "auto" and both_cuda else "gloo"


def is_local(spec: LinkSpec, config: TransportConfig) -> bool:
    """Whether ``spec`` becomes a ``SocketChannel`` (Unix socket + shared memory) rather
    than a ``TorchChannel``: both ends on one host, CPU payloads, and allowed by config."""
    return (spec.same_host and config.shared_memory and sys.platform == "linux"
            and data_backend_for(spec, config) == "gloo")


def create_links(specs: list[LinkSpec], config: TransportConfig | None = None) -> dict[str, Channel]:
    """Set up every link (collective: all ranks, same ``specs``, same order) and return
    the channels this rank is an end of, by link name. Same-host links become
    ``SocketChannel``s (see ``is_local``); the others ``TorchChannel``s, each with three
    process groups of its own."""
    if not dist.is_available() or not dist.is_initialized():
        raise TransportError("create_links needs torch.distributed initialised (init_process_group) first")
    config = config or TransportConfig()
    world, rank = dist.get_world_size(), dist.get_rank()
    names = set()
    for i, spec in enumerate(specs):
        if not isinstance(spec, LinkSpec):
            raise TransportError(f"specs[{i}]: expected a LinkSpec, got {type(spec).__name__}")
        if spec.name in names:
            raise TransportError(f"specs[{i}]: duplicate link name {spec.name!r}")
        names.add(spec.name)
        if max(spec.src_rank, spec.dst_rank) >= world:
            raise TransportError(f"link {spec.name!r}: ranks {spec.src_rank} -> {spec.dst_rank} "
                                 f"outside the world of {world}")
    init_timeout = timedelta(seconds=config.init_timeout_s)
    channels = {}
    for spec in specs:
        if is_local(spec, config):
            continue  # connected below, after every process group exists
        backend = data_backend_for(spec, config)
        ranks = [spec.src_rank, spec.dst_rank]
        meta = dist.new_group(ranks, backend="gloo", timeout=init_timeout)
        data = dist.new_group(ranks, backend=backend, timeout=init_timeout)
        credit = dist.new_group(ranks, backend="gloo", timeout=init_timeout)
        if rank in ranks:
            channels[spec.name] = TorchChannel(spec, rank=rank, meta=meta, data=data, credit=credit,
                                               data_backend=backend, config=config)
            log.debug("link %r: rank %d -> %d, payloads on %s", spec.name, spec.src_rank, spec.dst_rank, backend)
    for spec in specs:
        # Pairwise and in the same order on every rank: each connect waits only for the
        # other end of this link, which has finished every earlier one (no deadlock).
        if is_local(spec, config) and rank in (spec.src_rank, spec.dst_rank):
            channels[spec.name] = connect_local(spec, rank, config)
            log.debug("link %r: rank %d -> %d, same host: Unix socket + shared memory",
                      spec.name, spec.src_rank, spec.dst_rank)
    return channels


def connect_local(spec: LinkSpec, rank: int, config: TransportConfig) -> SocketChannel:
    """This rank's end of ``spec``; both ends call it at the same point of link setup.
    Two connections: frames, then segment descriptors (accepted in the order made)."""
    name = torch.zeros(_NAME_BYTES, dtype=torch.uint8)
    if rank == spec.dst_rank:
        token = f"mindmirror-{secrets.token_hex(8)}".encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(b"\0" + token)
            listener.listen(2)
            name[:len(token)] = torch.frombuffer(bytearray(token), dtype=torch.uint8)
            dist.send(name, dst=spec.src_rank)
            listener.settimeout(config.init_timeout_s)
            frames, _ = listener.accept()
            descriptors, _ = listener.accept()
        return SocketChannel(spec, frames, descriptors, is_sender=False, config=config)
    dist.recv(name, src=spec.dst_rank)
    address = b"\0" + bytes(name.numpy()).rstrip(b"\0")
    ends = []
    for _ in range(2):
        end = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        end.settimeout(config.init_timeout_s)
        end.connect(address)
        ends.append(end)
    return SocketChannel(spec, *ends, is_sender=True, config=config)
