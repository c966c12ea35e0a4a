"""The address this rank's node is reached at by other nodes, for the links it listens on.

Gloo picks its own address from ``GLOO_SOCKET_IFNAME`` (or the host name); a link that
listens for a peer on another node must be reachable the same way, so the rule is the
same where gloo has one, and falls back to what routing says otherwise:

1. ``GLOO_SOCKET_IFNAME`` names an interface (the first of a comma-separated list): its
   IPv4 address, as gloo would use;
2. else the source address of the route to ``MASTER_ADDR`` (torchrun sets it to the
   rendezvous host, which every node reaches): the interface that reaches the other nodes;
3. else the host name's address, when it is not a loopback one.

A node whose address cannot be found this way gets a ``TransportError`` that says to set
``GLOO_SOCKET_IFNAME``, rather than a link that listens where nobody can connect.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct

from comms.errors import TransportError

_SIOCGIFADDR = 0x8915
"""Linux ioctl: an interface's IPv4 address."""


def interface_address(name: str) -> str:
    """The IPv4 address of interface ``name`` (TransportError if it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            reply = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError as e:
            raise TransportError(f"GLOO_SOCKET_IFNAME={name!r}: no IPv4 address on that interface ({e.strerror})") \
                from None
    return socket.inet_ntoa(reply[20:24])


def route_source(destination: str) -> str:
    """The local address the kernel would send from to reach ``destination`` (no packet
    is sent: connecting a UDP socket only picks the route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((socket.gethostbyname(destination), 9))
        return probe.getsockname()[0]


def node_address(environ: os._Environ | dict = os.environ) -> str:
    """This node's address for other nodes, by the rule in the module docstring."""
    interfaces = environ.get("GLOO_SOCKET_IFNAME", "")
    if interfaces.strip():
        return interface_address(interfaces.split(",")[0].strip())
    master = environ.get("MASTER_ADDR", "").strip()
    if master:
        try:
            return route_source(master)
        except OSError:
            pass  # an unresolvable MASTER_ADDR: the host name may still do
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        address = ""
    if address and not ipaddress.ip_address(address).is_loopback:
        return address
    raise TransportError("cannot tell this node's address for links to other nodes: set GLOO_SOCKET_IFNAME "
                         "to the interface the nodes reach each other on (e.g. GLOO_SOCKET_IFNAME=eth0)")
