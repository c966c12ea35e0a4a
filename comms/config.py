"""Settings of the inter-rank transport (the ``transport`` config section)."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.config_loader import check, check_choice

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(kw_only=True, slots=True)
class TransportConfig:
    backend: str = "auto"
    """Payload backend per link: 'auto' uses NCCL only when both ends are CUDA devices,
    'gloo' always uses gloo (CUDA tensors are staged through host memory), 'nccl'
    requires both ends of every link to be CUDA devices. Headers and credits always
    travel on gloo."""
    link_capacity: int = 2
    """Messages in flight per link (sent, not yet taken by the receiver); the sender
    blocks beyond this. Small values keep latency low under load."""
    slot_bytes: int = 16384
    """Fixed size of the header slot every message sends first; larger headers follow
    in an overflow buffer at the cost of one more round trip."""
    inline_max_bytes: int = 8192
    """Payloads up to this size ride inside the header slot on gloo links, saving the
    separate payload send; must leave room for a header within ``slot_bytes``."""
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
        check(isinstance(self.peer_timeout_s, (int, float)) and 0.1 <= self.peer_timeout_s <= 3600,
              "peer_timeout_s", f"must be within 0.1..3600 seconds, got {self.peer_timeout_s!r}")
        check(isinstance(self.init_timeout_s, (int, float)) and 1 <= self.init_timeout_s <= 3600,
              "init_timeout_s", f"must be within 1..3600 seconds, got {self.init_timeout_s!r}")
