"""One logger setup for every process: each line says which rank and role wrote it."""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s.%(msecs)03d [rank {rank} {role}] %(levelname)s %(name)s: %(message)s"


def init_logger(rank: int, role: str, level: str = "INFO") -> logging.Logger:
    """Configure the root logger once for this process and return the runtime's logger.

    Called again after planning (when the role is known) to update the prefix.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT.format(rank=rank, role=role), datefmt="%H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # websockets logs every refused handshake at INFO; keep our own lines readable.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, root.level))
    return logging.getLogger("mirror")
