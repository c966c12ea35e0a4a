"""Building the links a plan declares: each rank gets the ends it owns.

The planner has decided every link's transport and backend (``LinkSpec``); this module
builds what the specs say:

* ``IN_PROCESS``: both ends on the rank, sharing one bounded queue; no torch.distributed.
* ``SAME_HOST``: a Unix socket pair with payloads in shared memory, connected pairwise
  (the two ranks of the link only).
* ``TCP``: one TCP connection between two hosts, connected pairwise the same way.
* ``TORCH``: three process groups of its own per link (``comms.torch_p2p``,
  ``comms.torch_reader``), made with
  ``torch.distributed.new_group``, which every rank must call for every group in the
  same order.

So ``create_links`` is collective as soon as one link crosses ranks: every rank calls
it with the same list of specs, in the same order. (``LinkSpec`` and ``Transport`` live
in ``comms.link_spec``, which the implementations import too; they can be imported from
here as well.)
"""

from __future__ import annotations

import logging
import secrets
import socket
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from comms.channel import ChannelReader, ChannelWriter
from comms.config import TransportConfig
from comms.errors import TransportError
from comms.inprocess import inprocess_link
from comms.link_spec import LinkSpec, Transport
from comms.node_address import node_address
from comms.socket_link import SocketWriter
from comms.socket_reader import SocketReader
from comms.torch_p2p import TorchWriter
from comms.torch_reader import TorchReader

log = logging.getLogger(__name__)

_NAME_BYTES = 64
"""Room for a socket link's address (a socket name, or host:port) as it travels to the writer."""
_SOCKET_TRANSPORTS = (Transport.SAME_HOST, Transport.TCP)


@dataclass(slots=True)
class LinkEnds:
    """This rank's ends of the links, by link name (an in-process link has both here)."""

    writers: dict[str, ChannelWriter] = field(default_factory=dict)
    readers: dict[str, ChannelReader] = field(default_factory=dict)


def create_links(specs: list[LinkSpec], config: TransportConfig | None = None) -> LinkEnds:
    """Set up every link in ``specs`` and return the ends this rank owns. Collective when
    any link crosses ranks (all ranks, same ``specs``, same order); with in-process links
    only it needs no torch.distributed, and this process counts as rank 0 of 1."""
    config = config or TransportConfig()
    distributed = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    _check(specs, world, distributed)
    ends = LinkEnds()
    init_timeout = timedelta(seconds=config.init_timeout_s)
    for spec in specs:
        mine = rank in (spec.src_rank, spec.dst_rank)
        if spec.transport == Transport.IN_PROCESS and mine:
            ends.writers[spec.name], ends.readers[spec.name] = inprocess_link(spec.name, config.link_capacity)
        elif spec.transport == Transport.TORCH:
            ranks = [spec.src_rank, spec.dst_rank]
            groups = dict(meta=dist.new_group(ranks, backend="gloo", timeout=init_timeout),
                          data=dist.new_group(ranks, backend=spec.backend, timeout=init_timeout),
                          credit=dist.new_group(ranks, backend="gloo", timeout=init_timeout))
            if rank == spec.src_rank:
                ends.writers[spec.name] = TorchWriter(spec, **groups, config=config)
            elif rank == spec.dst_rank:
                ends.readers[spec.name] = TorchReader(spec, **groups, config=config)
            if mine:
                log.debug("link %r: rank %d -> %d, payloads on %s", spec.name, spec.src_rank, spec.dst_rank,
                          spec.backend)
    for spec in specs:
        # Pairwise and in the same order on every rank, after every process group
        # exists: each connect waits only for the other end of this link, which has
        # finished every earlier one (no deadlock).
        if spec.transport in _SOCKET_TRANSPORTS and rank in (spec.src_rank, spec.dst_rank):
            if rank == spec.src_rank:
                ends.writers[spec.name] = connect_writer(spec, config)
            else:
                ends.readers[spec.name] = connect_reader(spec, config)
            log.debug("link %r: rank %d -> %d, %s", spec.name, spec.src_rank, spec.dst_rank,
                      "TCP" if spec.transport == Transport.TCP else "same host: Unix socket + shared memory")
    return ends


def _check(specs: list[LinkSpec], world: int, distributed: bool) -> None:
    names = set()
    for i, spec in enumerate(specs):
        if not isinstance(spec, LinkSpec):
            raise TransportError(f"specs[{i}]: expected a LinkSpec, got {type(spec).__name__}")
        if spec.name in names:
            raise TransportError(f"specs[{i}]: duplicate link name {spec.name!r}")
        names.add(spec.name)
        if spec.transport != Transport.IN_PROCESS and not distributed:
            raise TransportError(f"link {spec.name!r}: a {spec.transport} link needs torch.distributed "
                                 "initialised (init_process_group) first")
        if max(spec.src_rank, spec.dst_rank) >= world:
            raise TransportError(f"link {spec.name!r}: ranks {spec.src_rank} -> {spec.dst_rank} "
                                 f"outside the world of {world}")


def connect_reader(spec: LinkSpec, config: TransportConfig) -> SocketReader:
    """The reading end of a socket link: listen, send the address to the writer (default
    process group), accept its connections: on one host two (frames, then segment
    descriptors, accepted in the order made), between hosts one."""
    tcp = spec.transport == Transport.TCP
    if tcp:
        listener = socket.create_server((node_address(), 0))
        host, port = listener.getsockname()[:2]
        address = f"{host}:{port}".encode()
    else:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = f"mindmirror-{secrets.token_hex(8)}".encode()
        listener.bind(b"\0" + address)
    with listener:
        listener.listen(2)
        name = torch.zeros(_NAME_BYTES, dtype=torch.uint8)
        name[:len(address)] = torch.frombuffer(bytearray(address), dtype=torch.uint8)
        dist.send(name, dst=spec.src_rank)
        listener.settimeout(config.init_timeout_s)
        frames, _ = listener.accept()
        descriptors = None if tcp else listener.accept()[0]
    if tcp:
        _no_delay(frames)
    return SocketReader(spec, frames, descriptors, config)


def connect_writer(spec: LinkSpec, config: TransportConfig) -> SocketWriter:
    """The writing end of a socket link: connect to the address the reader sent (twice on
    one host: frames, then segment descriptors)."""
    name = torch.zeros(_NAME_BYTES, dtype=torch.uint8)
    dist.recv(name, src=spec.dst_rank)
    address = bytes(name.numpy()).rstrip(b"\0")
    if spec.transport == Transport.TCP:
        host, port = address.decode().rsplit(":", 1)
        frames = socket.create_connection((host, int(port)), timeout=config.init_timeout_s)
        _no_delay(frames)
        return SocketWriter(spec, frames, None, config)
    connections = []
    for _ in range(2):
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.settimeout(config.init_timeout_s)
        connection.connect(b"\0" + address)
        connections.append(connection)
    return SocketWriter(spec, *connections, config)


def _no_delay(sock: socket.socket) -> None:
    """Frames leave at once: a small frame must not wait for the previous one's ACK (Nagle)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
