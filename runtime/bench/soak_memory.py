"""Every rank's resident memory (RSS) during a soak: which processes are the ranks, and a series
of samples per rank.

The ranks are found from the server's port, so the same code serves a job the soak started
and one it attaches to: rank 0 is the process listening on the port; under torchrun (or any
launcher that sets ``WORLD_SIZE``/``MASTER_PORT`` the torchrun way) the other ranks of this
machine are rank 0's siblings that run the same command line with the same ``MASTER_PORT``,
and each one's number is its ``RANK``. Ranks on other machines are out of reach and left out
(the report says how many ranks it watched out of ``WORLD_SIZE``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psutil

MiB = 1 << 20


@dataclass(frozen=True, kw_only=True, slots=True)
class RankProcess:
    rank: int
    pid: int


@dataclass(kw_only=True, slots=True)
class RankMemory:
    """The RSS samples of one rank, oldest first."""

    rank: int
    pid: int
    samples: list[tuple[float, int]] = field(default_factory=list)
    """(``time.monotonic()``, RSS in bytes)."""
    gone_at: float | None = None
    """When the process was first found gone (a rank that died mid-soak)."""

    def at(self, when: float) -> int | None:
        """RSS of the last sample taken at or before ``when`` (None if none was)."""
        before = [rss for t, rss in self.samples if t <= when]
        return before[-1] if before else None

    def max_after(self, when: float) -> int | None:
        after = [rss for t, rss in self.samples if t >= when]
        return max(after) if after else None


def listener_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` (any address), or None."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return conn.pid
    return None


def find_ranks(port: int) -> tuple[list[RankProcess], int]:
    """(the ranks of this machine, sorted by rank; the job's world size) of the server on
    ``port``. Raises ``LookupError`` when nothing listens there or it cannot be read."""
    pid = listener_pid(port)
    if pid is None:
        raise LookupError(f"no process listens on port {port} (or it belongs to another user)")
    try:
        rank0 = psutil.Process(pid)
        env = rank0.environ()
        world = int(env.get("WORLD_SIZE", "1"))
        if world == 1:
            return [RankProcess(rank=0, pid=pid)], 1
        command, master = rank0.cmdline(), env.get("MASTER_PORT")
        parent = rank0.parent()
        siblings = parent.children() if parent is not None else [rank0]
    except (psutil.Error, ValueError) as e:
        raise LookupError(f"cannot read the process on port {port} (pid {pid}): {e}") from e
    ranks = []
    for proc in siblings:
        try:
            penv = proc.environ()
            if proc.cmdline() == command and penv.get("MASTER_PORT") == master and "RANK" in penv:
                ranks.append(RankProcess(rank=int(penv["RANK"]), pid=proc.pid))
        except (psutil.Error, ValueError):
            continue  # exited meanwhile, or not ours to read: not a rank we can watch
    return sorted(ranks, key=lambda r: r.rank), world


class RssSampler:
    """One ``RankMemory`` per rank; ``sample()`` appends a sample to each."""

    def __init__(self, ranks: list[RankProcess]) -> None:
        self.ranks = {r.rank: RankMemory(rank=r.rank, pid=r.pid) for r in ranks}
        self._procs = {r.rank: psutil.Process(r.pid) for r in ranks}

    def sample(self, now: float) -> None:
        for rank, memory in self.ranks.items():
            if memory.gone_at is not None:
                continue
            try:
                proc = self._procs[rank]
                if not proc.is_running():  # also false for a reused pid
                    raise psutil.NoSuchProcess(proc.pid)
                memory.samples.append((now, proc.memory_info().rss))
            except psutil.NoSuchProcess:
                memory.gone_at = now

    @property
    def gone(self) -> list[int]:
        return [rank for rank, memory in self.ranks.items() if memory.gone_at is not None]
