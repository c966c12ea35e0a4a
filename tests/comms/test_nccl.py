"""The NCCL payload path: same contract as gloo, payloads stay on the GPUs.

Needs two CUDA devices (NCCL between two ranks cannot share one); skipped otherwise.
"""

import pytest
import torch

from comms.link_spec import LinkSpec, Transport
from comms.links import create_links
from comms.message import Kind, Message
from tests.comms.gloo_ranks import GlooWorld

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs 2 CUDA devices")


def exchange(rank, world_size):
    specs = [LinkSpec(name="a", src_rank=0, dst_rank=1, transport=Transport.TORCH, backend="nccl",
                      src_device="cuda:0", dst_device="cuda:1"),
             LinkSpec(name="b", src_rank=1, dst_rank=0, transport=Transport.TORCH, backend="nccl",
                      src_device="cuda:1", dst_device="cuda:0")]
    links = create_links(specs)
    device = torch.device(f"cuda:{rank}")
    outgoing, incoming = ("a", "b") if rank == 0 else ("b", "a")
    out, back = links.writers[outgoing], links.readers[incoming]
    sent = []
    for i in range(20):  # both directions at once: opposite sends must not deadlock
        t = torch.arange(i + 1000, device=device, dtype=torch.float32).reshape(-1, 10)[: (i % 5) + 1]
        out.send(Message(kind=Kind.DATA, frame_id=i, tensors=[t, t.to(torch.uint8)]), timeout=30)
        sent.append(t.cpu())
    got = [back.recv(timeout=30) for _ in range(20)]
    out.close()
    checks = []
    for i, m in enumerate(got):
        expect = torch.arange(i + 1000, dtype=torch.float32).reshape(-1, 10)[: (i % 5) + 1]
        checks.append(m.frame_id == i and m.tensors[0].device == device
                      and torch.equal(m.tensors[0].cpu(), expect) and m.tensors[1].dtype == torch.uint8)
    return all(checks)


def test_nccl_links_both_directions_keep_order_and_stay_on_gpu():
    with GlooWorld(2, backend="cpu:gloo,cuda:nccl") as world:
        assert world.run(exchange, timeout=120) == [True, True]
