"""Transport errors, and failure reasons made readable.

    TransportError
    ├── ChannelTimeout     nothing arrived (recv) or no credit came back (send) in time
    ├── ChannelClosed      this end closed, or the other did (the writer's END, the reader's CLOSED)
    ├── PeerFailure        the peer died or its connection broke; the link is unusable
    └── HeaderError        bytes that are not a valid message header
"""

import re


class TransportError(RuntimeError):
    """Base class for every failure of a channel."""


class ChannelTimeout(TransportError):
    pass


class ChannelClosed(TransportError):
    pass


class PeerFailure(TransportError):
    pass


class HeaderError(TransportError, ValueError):
    pass


def concise_error(reason: str) -> str:
    """A failure reason as a person reads it: gloo's errors carry a source path and a
    paragraph of advice; keep the fact."""
    reason = re.sub(r"\[[^\]]*gloo/[^\]]*\] ", "", reason)
    return reason.split(" This is typically caused")[0]
