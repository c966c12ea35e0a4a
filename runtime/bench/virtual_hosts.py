"""Hosts made of Linux network namespaces, for multi-host tests and benchmarks on one machine.

Each "host" is a network namespace with its own address on a virtual Ethernet (veth)
interface, so traffic between two of them crosses a real network device and the
kernel's TCP stack, not loopback. Two shapes:

* ``veth_pair()``: two namespaces joined by one veth pair (the shortest real path,
  what the transport benchmark and the two-host pipeline test use);
* ``bridged_hosts(n)``: ``n`` namespaces, each with a veth into a bridge in the root
  namespace, which holds the bridge's own address: a small cluster whose head (e.g. a
  SLURM controller, a test's browser) lives in the root namespace.

Needs root and iproute2; ``unavailable_reason()`` says why not when they are missing, so
callers can skip with that reason. Names and subnets are random per call so concurrent
runs do not collide; everything made is removed on exit, also after a failure.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

_IP_TIMEOUT_S = 20


class VirtualHostsUnavailable(RuntimeError):
    """Namespaces could not be made here (not root, no iproute2, or the kernel refused)."""


@dataclass(frozen=True, slots=True)
class Host:
    namespace: str
    interface: str
    """The host's veth end inside its namespace, ``eth0`` on every host (so one
    ``GLOO_SOCKET_IFNAME=eth0`` suits them all, as on a cluster of alike machines)."""
    address: str

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside this host's network namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    @property
    def netns_path(self) -> str:
        """For ``nsenter --net=...`` (which, unlike ``ip netns exec``, leaves /sys alone)."""
        return f"/run/netns/{self.namespace}"


@dataclass(frozen=True, slots=True)
class Bridge:
    name: str
    address: str
    """The root namespace's address on the bridge: how the hosts reach this machine."""
    hosts: tuple[Host, ...]


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (the ip command)"
    return None


def _ip(*args: str) -> None:
    try:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=_IP_TIMEOUT_S)
    except subprocess.CalledProcessError as e:
        raise VirtualHostsUnavailable(f"ip {' '.join(args)}: {e.stderr.strip()}") from None


def _tag() -> str:
    return f"{os.getpid() % 10000}{random.randint(0, 999)}"


def _subnet() -> str:
    return f"10.{random.randint(100, 199)}.{random.randint(0, 255)}"


INTERFACE = "eth0"


def _add_host(namespace: str, veth: str, address: str) -> Host:
    """Move the veth end ``veth`` into ``namespace`` as ``eth0`` and bring it and loopback
    up there. (Made in the root namespace, the ends need unique names at first.)"""
    _ip("link", "set", veth, "netns", namespace)
    _ip("-n", namespace, "link", "set", veth, "name", INTERFACE)
    _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", INTERFACE)
    _ip("-n", namespace, "link", "set", INTERFACE, "up")
    _ip("-n", namespace, "link", "set", "lo", "up")
    return Host(namespace, INTERFACE, address)


@contextmanager
def veth_pair() -> Iterator[tuple[Host, Host]]:
    """Two hosts, ``.1`` and ``.2`` of a random 10.x.y.0/24, joined by one veth pair."""
    if reason := unavailable_reason():
        raise VirtualHostsUnavailable(reason)
    tag, net = _tag(), _subnet()
    names = [(f"mm{tag}a", f"mv{tag}a", f"{net}.1"), (f"mm{tag}b", f"mv{tag}b", f"{net}.2")]
    made: list[str] = []
    try:
        for namespace, _, _ in names:
            _ip("netns", "add", namespace)
            made.append(namespace)
        _ip("link", "add", names[0][1], "type", "veth", "peer", "name", names[1][1])
        yield tuple(_add_host(*name) for name in names)
    finally:
        for namespace in made:  # deleting a namespace deletes the veth end inside it
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=_IP_TIMEOUT_S)


@contextmanager
def bridged_hosts(count: int) -> Iterator[Bridge]:
    """``count`` hosts at ``.11``, ``.12``, ... of a random 10.x.y.0/24, each on a veth into
    a bridge at ``.1`` in the root namespace."""
    if reason := unavailable_reason():
        raise VirtualHostsUnavailable(reason)
    tag, net = _tag(), _subnet()
    bridge = f"mb{tag}"
    made: list[str] = []
    bridge_made = False
    try:
        _ip("link", "add", bridge, "type", "bridge")
        bridge_made = True
        _ip("addr", "add", f"{net}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        hosts = []
        for i in range(count):
            namespace, inside, outside = f"mm{tag}n{i}", f"mv{tag}n{i}", f"mr{tag}n{i}"
            _ip("netns", "add", namespace)
            made.append(namespace)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", outside, "master", bridge)
            _ip("link", "set", outside, "up")
            hosts.append(_add_host(namespace, inside, f"{net}.{11 + i}"))
        yield Bridge(bridge, f"{net}.1", tuple(hosts))
    finally:
        for namespace in made:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=_IP_TIMEOUT_S)
        if bridge_made:
            subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=_IP_TIMEOUT_S)
