"""The decoded-frame cache: lazy loads, eviction by bytes in LRU order, stats, threads."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from stages.lipsync.avatar import AvatarStore, UnknownAvatar
from stages.lipsync.background_cache import BackgroundCache
from tests.stages.lipsync.test_avatar import HEIGHT, WIDTH, frame_colour, write_avatar

FRAME_BYTES = WIDTH * HEIGHT * 3


@pytest.fixture
def store(tmp_path: Path) -> AvatarStore:
    write_avatar(tmp_path, "anna", frames=6)
    write_avatar(tmp_path, "bob", frames=2)
    return AvatarStore(tmp_path)


def test_frames_load_lazily_and_hit_afterwards(store: AvatarStore) -> None:
    cache = BackgroundCache(store, 10 * FRAME_BYTES)
    assert cache.stats()["entries"] == 0  # nothing decoded up front
    first = cache.get("anna", 3)
    assert np.abs(first.reshape(-1, 3).mean(0) - frame_colour(3)).max() < 3
    again = cache.get("anna", 3)
    assert again is first
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["entries"], stats["bytes"]) == (1, 1, 1, FRAME_BYTES)
    assert stats["hit_rate"] == 0.5


def test_frames_are_read_only(store: AvatarStore) -> None:
    frame = BackgroundCache(store, 10 * FRAME_BYTES).get("anna", 0)
    with pytest.raises(ValueError, match="read-only"):
        frame[0, 0, 0] = 1


def test_eviction_by_bytes_in_lru_order(store: AvatarStore) -> None:
    cache = BackgroundCache(store, 3 * FRAME_BYTES + FRAME_BYTES // 2)  # room for three frames
    for index in (0, 1, 2):
        cache.get("anna", index)
    cache.get("anna", 0)                       # 0 is now the most recently used
    cache.get("anna", 3)                       # evicts 1, the least recently used
    assert cache.keys() == [("anna", 2), ("anna", 0), ("anna", 3)]
    stats = cache.stats()
    assert (stats["entries"], stats["evictions"], stats["bytes"]) == (3, 1, 3 * FRAME_BYTES)
    assert stats["bytes"] <= stats["max_bytes"]
    cache.get("anna", 1)                       # a miss again: it was evicted
    assert cache.stats()["misses"] == 5 and cache.keys()[0] == ("anna", 0)


def test_frames_of_different_avatars_share_the_budget(store: AvatarStore) -> None:
    cache = BackgroundCache(store, 2 * FRAME_BYTES)
    cache.get("anna", 0)
    cache.get("bob", 0)
    cache.get("bob", 1)
    assert cache.keys() == [("bob", 0), ("bob", 1)]
    assert cache.drop("bob") == 2
    assert cache.stats()["bytes"] == 0 and cache.stats()["evictions"] == 1


def test_a_frame_larger_than_the_budget_is_served_uncached(store: AvatarStore) -> None:
    cache = BackgroundCache(store, FRAME_BYTES - 1)
    frame = cache.get("anna", 0)
    assert frame.shape == (HEIGHT, WIDTH, 3)
    assert cache.stats()["entries"] == 0 and cache.stats()["bytes"] == 0


def test_resize_evicts_at_once(store: AvatarStore) -> None:
    cache = BackgroundCache(store, 6 * FRAME_BYTES)
    for index in range(6):
        cache.get("anna", index)
    cache.resize(2 * FRAME_BYTES)
    assert cache.keys() == [("anna", 4), ("anna", 5)]
    assert cache.stats()["evictions"] == 4


def test_errors_pass_through(store: AvatarStore) -> None:
    cache = BackgroundCache(store, FRAME_BYTES)
    with pytest.raises(UnknownAvatar):
        cache.get("carol", 0)
    with pytest.raises(IndexError):
        cache.get("anna", 6)
    with pytest.raises(ValueError, match="max_bytes"):
        BackgroundCache(store, -1)


def test_many_threads_keep_the_books_straight(store: AvatarStore) -> None:
    cache = BackgroundCache(store, 3 * FRAME_BYTES)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(150):
                index = int(rng.integers(0, 6))
                frame = cache.get("anna", index)
                assert np.abs(frame[0, 0].astype(int) - frame_colour(index)).max() < 4
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    stats = cache.stats()
    assert stats["hits"] + stats["misses"] == 600
    assert stats["bytes"] == stats["entries"] * FRAME_BYTES <= 3 * FRAME_BYTES
    assert stats["misses"] >= stats["entries"] + stats["evictions"]
