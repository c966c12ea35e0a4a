"""Where a TCP link's reader listens: this node's address for other nodes
(comms.node_address), by GLOO_SOCKET_IFNAME, else the route to MASTER_ADDR, else the
host name; a clear error where none of them gives one."""

from __future__ import annotations

import socket

import pytest

from comms import node_address as na
from comms.errors import TransportError


def test_the_interface_gloo_is_told_to_use_comes_first():
    assert na.node_address({"GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "10.9.9.9"}) == "127.0.0.1"
    assert na.node_address({"GLOO_SOCKET_IFNAME": "lo,eth7"}) == "127.0.0.1"  # the first of a list


def test_an_interface_without_an_address_is_named_in_the_error():
    with pytest.raises(TransportError, match="GLOO_SOCKET_IFNAME='nosuch0'"):
        na.node_address({"GLOO_SOCKET_IFNAME": "nosuch0"})


def test_else_the_source_address_of_the_route_to_the_master():
    assert na.node_address({"MASTER_ADDR": "127.0.0.1"}) == "127.0.0.1"
    assert na.route_source("127.0.0.5") == "127.0.0.1"  # loopback's source for any 127/8 address


def test_a_host_name_that_resolves_only_to_loopback_is_refused_with_what_to_set(monkeypatch):
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")
    with pytest.raises(TransportError, match="set GLOO_SOCKET_IFNAME"):
        na.node_address({})


def test_a_host_name_with_a_real_address_is_used_when_nothing_else_is_set(monkeypatch):
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "192.0.2.7")
    assert na.node_address({}) == "192.0.2.7"


def test_an_unresolvable_master_falls_back_to_the_host_name(monkeypatch):
    def unresolvable(destination):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(na, "route_source", unresolvable)
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "192.0.2.7")
    assert na.node_address({"MASTER_ADDR": "no.such.host.invalid"}) == "192.0.2.7"
