"""The one transport interface every stage talks through.

A ``Channel`` is one directed link between two stage endpoints. Contract, shared by
the in-process (``comms.inprocess``), same-host (``comms.local_link``) and
torch.distributed (``comms.torch_p2p``) implementations:

* ``send(msg, timeout)`` blocks until the link has a free credit (at most ``capacity``
  messages in flight: sent but not yet taken by ``recv`` on the far side), then hands
  the message over. Messages arrive in the order they were sent. The caller must not
  mutate the sent tensors afterwards (NCCL may still be reading them).
* ``recv(timeout)`` returns the next message; taking it returns one credit to the sender.
* ``timeout`` is in seconds: ``None`` waits forever, ``0`` does not wait.
  Raises ``ChannelTimeout`` when time runs out, ``ChannelClosed`` after ``close()`` or
  when the peer sent END, ``PeerFailure`` when the peer died or stalled past the
  liveness limit. Never hangs silently.
* ``close()`` may be called any number of times and returns within a bounded time (a
  link between ranks waits at most a couple of seconds for its END to go out). After the sending
  end closes, the receiver still gets every message sent, then ``ChannelClosed``; after
  the receiving end closes, messages not yet taken may be discarded.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from comms.message import Message


@dataclass(slots=True)
class LinkStats:
    """Per-link counters, read by metrics; updated only by the owning channel."""

    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    send_seconds: float = 0.0
    """Time spent inside send (waiting for credit + handing over)."""
    hop_latencies_ms: list[float] = field(default_factory=list)
    """Send-start to receive-complete per message (bounded ring, newest last)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    MAX_SAMPLES = 512

    def record_send(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.messages_sent += 1
            self.bytes_sent += nbytes
            self.send_seconds += seconds

    def record_recv(self, nbytes: int, latency_ms: float) -> None:
        with self._lock:
            self.messages_received += 1
            self.bytes_received += nbytes
            self.hop_latencies_ms.append(latency_ms)
            if len(self.hop_latencies_ms) > self.MAX_SAMPLES:
                del self.hop_latencies_ms[: -self.MAX_SAMPLES]

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "messages_sent": self.messages_sent,
                "bytes_sent": self.bytes_sent,
                "messages_received": self.messages_received,
                "bytes_received": self.bytes_received,
                "send_seconds": self.send_seconds,
                "hop_latencies_ms": list(self.hop_latencies_ms),
            }


class Channel(ABC):
    """One directed link. See the module docstring for the contract."""

    name: str
    capacity: int
    stats: LinkStats

    @abstractmethod
    def send(self, msg: Message, timeout: float | None = None) -> None: ...

    @abstractmethod
    def recv(self, timeout: float | None = None) -> Message: ...

    @abstractmethod
    def credits(self) -> int:
        """Free send credits right now (0..capacity); used by least-loaded routing."""

    @abstractmethod
    def close(self) -> None:
        """End this side of the link (see the module docstring)."""
