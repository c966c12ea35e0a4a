"""Settings of the inter-rank transport (the ``transport`` config section)."""

from __future__ import annotations

from dataclasses import dataclass

from core.config import check, check_choice

BACKENDS = ("auto", "gloo", "nccl")
BETWEEN_NODES = ("tcp", "gloo")
"""Choices of ``TransportConfig.between_nodes``."""
"""Choices of ``TransportConfig.backend``; a link itself gets one of
``comms.link_spec.TORCH_BACKENDS``."""


@dataclass(kw_only=True, slots=True)
class TransportConfig:
    backend: str = "auto"
    """What the planner gives each torch.distributed link for its payloads: 'auto' uses
    NCCL only when both ends are CUDA devices, 'gloo' always uses gloo (CUDA tensors are
    staged through host memory), 'nccl' requires both ends of every such link to be CUDA
    devices. Headers and credits always travel on gloo."""
    link_capacity: int = 2
    """Messages in flight per link (sent, not yet taken by the receiver); the sender
    blocks beyond this. Small values keep latency low under load."""
    slot_bytes: int = 131072
    """Size of the header slot the receiver keeps posted ahead of time; a message's
    header (and a small payload, see ``inline_max_bytes``) arrives in it without a
    round trip. Only the used part travels, so a large slot costs nothing per message.
    Larger headers follow in an overflow buffer at the cost of one more round trip."""
    inline_max_bytes: int = 65536
    """Payloads up to this size travel with their header: inside the header slot on gloo
    links (one transfer per message instead of two), in the frame on same-host links
    (larger ones go through shared memory there). At most ``slot_bytes / 2``, leaving
    room for the header in the slot."""
    prepost_bytes: int = 4 * 2**20
    """Size of the payload receive a gloo link's receiver keeps posted ahead of time, so
    a payload arrives without first announcing its size (one round trip less). A larger
    payload goes the slow way once and grows the posted size to fit (up to 64 MiB)."""
    shared_memory: bool = True
    """Whether the planner makes a link between two ranks of one node whose payloads
    would travel on gloo a same-host link, which skips gloo: headers and credits go
    over a Unix socket on the caller's thread, payloads through a shared-memory segment
    (two memory copies instead of loopback TCP). Links between nodes and NCCL links are
    unaffected; false makes every link between ranks a torch.distributed link."""
    between_nodes: str = "tcp"
    """How the planner makes a link between two nodes whose payloads would travel on
    gloo: 'tcp' a socket link on one TCP connection (frames and payloads on the caller's
    thread, no background threads: the fastest), 'gloo' a torch.distributed link on
    gloo (a background thread per direction). NCCL links are unaffected."""
    peer_timeout_s: float = 10.0
    """How long a started transfer (or a credit, once due) may stall before the peer
    counts as failed. Idle links never time out."""
    init_timeout_s: float = 120.0
    """Limit for creating the per-link process groups at startup."""

    def __post_init__(self) -> None:
        check_choice(self.backend, "backend", BACKENDS)
        check(isinstance(self.link_capacity, int) and 1 <= self.link_capacity <= 1024, "link_capacity",
              f"must be an integer within 1..1024, got {self.link_capacity!r}")
        check(isinstance(self.slot_bytes, int) and 1024 <= self.slot_bytes <= 16 * 2**20, "slot_bytes",
              f"must be an integer within 1024..16777216, got {self.slot_bytes!r}")
        check(isinstance(self.inline_max_bytes, int) and 0 <= self.inline_max_bytes <= self.slot_bytes // 2,
              "inline_max_bytes",
              f"must be an integer within 0..slot_bytes/2 ({self.slot_bytes // 2}), got {self.inline_max_bytes!r}")
        check(isinstance(self.prepost_bytes, int) and 2**10 <= self.prepost_bytes <= 2**26, "prepost_bytes",
              f"must be an integer within 1024..67108864, got {self.prepost_bytes!r}")
        check_choice(self.between_nodes, "between_nodes", BETWEEN_NODES)
        check(isinstance(self.shared_memory, bool), "shared_memory",
              f"must be true or false, got {self.shared_memory!r}")
        check(isinstance(self.peer_timeout_s, (int, float)) and 0.1 <= self.peer_timeout_s <= 3600,
              "peer_timeout_s", f"must be within 0.1..3600 seconds, got {self.peer_timeout_s!r}")
        check(isinstance(self.init_timeout_s, (int, float)) and 1 <= self.init_timeout_s <= 3600,
              "init_timeout_s", f"must be within 1..3600 seconds, got {self.init_timeout_s!r}")
