"""One device's lip-sync models, many avatars: loaded on demand, evicted by bytes.

Every avatar brings its own U-Net (~49 MB in float32), and a server hosts more avatars
than one GPU should hold. A lip-sync stage replica keeps its models in a
``ModelRegistry``: a byte budget per device (``device_memory.capacity_from_device``), models loaded
when a request first needs them and evicted (LRU or LFU) when a new one needs the room,
plus explicit load / unload, an idle timeout, usage statistics and remembered failures.

* The budget is in *bytes*, not models: avatars' models may differ in width, and what
  runs out on a GPU is memory.
* A load takes hundreds of milliseconds, so it runs outside the lock (other keys stay
  usable); concurrent requests for a key being loaded wait for that one load.
* A model in use (between ``acquire`` and ``release``) is never evicted; if only models
  in use could make room the request fails with ``CapacityExhausted`` rather than
  exceed the budget (an out-of-memory error would take every session down, not one).
* A failed load is remembered with its error for ``retry_after_s``: requests in that
  window fail at once with it, so a broken file is not re-read at every frame.
* No thread of its own: the stage calls ``expire_idle()``; the clock is injectable.

Room is made *before* a load when the model's size is known from an earlier load (the
device never holds more than the budget); a first load learns the size from the loader
and makes room right after it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

POLICIES = ("lru", "lfu")
"""Eviction policies: least recently used, or least frequently used (ties: least recently)."""

HISTORY_LIMIT = 1024
"""Keys whose statistics are kept after eviction; beyond it the longest-untouched go."""


class LoadFailed(RuntimeError):
    """The model ``key`` could not be made resident; ``reason`` says why."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"model {key!r}: {reason}")
        self.key = key
        self.reason = reason


class CapacityExhausted(LoadFailed):
    """No room now: the models that would have to go are all in use. Transient (it is
    not remembered as a failure); a subclass of LoadFailed so one ``except`` covers both."""


@dataclass(slots=True)
class _Record:
    """What is known about one key, resident or not: statistics outlive evictions."""
    nbytes: int | None = None  # from the last load; lets the next load make room first
    loads: int = 0
    uses: int = 0  # acquires served, over the key's whole life (LFU counts these)
    requests: int = 0  # acquire calls, served or not (the directory watches this)
    last_used: float | None = None
    loaded_at: float | None = None
    touched: float = 0.0  # last activity of any kind, for trimming the history
    failure: str | None = None
    failed_at: float = 0.0


@dataclass(slots=True)
class _Entry:
    value: Any
    nbytes: int
    in_use: int = 0
    unload_requested: bool = False  # unload() came while in use: goes at the last release


@dataclass(slots=True)
class _Pending:
    """One in-flight load; everyone who asked for the key while it runs waits on ``done``."""
    done: threading.Event = field(default_factory=threading.Event)
    holders: int = 1  # acquirers to hand the value to (the loading thread and the waiters)
    uses: int = 0  # of those, the ones that count as uses (an explicit load() does not)
    reserved: int = 0  # bytes set aside before the load (size known from an earlier one)
    value: Any = None
    error: LoadFailed | None = None
    unload_requested: bool = False


