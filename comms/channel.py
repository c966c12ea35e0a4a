"""The transport contract: the two ends of one directed link.

A link carries messages one way, from a ``ChannelWriter`` on the sending side to a
``ChannelReader`` on the receiving side (the writer/reader split of Ray's channels): a
reader has no ``send``, a writer no ``recv``. Implementations: in-process
(``comms.inprocess``), a socket (``comms.socket_link``: Unix socket + shared memory on
one host, TCP between hosts) and torch.distributed (``comms.torch_p2p``); ``comms.links``
makes them from ``LinkSpec``s. Contract, shared by
all of them:

* ``writer.send(msg, timeout)`` blocks until the link has a free credit (at most
  ``capacity`` messages in flight: sent but not yet taken by ``recv``), then hands the
  message over. Messages arrive in the order they were sent. The caller must not mutate
  the sent tensors afterwards (NCCL may still be reading them). ``writer.credits()`` is
  how many sends would not wait right now.
* ``reader.recv(timeout)`` returns the next message; taking it returns one credit.
* ``timeout`` is in seconds: ``None`` waits forever, ``0`` does not wait
  (``deadline_of``). Raises ``ChannelTimeout`` when time runs out, ``ChannelClosed``
  once either end closed, ``PeerFailure`` when the peer died or stalled past the
  liveness limit. Never hangs silently.
* ``close()`` never blocks, and may be called any number of times from any thread: a
  stage shutting down must not wait on a slow or stalled peer. ``writer.close()`` gets
  END on its way behind every message already sent (behind a send still running in
  another thread, once that finishes); later sends raise ``ChannelClosed``, and the
  reader gets every message sent, then ``ChannelClosed``. ``reader.close()`` tells the
  writer (CLOSED): messages not yet taken are dropped, the writer's sends raise
  ``ChannelClosed``, and a ``recv`` blocked in another thread returns with it. A send
  waiting for credit in another thread wakes with ``ChannelClosed`` on either close.
* ``join(timeout)`` then waits, at most ``timeout``, until the end is finished with:
  a writer's END delivered (or the reader closed or gone) and its shared memory freed,
  either end's background threads stopped. True when done; after False the end is as
  it was and ``join`` may be called again.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from comms.message import Message


def deadline_of(timeout: float | None) -> float | None:
    """Monotonic deadline for a contract timeout (None waits forever, 0 does not wait)."""
    if timeout is None:
        return None
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout < 0:
        raise ValueError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}")
    return time.monotonic() + timeout


def remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (never negative); None for no deadline."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


@dataclass(slots=True)
class LinkStats:
    """Per-end counters, read by metrics; updated only by the owning end (a writer counts
    what it sent, a reader what it received)."""

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


class ChannelWriter(ABC):
    """The sending end of one directed link. See the module docstring for the contract."""

    name: str
    capacity: int
    stats: LinkStats

    @abstractmethod
    def send(self, msg: Message, timeout: float | None = None) -> None: ...

    @abstractmethod
    def credits(self) -> int:
        """Free send credits right now (0..capacity; 0 once closed); used by least-loaded routing."""

    @abstractmethod
    def close(self) -> None:
        """Send END behind the messages already sent, without waiting for it to go out."""

    @abstractmethod
    def join(self, timeout: float | None = None) -> bool:
        """Wait until END was delivered (or the reader closed or is gone) and this end's
        threads and shared memory are released; True when they are."""


class ChannelReader(ABC):
    """The receiving end of one directed link. See the module docstring for the contract."""

    name: str
    capacity: int
    stats: LinkStats

    @abstractmethod
    def recv(self, timeout: float | None = None) -> Message: ...

    @abstractmethod
    def close(self) -> None:
        """Tell the writer to stop (CLOSED), drop queued messages, wake a blocked ``recv``."""

    @abstractmethod
    def join(self, timeout: float | None = None) -> bool:
        """Wait until this end's threads and shared memory are released; True when they are."""
