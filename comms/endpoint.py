"""What the two cross-rank links share: an end's state (open, closed, failed), when the
writer's END goes out, and closing the ends still open when the process exits.

The socket link (``comms.socket_link``, same host or TCP) and the torch.distributed link
(``comms.torch_p2p``) differ in how bytes travel and in who waits for them (the
caller's thread, or background threads); the rules below are the same for both and
live here once:

* A failure is final and its first reason wins (later ones are its consequences). It
  is logged as an error, unless the end was closed already: a peer that goes away
  after close is expected.
* END goes out once, when the writer is closed and no send is running; a send still
  running in another thread posts it as it finishes, so ``close`` never waits for a
  send, and END cannot overtake a message. (The torch link also sends END after the
  reader's CLOSED: its receiving thread stops only at END.) Posting END starts it on
  its way without waiting for it to arrive; ``join`` waits for that.
* Every end is registered while alive. At interpreter exit the open ones are closed
  and joined, ``EXIT_JOIN_S`` for all together: a process that exits while a thread is
  inside a gloo wait on a broken connection can abort in C++, and a receiver that
  outlives its sender should still get END rather than a broken connection.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from abc import abstractmethod

from comms.channel import ChannelReader, ChannelWriter, LinkStats, deadline_of, remaining
from comms.config import TransportConfig
from comms.errors import ChannelClosed, ChannelTimeout, PeerFailure, concise_error
from comms.header import TensorSpec, encode_for_send
from comms.link_spec import LinkSpec
from comms.message import Message

log = logging.getLogger(__name__)

EXIT_JOIN_S = 2.0
"""Longest the exit hook waits for all open ends together to finish."""

_live: weakref.WeakSet[LinkEnd] = weakref.WeakSet()


class LinkEnd:
    """One end of a link between two ranks: what it is, its counters, and whether it is
    still usable. ``_state`` guards the state; waiters on ``_cond`` (the same lock) wake
    on every change."""

    def __init__(self, spec: LinkSpec, peer: int, config: TransportConfig) -> None:
        self.name = spec.name
        self.capacity = config.link_capacity
        self.stats = LinkStats()
        self.spec = spec
        self._peer = peer
        """The other end's global rank."""
        self._state = threading.Lock()
        """Taken directly where a message passes (cheaper than the condition's methods);
        never taken twice by one thread."""
        self._cond = threading.Condition(self._state)
        self._closed = False
        self._failure: str | None = None
        _live.add(self)

    def _raise_if_unusable(self) -> None:
        if self._failure is not None:
            raise PeerFailure(self._failure)
        if self._closed:
            raise ChannelClosed(f"link {self.name!r} is closed")

    def _fail(self, reason: str) -> str:
        """Mark the link failed (first reason wins) and wake every waiter; returns the
        failure, for raising."""
        with self._cond:
            if self._failure is None:
                self._failure = f"link {self.name!r}: {concise_error(reason)}"
                if self._closed:
                    log.debug("%s (after close)", self._failure)
                else:
                    log.error("%s", self._failure)
            self._cond.notify_all()
            return self._failure

    def _closable_at_exit(self) -> bool:
        """Whether the exit hook may still close and join this end."""
        return True

    def __repr__(self) -> str:
        backend = f" on {self.spec.backend}" if self.spec.backend else ""
        return (f"{type(self).__name__}({self.name!r}, rank {self.spec.src_rank} -> {self.spec.dst_rank}"
                f"{backend}, capacity={self.capacity})")


