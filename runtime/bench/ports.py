"""A free TCP port for the rendezvous of ranks the benchmark spawns itself (sections
'transport' and 'gpu'), shared so both pick it the same way."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago (another process may take it
    before the ranks bind it; the ranks' start-up then fails and says so)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
