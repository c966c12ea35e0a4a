"""Declaring links (``LinkSpec``: the transport and backend the planner decided) and
building them without torch.distributed: in-process links, and the refusals of
``create_links``. Cross-rank links are built in test_torch_p2p.py and test_socket_link.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from comms.config import TransportConfig
from comms.errors import TransportError
from comms.inprocess import InProcessReader, InProcessWriter
from comms.link_spec import LinkSpec, Transport
from comms.links import LinkEnds, create_links
from comms.message import Message
from core.config import ConfigError


def spec(**changes) -> LinkSpec:
    fields = dict(name="a", src_rank=0, dst_rank=1, transport=Transport.TORCH, backend="gloo") | changes
    return LinkSpec(**fields)


def in_process(name: str, rank: int = 0) -> LinkSpec:
    return LinkSpec(name=name, src_rank=rank, dst_rank=rank, transport=Transport.IN_PROCESS)


def test_transports_are_named_as_in_configs_and_plans():
    assert [t.value for t in Transport] == ["in-process", "same-host", "tcp", "torch"]


def test_valid_specs_of_every_transport():
    assert spec().backend == "gloo"
    assert spec(backend="nccl", src_device="cuda:0", dst_device="cuda").backend == "nccl"
    assert spec(transport=Transport.SAME_HOST, backend=None, dst_device="cuda:1").transport == Transport.SAME_HOST
    assert in_process("x", rank=3).src_rank == 3


@pytest.mark.parametrize("changes, field, reason", [
    (dict(transport=Transport.IN_PROCESS, backend=None), "dst_rank", "must equal src_rank"),
    (dict(dst_rank=0), "dst_rank", "must differ from src_rank"),
    (dict(transport=Transport.SAME_HOST, backend=None, dst_rank=0), "dst_rank", "must differ from src_rank"),
    (dict(backend=None), "backend", "allowed: 'gloo', 'nccl'"),
    (dict(backend="auto"), "backend", "allowed: 'gloo', 'nccl'"),
    (dict(transport=Transport.SAME_HOST), "backend", "only torch links have a backend"),
    (dict(backend="nccl", src_device="cuda:0"), "backend", "needs CUDA devices at both ends"),
    (dict(transport="torch"), "transport", "a Transport"),
    (dict(src_device="tpu"), "src_device", "'cpu' or a CUDA device"),
    (dict(dst_rank=-1), "dst_rank", "integer >= 0"),
    (dict(src_rank=True), "src_rank", "integer >= 0"),
    (dict(name=""), "name", "non-empty"),
])
def test_invalid_specs_name_the_field_and_the_reason(changes, field, reason):
    with pytest.raises(ConfigError, match=reason) as error:
        spec(**changes)
    assert error.value.path == field


def test_in_process_links_need_no_torch_distributed_and_yield_both_ends():
    assert not dist.is_initialized()
    ends = create_links([in_process("a"), in_process("b")], TransportConfig(link_capacity=3))
    assert isinstance(ends, LinkEnds) and set(ends.writers) == set(ends.readers) == {"a", "b"}
    writer, reader = ends.writers["a"], ends.readers["a"]
    assert isinstance(writer, InProcessWriter) and isinstance(reader, InProcessReader)
    assert writer.capacity == reader.capacity == writer.credits() == 3
    sent = Message(tensors=[torch.ones(2)])
    writer.send(sent, timeout=0)
    assert reader.recv(timeout=0) is sent
    assert ends.readers["b"].stats.messages_received == 0  # a queue of its own


def test_refusals_name_the_link():
    with pytest.raises(TransportError, match="duplicate link name 'a'"):
        create_links([in_process("a"), in_process("a")])
    with pytest.raises(TransportError, match="outside the world of 1"):
        create_links([in_process("a", rank=1)])
    with pytest.raises(TransportError, match=r"specs\[0\]: expected a LinkSpec"):
        create_links([{"name": "a"}])
    with pytest.raises(TransportError, match="'a'.*needs torch.distributed initialised"):
        create_links([spec(transport=Transport.SAME_HOST, backend=None)])


def test_between_nodes_is_tcp_or_gloo_and_a_wrong_value_names_both():
    from comms.config import TransportConfig
    from core.config import ConfigError

    assert TransportConfig().between_nodes == "tcp"
    assert TransportConfig(between_nodes="gloo").between_nodes == "gloo"
    with pytest.raises(ConfigError, match=r"between_nodes: got 'nccl'; allowed: 'tcp', 'gloo'"):
        TransportConfig(between_nodes="nccl")