class CrossRankWriter(LinkEnd, ChannelWriter):
    """The sending end: credits, the send around the transfer, and when END goes out.
    Subclasses move the bytes: ``_deliver`` takes a credit and hands one message over,
    ``_post_end`` starts END on its way."""

    def __init__(self, spec: LinkSpec, config: TransportConfig) -> None:
        super().__init__(spec, spec.dst_rank, config)
        self._credits = config.link_capacity
        self._peer_closed = False
        """The receiver said CLOSED: it closed, or took END."""
        self._sending = 0
        """Sends past the closed check and not finished; END waits for them."""
        self._end_posted = False

    def send(self, msg: Message, timeout: float | None = None) -> None:
        deadline = deadline_of(timeout)
        specs, total, header = encode_for_send(self.name, msg)
        started = time.monotonic()
        with self._state:
            self._raise_if_unusable()
            self._sending += 1
        try:
            self._deliver(msg, header, specs, total, deadline, timeout)
        finally:
            with self._state:
                self._sending -= 1
                post_end = (self._closed or self._peer_closed) and self._claim_end()
                if self._closed:
                    self._cond.notify_all()  # join waits for the last send
            if post_end:
                self._post_end()
        self.stats.record_send(msg.payload_bytes, time.monotonic() - started)

    def close(self) -> None:
        """Mark this end closed, wake a send waiting for credit, and post END unless a
        send is running (which then posts it)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            post_end = self._claim_end()
        self._wake_credit_wait()
        if post_end:
            self._post_end()

    @abstractmethod
    def _deliver(self, msg: Message, header: bytes, specs: list[TensorSpec], total: int,
                 deadline: float | None, timeout: float | None) -> None:
        """Take a credit (waiting until ``deadline``; ``self._no_credit(timeout)`` when
        none came), then hand ``msg`` over: its encoded ``header``, and ``total`` payload
        bytes laid out as ``specs``."""

    @abstractmethod
    def _post_end(self) -> None:
        """Start END on its way without waiting for it; called once, with no send running."""

    def _wake_credit_wait(self) -> None:
        """Wake a send waiting for credit, so that it sees the close (waits on ``_cond``
        wake by themselves)."""

    def _end_wanted(self) -> bool:
        return self._closed

    def _claim_end(self) -> bool:
        """Under ``_state``: whether END is due now; if so, the caller must post it."""
        if self._end_posted or self._sending or self._failure is not None or not self._end_wanted():
            return False
        self._end_posted = True
        return True

    def _raise_if_unusable(self) -> None:
        super()._raise_if_unusable()
        if self._peer_closed:
            raise ChannelClosed(f"link {self.name!r}: the receiver (rank {self._peer}) closed it")

    def _no_credit(self, timeout: float | None) -> ChannelTimeout:
        return ChannelTimeout(f"link {self.name!r}: no credit within {timeout} s "
                              f"({self.capacity} messages in flight)")

    def _sends_finished(self, deadline: float | None) -> bool:
        """Once closed, wait until no send is running (after the last one, END is
        posted); False when ``deadline`` passed first. (An open writer has no END due.)"""
        with self._cond:
            return self._cond.wait_for(lambda: self._sending == 0 or not self._closed, remaining(deadline))


class CrossRankReader(LinkEnd, ChannelReader):
    """The receiving end: closing it, and the END it may have seen."""

    def __init__(self, spec: LinkSpec, config: TransportConfig) -> None:
        super().__init__(spec, spec.src_rank, config)
        self._ended = False
        """The writer's END arrived: what came before it is still taken, then ChannelClosed."""

    def close(self) -> None:
        """Mark this end closed, wake a blocked ``recv`` and tell the writer (CLOSED)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._tell_writer_closed()

    @abstractmethod
    def _tell_writer_closed(self) -> None:
        """Start CLOSED on its way, drop what is queued, and wake a ``recv`` blocked in
        another thread; without waiting."""

    def _ended_error(self) -> ChannelClosed:
        return ChannelClosed(f"link {self.name!r}: rank {self._peer} sent END")


@atexit.register
def _close_live_ends() -> None:
    ends = [end for end in list(_live) if end._closable_at_exit()]
    for end in ends:
        _at_exit(end.close, end)
    deadline = time.monotonic() + EXIT_JOIN_S
    for end in ends:
        if not _at_exit(lambda: end.join(remaining(deadline)), end):
            log.debug("%r not finished at exit", end)


def _at_exit(step, end: LinkEnd) -> bool:
    """One end's close or join at exit; an error (an end whose setup failed half-way)
    must not keep the others open."""
    try:
        return step()
    except Exception as e:
        log.debug("%r at exit: %s", end, e)
        return False
