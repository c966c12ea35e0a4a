"""Decoded avatar frames, kept in a byte-bounded LRU cache.

Every output frame of the lip-sync pipeline starts from an avatar frame. Decoding a
640x480 JPEG costs ~2-3 ms; a session at 25 fps replays the same n frames ping-pong, and
many sessions may share an avatar, so decoded frames are worth keeping, but avatars can
be long (a 60 s clip at 720p is 1500 x 1.5 MB = 2.2 GB decoded): the cache is bounded in
bytes, not entries, and evicts the least recently used frame first. Frames load lazily,
on first use.

The arrays handed out are shared between callers and sessions, so they are made
read-only: a stage that paints on one must copy it first (``compositing.paste_patch``
does).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from stages.lipsync.avatar import AvatarStore


class BackgroundCache:
    """``(avatar, index) -> RGB uint8 frame``, LRU within ``max_bytes``; thread-safe."""

    def __init__(self, store: AvatarStore, max_bytes: int) -> None:
        if type(max_bytes) is not int or max_bytes < 0:
            raise ValueError(f"max_bytes must be an integer >= 0, got {max_bytes!r}")
        self.store = store
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._frames: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0

    def get(self, avatar: str, index: int) -> np.ndarray:
        """The decoded frame (read-only array). A miss decodes outside the lock, so one slow
        read never stalls other threads' hits; two threads missing the same frame at once
        both decode it and the second insert is dropped."""
        key = (avatar, int(index))
        with self._lock:
            frame = self._frames.get(key)
            if frame is not None:
                self._frames.move_to_end(key)
                self._hits += 1
                return frame
            self._misses += 1
        frame = self.store.read_frame(avatar, index)
        frame.setflags(write=False)
        with self._lock:
            if key in self._frames:
                return self._frames[key]
            if frame.nbytes <= self.max_bytes:  # a frame larger than the whole budget is not kept
                self._frames[key] = frame
                self._bytes += frame.nbytes
                self._evict()
        return frame

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and self._frames:
            _, old = self._frames.popitem(last=False)
            self._bytes -= old.nbytes
            self._evictions += 1

    def drop(self, avatar: str | None = None) -> int:
        """Forget every frame (or one avatar's, e.g. after it was rebuilt); returns how many.
        Not counted as evictions."""
        with self._lock:
            keys = [k for k in self._frames if avatar is None or k[0] == avatar]
            for key in keys:
                self._bytes -= self._frames.pop(key).nbytes
            return len(keys)

    def resize(self, max_bytes: int) -> None:
        """Change the byte budget, evicting at once if it shrank."""
        if type(max_bytes) is not int or max_bytes < 0:
            raise ValueError(f"max_bytes must be an integer >= 0, got {max_bytes!r}")
        with self._lock:
            self.max_bytes = max_bytes
            self._evict()

    def keys(self) -> list[tuple[str, int]]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._frames)

    def stats(self) -> dict:
        """hits, misses, bytes, entries, evictions, max_bytes and hit_rate (0..1, 0 before any get)."""
        with self._lock:
            total = self._hits + self._misses
            return {"hits": self._hits, "misses": self._misses, "bytes": self._bytes,
                    "entries": len(self._frames), "evictions": self._evictions,
                    "max_bytes": self.max_bytes, "hit_rate": self._hits / total if total else 0.0}
