"""Transport errors.

    TransportError
    ├── ChannelTimeout     nothing arrived (recv) or no credit came back (send) in time
    ├── ChannelClosed      this end closed the channel, or the peer sent END
    ├── PeerFailure        the peer died or its connection broke; the link is unusable
    └── HeaderError        bytes that are not a valid message header
"""


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
