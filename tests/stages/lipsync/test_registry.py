"""The per-device model registry: byte budget, eviction order, one load per key, failures."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from stages.lipsync.registry import (
    CapacityExhausted,
    LoadFailed,
    ModelRegistry,
)

KEYS = [f"avatar{i:02d}" for i in range(50)]


class Clock:
    """A test clock: moves only when told (``advance``), plus ``tick`` per reading so
    that successive uses are ordered."""

    def __init__(self, tick: float = 0.001):
        self.t = 100.0
        self.tick = tick

    def __call__(self) -> float:
        self.t += self.tick
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class TinyModels:
    """A loader of small uint8 tensors whose byte size is known: ``sizes[key]`` (default 1000)."""

    def __init__(self, sizes: dict[str, int] | None = None, fail: set[str] | None = None):
        self.sizes = sizes or {}
        self.fail = fail or set()
        self.calls: list[str] = []

    def __call__(self, key: str):
        self.calls.append(key)
        if key in self.fail:
            raise FileNotFoundError(f"/avatars/{key}/unet.pth")
        tensor = torch.full((self.sizes.get(key, 1000),), len(self.calls), dtype=torch.uint8)
        return tensor, tensor.numel() * tensor.element_size()


def registry(loader, capacity=10_000, **kwargs) -> ModelRegistry:
    kwargs.setdefault("clock", Clock())
    return ModelRegistry(capacity_bytes=capacity, loader=loader, **kwargs)


def touch(reg: ModelRegistry, *keys: str) -> None:
    for key in keys:
        with reg.use(key):
            pass


def resident(reg: ModelRegistry) -> list[str]:
    return [m["id"] for m in reg.list() if m["resident"]]


def test_fifty_models_with_room_for_ten_stay_within_the_byte_budget():
    loader = TinyModels()
    reg = registry(loader)
    for key in KEYS:
        with reg.use(key) as model:
            assert model.numel() == 1000
        assert reg.stats()["used_bytes"] <= 10_000
    stats = reg.stats()
    assert stats["resident"] == 10 and stats["used_bytes"] == 10_000
    assert stats["loads"] == 50 and stats["evictions"] == 40 and stats["misses"] == 50
    assert resident(reg) == KEYS[-10:]
    # Use again what is resident: hits, no loads.
    touch(reg, *KEYS[-10:])
    assert reg.stats()["hits"] == 10 and loader.calls == KEYS


def test_eviction_frees_as_many_bytes_as_the_new_model_needs():
    sizes = {"big": 3500, "huge": 9000}
    loader = TinyModels(sizes)
    reg = registry(loader)
    touch(reg, *KEYS[:10])  # 10 x 1000: full
    touch(reg, "big")  # needs 3500: the four least recently used go, not three
    assert resident(reg) == sorted(KEYS[4:10] + ["big"])
    assert reg.stats()["used_bytes"] == 9500
    touch(reg, "huge")  # 9000: everything else goes
    assert resident(reg) == ["huge"] and reg.stats()["used_bytes"] == 9000
    touch(reg, KEYS[0])  # 1000 more fits next to it
    assert resident(reg) == sorted(["huge", KEYS[0]]) and reg.stats()["evictions"] == 4 + 7


def test_lru_evicts_the_least_recently_used():
    reg = registry(TinyModels(), policy="lru")
    a, b, c, d = KEYS[:4]
    touch(reg, *KEYS[:10])
    touch(reg, a, b)  # a and b are now the most recent; c is the oldest
    touch(reg, KEYS[10])
    assert c not in resident(reg) and a in resident(reg) and b in resident(reg)
    touch(reg, KEYS[11])
    assert d not in resident(reg)


def test_lfu_evicts_the_least_used_and_breaks_ties_by_recency():
    reg = registry(TinyModels(), policy="lfu")
    touch(reg, *KEYS[:10])
    for _ in range(3):
        touch(reg, *KEYS[:9])  # KEYS[9] has 1 use, the others 4
    touch(reg, KEYS[9])  # now 2 uses, and the most recent: still the least used
    touch(reg, KEYS[10])
    assert KEYS[9] not in resident(reg)
    # KEYS[10] (1 use) goes next, although it is the newest: LFU, not LRU.
    touch(reg, KEYS[11])
    assert KEYS[10] not in resident(reg) and KEYS[11] in resident(reg)
    # Ties on uses: the least recently used of them goes. KEYS[11] has 1 use; give it 4.
    touch(reg, KEYS[11], KEYS[11], KEYS[11])
    touch(reg, KEYS[12])  # KEYS[0] is the least recent of the 4-use models
    assert KEYS[0] not in resident(reg) and KEYS[11] in resident(reg)


def test_models_in_use_are_never_evicted_and_no_room_is_a_clear_error():
    loader = TinyModels()
    reg = registry(loader)
    held = [reg.acquire(key) for key in KEYS[:10]]
    with pytest.raises(CapacityExhausted, match="in use"):
        reg.acquire(KEYS[10])
    assert resident(reg) == KEYS[:10] and reg.stats()["used_bytes"] == 10_000
    assert reg.stats()["failures"] == 0  # transient: not remembered as a failure
    # Its size is known now: the next try fails before loading anything.
    with pytest.raises(CapacityExhausted):
        reg.acquire(KEYS[10])
    assert loader.calls.count(KEYS[10]) == 1
    reg.release(KEYS[7])  # only this one may go, although KEYS[0] is older
    with reg.use(KEYS[10]):
        assert resident(reg) == sorted(KEYS[:7] + KEYS[8:11])
    assert len(held) == 10


def test_a_model_larger_than_the_capacity_fails_with_its_size():
    reg = registry(TinyModels({"huge": 20_000}))
    touch(reg, KEYS[0])
    with pytest.raises(LoadFailed, match="20000 bytes, larger than the registry's whole capacity of 10000"):
        reg.acquire("huge")
    assert resident(reg) == [KEYS[0]]  # nothing evicted for it


def test_concurrent_acquires_of_one_key_load_it_once():
    gate = threading.Event()
    calls = []

    def slow_loader(key):
        calls.append(key)
        if key == "slow":
            assert gate.wait(10)
        return torch.zeros(100, dtype=torch.uint8), 100

    reg = ModelRegistry(capacity_bytes=1000, loader=slow_loader)
    touch(reg, "other")
    results, errors = [], []

    def worker():
        try:
            results.append(reg.acquire("slow"))
        except LoadFailed as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while reg.stats()["joined"] < 7 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert reg.stats()["joined"] == 7 and reg.stats()["loading"] == 1
    # The load runs outside the lock: another model is served meanwhile.
    with reg.use("other") as other:
        assert other.numel() == 100
    gate.set()
    for t in threads:
        t.join(10)
    assert not errors and calls == ["other", "slow"]
    assert len(results) == 8 and all(r is results[0] for r in results)
    slow = next(m for m in reg.list() if m["id"] == "slow")
    assert slow["in_use"] == 8 and slow["uses"] == 8 and slow["loads"] == 1
    for _ in range(8):
        reg.release("slow")
    assert next(m for m in reg.list() if m["id"] == "slow")["in_use"] == 0


def test_waiters_of_a_failing_load_get_its_error_and_nothing_retries_in_a_loop():
    gate = threading.Event()
    calls = []

    def failing_loader(key):
        calls.append(key)
        assert gate.wait(10)
        raise ValueError("unet weights /avatars/bad/unet.pth: keys do not match")

    clock = Clock()
    reg = ModelRegistry(capacity_bytes=1000, loader=failing_loader, clock=clock, retry_after_s=30)
    errors = []

    def worker():
        try:
            reg.acquire("bad")
        except LoadFailed as e:
            errors.append(str(e))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while reg.stats()["joined"] < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    gate.set()
    for t in threads:
        t.join(10)
    assert len(errors) == 4 and all("keys do not match" in e for e in errors) and calls == ["bad"]
    bad = reg.list()[0]
    assert bad["failed"] == "ValueError: unet weights /avatars/bad/unet.pth: keys do not match"
    assert not bad["resident"] and 29 < bad["retry_in_s"] <= 30
    assert reg.stats()["failures"] == 1

    # Within the retry window requests fail at once with the remembered error.
    for _ in range(20):
        with pytest.raises(LoadFailed, match="keys do not match.*not retried for another"):
            reg.acquire("bad")
    assert calls == ["bad"] and reg.stats()["rejected"] == 20
    # After it, one new attempt.
    clock.advance(31)
    with pytest.raises(LoadFailed, match="keys do not match"):
        reg.acquire("bad")
    assert calls == ["bad", "bad"] and reg.stats()["failures"] == 2


def test_explicit_load_retries_a_failed_model_at_once_and_clears_the_failure():
    loader = TinyModels(fail={"x"})
    reg = registry(loader, retry_after_s=30)
    with pytest.raises(LoadFailed, match="FileNotFoundError"):
        reg.acquire("x")
    loader.fail.clear()  # the operator fixed the file
    with pytest.raises(LoadFailed):
        reg.acquire("x")  # still within the window: not retried by requests
    assert reg.load("x") == "loaded"
    x = reg.list()[0]
    assert x["resident"] and x["failed"] is None and x["in_use"] == 0 and x["uses"] == 0
    assert reg.load("x") == "resident" and loader.calls == ["x", "x"]


def test_idle_models_expire_but_not_while_in_use():
    clock = Clock()
    reg = registry(TinyModels(), idle_timeout_s=10, clock=clock)
    a, b, c, d = KEYS[:4]
    touch(reg, a, b)
    reg.load(d)  # preloaded, never used: idle since its load
    held = reg.acquire(c)
    clock.advance(5)
    touch(reg, b)
    clock.advance(6)
    assert reg.expire_idle() == [a, d]
    assert resident(reg) == [b, c]
    clock.advance(60)
    assert reg.expire_idle() == [b]  # c is in use
    reg.release(c)
    assert reg.expire_idle() == []  # just used
    clock.advance(11)
    assert reg.expire_idle() == [c] and reg.stats()["expired"] == 4 and held is not None
    assert registry(TinyModels(), idle_timeout_s=None).expire_idle() == []


def test_unload_now_or_deferred_until_the_last_release():
    reg = registry(TinyModels())
    a, b = KEYS[:2]
    touch(reg, a)
    assert reg.unload(a) == "unloaded" and resident(reg) == []
    assert reg.unload(a) == "not_resident"
    reg.acquire(b)
    reg.acquire(b)
    assert reg.unload(b) == "deferred"
    reg.release(b)
    assert resident(reg) == [b]  # still one user
    reg.release(b)
    assert resident(reg) == [] and reg.stats()["unloads"] == 2 and reg.stats()["used_bytes"] == 0
    touch(reg, b)  # requested again: loaded again
    assert next(m for m in reg.list() if m["id"] == b)["loads"] == 2


def test_list_and_stats_report_usage():
    clock = Clock()
    reg = registry(TinyModels({KEYS[1]: 400}), clock=clock, policy="lfu")
    touch(reg, KEYS[0], KEYS[0], KEYS[1])
    clock.advance(2.0)
    models = {m["id"]: m for m in reg.list()}
    assert models[KEYS[0]] == {"id": KEYS[0], "bytes": 1000, "loads": 1, "uses": 2, "requests": 2,
                               "last_used_s_ago": pytest.approx(2.0, abs=0.01), "resident": True,
                               "loading": False, "in_use": 0, "failed": None, "retry_in_s": None}
    assert models[KEYS[1]]["bytes"] == 400
    stats = reg.stats()
    assert {k: stats[k] for k in ("capacity_bytes", "used_bytes", "resident", "loads", "evictions", "hits",
                                  "misses", "failures", "policy")} == {
        "capacity_bytes": 10_000, "used_bytes": 1400, "resident": 2, "loads": 2, "evictions": 0, "hits": 1,
        "misses": 2, "failures": 0, "policy": "lfu"}
    report = reg.report()
    assert report["stats"] == reg.stats() and [m["id"] for m in report["models"]] == [KEYS[0], KEYS[1]]


def test_misuse_and_bad_configuration_are_named():
    reg = registry(TinyModels())
    with pytest.raises(RuntimeError, match="without a matching acquire"):
        reg.release("nobody")
    with pytest.raises(ValueError, match="policy must be one of lru, lfu; got 'fifo'"):
        ModelRegistry(capacity_bytes=1, policy="fifo", loader=TinyModels())
    with pytest.raises(ValueError, match="capacity_bytes must be a positive int"):
        ModelRegistry(capacity_bytes=0, loader=TinyModels())
    bad_loader = registry(lambda key: torch.zeros(1))
    with pytest.raises(LoadFailed, match=r"loader must return \(model, nbytes >= 0\)"):
        bad_loader.acquire("a")