class ModelRegistry:
    """The models resident on one device, thread-safe (a stage thread plus a control thread).

    ``loader(key) -> (value, nbytes)`` makes a model resident (e.g. reads the avatar's
    U-Net onto the device and returns it with ``model_files.model_bytes``); it may raise,
    which is reported as ``LoadFailed``. Evicted values are simply dropped, so the memory
    returns once nothing else references them.
    """

    def __init__(self, *, capacity_bytes: int, policy: str = "lru", idle_timeout_s: float | None = None,
                 loader: Callable[[str], tuple[Any, int]], clock: Callable[[], float] = time.monotonic,
                 retry_after_s: float = 30.0):
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ValueError(f"registry capacity_bytes must be a positive int, got {capacity_bytes!r}")
        if policy not in POLICIES:
            raise ValueError(f"registry policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        if idle_timeout_s is not None and not idle_timeout_s > 0:
            raise ValueError(f"registry idle_timeout_s must be > 0 or null (never), got {idle_timeout_s!r}")
        if not retry_after_s >= 0:
            raise ValueError(f"registry retry_after_s must be >= 0, got {retry_after_s!r}")
        self.capacity_bytes = capacity_bytes
        self.policy = policy
        self.idle_timeout_s = idle_timeout_s
        self.retry_after_s = float(retry_after_s)
        self._loader = loader
        self._clock = clock
        self._lock = threading.Lock()
        self._records: dict[str, _Record] = {}
        self._resident: dict[str, _Entry] = {}
        self._loading: dict[str, _Pending] = {}
        self._used = 0
        self._reserved = 0
        self._counts = dict.fromkeys(("loads", "evictions", "expired", "unloads", "hits", "misses",
                                      "joined", "rejected", "failures"), 0)

    # ---- using models -------------------------------------------------------------

    def acquire(self, key: str) -> Any:
        """The model of ``key``, loaded if needed (once, however many threads ask); it stays
        resident until the matching ``release``. Raises LoadFailed (or CapacityExhausted)."""
        return self._acquire(key, count_use=True)

    def release(self, key: str) -> None:
        """End one ``acquire`` of ``key``; the model becomes evictable when nobody uses it."""
        with self._lock:
            entry = self._resident.get(key)
            if entry is None or entry.in_use <= 0:
                raise RuntimeError(f"registry release({key!r}) without a matching acquire")
            entry.in_use -= 1
            self._records[key].last_used = self._clock()
            if entry.in_use == 0 and entry.unload_requested:
                self._remove(key, "unloads")

    @contextmanager
    def use(self, key: str) -> Iterator[Any]:
        """``with registry.use(avatar) as model:`` acquire and release around a block."""
        value = self.acquire(key)
        try:
            yield value
        finally:
            self.release(key)

    # ---- control ------------------------------------------------------------------

    def load(self, key: str) -> str:
        """Preload ``key``: 'resident' if it already was, 'loaded' once it is. An explicit
        load retries at once even while a failure is remembered (an operator asked), and
        does not count as a use. Raises LoadFailed like ``acquire``."""
        with self._lock:
            if key in self._resident:
                return "resident"
            self._record(key).failure = None
        self._acquire(key, count_use=False)
        self.release(key)
        return "loaded"

    def unload(self, key: str) -> str:
        """Drop ``key``'s model. It is *deferred* while in use (or while its load runs): the
        model goes when its last user releases it, and requests until then are still
        served. Returns 'unloaded', 'deferred' or 'not_resident'. A later request loads it
        again; a remembered failure is kept."""
        with self._lock:
            entry = self._resident.get(key)
            if entry is None:
                pending = self._loading.get(key)
                if pending is None:
                    return "not_resident"
                pending.unload_requested = True
                return "deferred"
            if entry.in_use:
                entry.unload_requested = True
                return "deferred"
            self._remove(key, "unloads")
            return "unloaded"

    def expire_idle(self) -> list[str]:
        """Unload the models not used for ``idle_timeout_s`` (none in use); their keys, sorted."""
        if self.idle_timeout_s is None:
            return []
        with self._lock:
            now = self._clock()
            idle = sorted(key for key, entry in self._resident.items()
                          if entry.in_use == 0 and now - _last_active(self._records[key]) >= self.idle_timeout_s)
            for key in idle:
                self._remove(key, "expired")
            return idle

    # ---- reporting ----------------------------------------------------------------

    def list(self) -> list[dict[str, Any]]:
        """One dict per known model (resident, loading, evicted or failed), sorted by id."""
        with self._lock:
            return self._list()

    def stats(self) -> dict[str, Any]:
        """Totals: capacity, bytes used, counters since start, the policy."""
        with self._lock:
            return self._stats()

    def report(self) -> dict[str, Any]:
        """``{"stats": stats(), "models": list()}`` taken at one instant: what a replica sends
        to the server's ``ModelDirectory.update``."""
        with self._lock:
            return {"stats": self._stats(), "models": self._list()}

    # ---- internals (_acquire and _run_load take the lock; the others expect it held) --

    def _acquire(self, key: str, *, count_use: bool) -> Any:
        with self._lock:
            record = self._record(key)
            record.requests += count_use
            entry = self._resident.get(key)
            if entry is not None:
                entry.in_use += 1
                if count_use:
                    self._counts["hits"] += 1
                    record.uses += 1
                    record.last_used = self._clock()
                return entry.value
            pending = self._loading.get(key)
            loads_here = pending is None
            if loads_here:
                self._check_failure(key, record)
                pending = self._start_load(key, record)
            else:
                pending.holders += 1
                self._counts["joined"] += 1
            pending.uses += count_use
        if loads_here:
            self._run_load(key, pending)
        else:
            pending.done.wait()
        if pending.error is not None:  # a fresh exception per thread: tracebacks are per raise
            raise type(pending.error)(key, pending.error.reason)
        return pending.value

    def _record(self, key: str) -> _Record:
        record = self._records.get(key)
        if record is None:
            if len(self._records) >= HISTORY_LIMIT:
                idle = [k for k in self._records if k not in self._resident and k not in self._loading]
                if idle:
                    del self._records[min(idle, key=lambda k: self._records[k].touched)]
            record = self._records[key] = _Record()
        record.touched = self._clock()
        return record

    def _check_failure(self, key: str, record: _Record) -> None:
        if record.failure is None:
            return
        ago = self._clock() - record.failed_at
        if ago < self.retry_after_s:
            self._counts["rejected"] += 1
            raise LoadFailed(key, f"{record.failure} (failed {ago:.1f} s ago; "
                                  f"not retried for another {self.retry_after_s - ago:.1f} s)")

    def _start_load(self, key: str, record: _Record) -> _Pending:
        pending = _Pending()
        if record.nbytes is not None and record.nbytes <= self.capacity_bytes:
            self._make_room(key, record.nbytes)  # before loading: the device never exceeds the budget
            pending.reserved = record.nbytes
            self._reserved += record.nbytes
        self._loading[key] = pending
        self._counts["misses"] += 1
        return pending

    def _run_load(self, key: str, pending: _Pending) -> None:
        """Call the loader without the lock, then admit the model (or record why not) and wake
        the waiters. Runs in the thread that started the load."""
        value, nbytes, error = None, 0, None
        try:
            result = self._loader(key)
            if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], int)
                    and not isinstance(result[1], bool) and result[1] >= 0):
                raise TypeError(f"loader must return (model, nbytes >= 0), got {type(result).__name__}")
            value, nbytes = result
        except BaseException as e:  # noqa: BLE001 - any loader error is reported; waiters must wake
            error = e
        with self._lock:
            del self._loading[key]
            self._reserved -= pending.reserved
            record = self._records[key]
            try:
                if error is not None:
                    raise LoadFailed(key, f"{type(error).__name__}: {error}")
                record.nbytes = nbytes
                if nbytes > self.capacity_bytes:
                    raise LoadFailed(key, f"{nbytes} bytes, larger than the registry's whole capacity "
                                          f"of {self.capacity_bytes} bytes")
                self._make_room(key, nbytes)
            except CapacityExhausted as e:
                pending.error = e
            except LoadFailed as e:
                record.failure, record.failed_at = e.reason, self._clock()
                self._counts["failures"] += 1
                pending.error = e
            else:
                now = self._clock()
                self._resident[key] = _Entry(value, nbytes, in_use=pending.holders,
                                             unload_requested=pending.unload_requested)
                self._used += nbytes
                self._counts["loads"] += 1
                record.loads += 1
                record.uses += pending.uses
                record.loaded_at = now
                if pending.uses:
                    record.last_used = now
                record.failure = None
                pending.value = value
            pending.done.set()
        if error is not None and not isinstance(error, Exception):
            raise error  # KeyboardInterrupt and the like: reported to waiters, then re-raised

    def _make_room(self, key: str, nbytes: int) -> None:
        """Evict unused models, in policy order, until ``nbytes`` fit; evict nothing and raise
        CapacityExhausted if even evicting every unused model would not make enough room."""
        needed = self._used + self._reserved + nbytes - self.capacity_bytes
        if needed <= 0:
            return
        victims, freed = [], 0
        for other in sorted((k for k, e in self._resident.items() if e.in_use == 0), key=self._eviction_order):
            if freed >= needed:
                break
            victims.append(other)
            freed += self._resident[other].nbytes
        if freed < needed:
            busy = sum(1 for e in self._resident.values() if e.in_use)
            raise CapacityExhausted(key, f"no room for {nbytes} bytes: capacity {self.capacity_bytes}, "
                                         f"{self._used} used ({busy} models in use), {self._reserved} "
                                         f"reserved for loads in flight; try again when a model is released")
        for other in victims:
            self._remove(other, "evictions")

    def _eviction_order(self, key: str) -> tuple:
        record = self._records[key]
        return (_last_active(record),) if self.policy == "lru" else (record.uses, _last_active(record))

    def _remove(self, key: str, counter: str) -> None:
        entry = self._resident.pop(key)
        self._used -= entry.nbytes
        self._counts[counter] += 1

    def _list(self) -> list[dict[str, Any]]:
        now = self._clock()
        models = []
        for key in sorted(self._records):
            record, entry = self._records[key], self._resident.get(key)
            models.append({
                "id": key,
                "bytes": record.nbytes,
                "loads": record.loads,
                "uses": record.uses,
                "requests": record.requests,
                "last_used_s_ago": None if record.last_used is None else now - record.last_used,
                "resident": entry is not None,
                "loading": key in self._loading,
                "in_use": entry.in_use if entry is not None else 0,
                "failed": record.failure,
                "retry_in_s": (max(0.0, self.retry_after_s - (now - record.failed_at))
                               if record.failure is not None else None),
            })
        return models

    def _stats(self) -> dict[str, Any]:
        return {"capacity_bytes": self.capacity_bytes, "used_bytes": self._used, "reserved_bytes": self._reserved,
                "resident": len(self._resident), "loading": len(self._loading),
                "in_use": sum(1 for e in self._resident.values() if e.in_use),
                **self._counts, "policy": self.policy, "idle_timeout_s": self.idle_timeout_s}


def _last_active(record: _Record) -> float:
    """When the model was last used, or loaded if never used since (a preload counts)."""
    if record.last_used is not None:
        return record.last_used
    return record.loaded_at if record.loaded_at is not None else float("-inf")
