"""The transport part of section 'multihost': our channel against raw gloo between two hosts.

Two processes, one in each namespace of a veth pair (``runtime.bench.multihost_ranks``,
gloo on ``GLOO_SOCKET_IFNAME=eth0``), run one list of jobs: every method of
``multihost_ranks.METHODS`` warmed at every payload, then ``rounds`` rounds of every
method at every payload (method order rotated per round, as in section 'transport', so
machine noise hits all methods alike). Figures are those of section 'transport'
(``transport.figures_of``: streamed MB/s, one-way latency as half a ping-pong), medians
over rounds, ratios to raw between the medians, and its targets against raw (none against
gRPC, which does not run here).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from runtime.bench import stats, transport
from runtime.bench.jobs import REPO
from runtime.bench.multihost_ranks import METHODS, job_to_dict
from runtime.bench.options import BenchOptions
from runtime.bench.results import Target
from runtime.bench.sysmon import SysMonitor, Usage
from runtime.bench.transport import PAYLOADS, Round, figures_of
from runtime.bench.transport_ranks import Job, Payload, Sample
from runtime.bench.virtual_hosts import Host

PART = "Transport between two hosts (veth pair): channel vs raw gloo"
DESCRIPTIONS = {
    "raw": "blocking dist.send/recv of the bare tensor on the default gloo group, into a buffer allocated "
           "beforehand, no header, no flow control: the ceiling",
    "channel": "our channel as the runtime builds it between two nodes (Transport.TCP, a TCP socket link), "
               "TransportConfig defaults, one link per direction",
    "channel_gloo": "our channel on the torch.distributed link over gloo (Transport.TORCH, what "
                    "transport.between_nodes: gloo selects), TransportConfig defaults",
}
"""What each method of ``multihost_ranks.METHODS`` is, for the notes."""
MASTER_PORT = 29500
"""Rank 0's rendezvous port on host A: the namespace is new, so nothing else holds it."""
START_S = 60.0
JOB_S = 30.0
"""The ranks' bound: ``START_S`` plus ``JOB_S`` per job. Far above what a job takes (under
3 s at 200 messages of 2.76 MB); it only stops a run whose ranks hang for good (their
own gloo waits time out first, see ``multihost_ranks.GROUP_TIMEOUT_S``)."""
LOG_TAIL_CHARS = 3000
POLL_S = 0.2


@dataclass(frozen=True, slots=True)
class Plan:
    sizes: tuple[Payload, ...]
    rounds: int
    messages: int
    """Tensors per throughput run."""
    pings: int
    """Round trips per latency run."""
    warmup: int = 3
    """Messages and round trips per method and size before anything is measured."""
    methods: tuple[str, ...] = METHODS


def plan_of(options: BenchOptions) -> Plan:
    """Quick: one round of 20 messages and pings. Full: ``options.rounds`` rounds of 200."""
    if options.quick:
        return Plan(sizes=PAYLOADS, rounds=1, messages=20, pings=20)
    return Plan(sizes=PAYLOADS, rounds=options.rounds, messages=200, pings=200)


def jobs_of(plan: Plan) -> tuple[list[Job], list[list[Job]]]:
    """(the warm-up jobs, each round's jobs), in the order the ranks run them."""
    warmup = [Job(method, payload, plan.warmup, plan.warmup) for payload in plan.sizes for method in plan.methods]
    rounds = [transport.round_jobs(plan.methods, plan.sizes, plan.messages, plan.pings, index)
              for index in range(plan.rounds)]
    return warmup, rounds


def rounds_of(warmup: list[Job], rounds: list[list[Job]], samples: list[Sample]) -> list[Round]:
    """Each round's figures from rank 0's samples, which follow the job list (warm-up first)."""
    expected = len(warmup) + sum(len(jobs) for jobs in rounds)
    if len(samples) != expected:
        raise RuntimeError(f"multihost ranks: {len(samples)} samples for {expected} jobs")
    measured = iter(samples[len(warmup):])
    return [{(job.method, job.payload.label): figures_of(next(measured), job) for job in jobs} for jobs in rounds]


def rows_of(plan: Plan, rounds: list[Round]) -> list[dict]:
    """Section 'transport''s rows (medians, channel rows' ratios to raw) in this part."""
    return [{"part": PART, **row} for row in transport.rows_of(plan.sizes, rounds, plan.methods)]


def targets_of(rows: list[dict]) -> list[Target]:
    """Section 'transport''s goals against raw, named as between hosts."""
    return [Target(name=f"{target.name}, between hosts", goal=target.goal, measured=target.measured, met=target.met)
            for target in transport.targets_of(rows, against_grpc=False)]


def information(rows: list[dict]) -> str:
    """One line: every channel method's ratios to raw, by payload (channel_gloo's are no
    target, but say what the gloo link costs next to the socket link)."""
    parts = []
    for method in dict.fromkeys(row["method"] for row in rows if row["method"].startswith("channel")):
        figures = [f"{row['size_label']} {row['vs_raw_mb_per_s']:.2f}x MB/s, {row['vs_raw_p50']:.2f}x p50"
                   for row in rows if row["method"] == method]
        parts.append(f"{method} / raw: {'; '.join(figures)}")
    return ("Between hosts, " + " | ".join(parts) + ".") if parts else "Between hosts: no channel method ran."


def spread(plan: Plan, rounds: list[Round]) -> str | None:
    """One line: the smallest and largest per-round value of each ratio a target judges
    (a round's channel against the same round's raw), so a reader can tell a median near a
    bar from noise. None without both channel and raw."""
    if not {"channel", "raw"} <= set(plan.methods):
        return None
    parts = []
    for payload in plan.sizes:
        key = "mb_per_s" if payload.nbytes >= transport.LARGE_BYTES else "p50_us" if payload.label == "32 KB" else None
        if key is None:
            continue
        ratios = [stats.ratio(getattr(r["channel", payload.label], key), getattr(r["raw", payload.label], key))
                  for r in rounds]
        ratios = [value for value in ratios if not math.isnan(value)]
        if ratios:
                parts.append(f"{payload.label} {'MB/s' if key == 'mb_per_s' else 'p50'} "
                         f"{min(ratios):.2f}-{max(ratios):.2f}x")
    return f"channel / raw per round (min-max over {len(rounds)} round(s)): {', '.join(parts) or 'none'}."


COLUMNS = [column for column in transport.COLUMNS if column.key != "vs_grpc_mb_per_s"]


# -- running -----------------------------------------------------------------------


def measure(hosts: tuple[Host, Host], plan: Plan, out_dir: Path) -> tuple[list[Round], Usage]:
    """Every job of ``plan`` on a rank in each host; (the rounds' figures, CPU use meanwhile)."""
    warmup, rounds = jobs_of(plan)
    jobs_file = out_dir / "multihost-jobs.json"
    jobs_file.write_text(json.dumps([job_to_dict(job) for job in warmup + [j for r in rounds for j in r]]))
    samples_file = out_dir / "multihost-samples.json"
    samples_file.unlink(missing_ok=True)
    timeout = START_S + JOB_S * (len(warmup) + sum(len(jobs) for jobs in rounds))
    procs: list[subprocess.Popen] = []
    with SysMonitor(lambda: [proc.pid for proc in procs]) as monitor:
        _run_ranks(hosts, jobs_file, samples_file, out_dir, timeout, procs)
    samples = [Sample(**data) for data in json.loads(samples_file.read_text())]
    return rounds_of(warmup, rounds, samples), monitor.summary()


def rank_command(host: Host, rank: int, master: Host, jobs_file: Path, samples_file: Path) -> list[str]:
    """One rank inside ``host``: gloo on the host's veth end, rendezvous at ``master``."""
    return host.command("env", f"GLOO_SOCKET_IFNAME={host.interface}", sys.executable, "-m",
                        "runtime.bench.multihost_ranks", "--rank", str(rank),
                        "--master", f"{master.address}:{MASTER_PORT}", "--jobs", str(jobs_file),
                        "--out", str(samples_file))


def _run_ranks(hosts: tuple[Host, Host], jobs_file: Path, samples_file: Path, out_dir: Path, timeout: float,
               procs: list[subprocess.Popen]) -> None:
    """Start both ranks (into ``procs``), wait for both; ``RuntimeError`` with the failed
    rank's log if one exits non-zero or they outlive ``timeout``. None is left running."""
    logs = [out_dir / f"multihost-rank{rank}.log" for rank in (0, 1)]
    try:
        for rank, (host, log_path) in enumerate(zip(hosts, logs)):
            with open(log_path, "wb") as log:
                procs.append(subprocess.Popen(rank_command(host, rank, hosts[0], jobs_file, samples_file),
                                              stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                              env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True))
        deadline = time.monotonic() + timeout
        while any(proc.poll() is None for proc in procs):
            # A rank that failed leaves its peer waiting on gloo: say so now, not at the timeout.
            if any(proc.returncode not in (None, 0) for proc in procs):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"multihost ranks still running after {timeout:g} s\n"
                                   + "\n".join(_tail(log) for log in logs))
            time.sleep(POLL_S)
        for rank, proc in enumerate(procs):
            if proc.returncode not in (None, 0):
                raise RuntimeError(f"multihost rank {rank} exited with {proc.returncode}\n{_tail(logs[rank])}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def _tail(path: Path) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return f"--- end of {path} ---\n{text[-LOG_TAIL_CHARS:]}"


def note(plan: Plan, usage: Usage) -> str:
    """How the part ran: processes, methods, what was timed, rounds, others' CPU meanwhile."""
    others = usage.mean.get("other_cpu_pct")
    busy = "" if others is None else (f" Others' CPU meanwhile: mean {others:.0f}%, max "
                                      f"{usage.max['other_cpu_pct']:.0f}% of all cores.")
    methods = "; ".join(f"{method}: {DESCRIPTIONS.get(method, 'see runtime.bench.multihost_ranks')}"
                        for method in plan.methods)
    return (
        f"Transport: 2 processes (runtime.bench.multihost_ranks), rank 0 in host A, rank 1 in host B, gloo "
        f"with GLOO_SOCKET_IFNAME=eth0, one torch thread each, alive for the whole part. Methods: {methods}. "
        f"The targets are judged on channel. Throughput: tensors streamed one way, the clock stopped by the "
        f"receiver's acknowledgement after the last; latency: half a ping-pong round trip. Every method "
        f"warmed with {plan.warmup} messages per size, then {plan.rounds} round(s) of {plan.messages} streamed "
        f"tensors and {plan.pings} ping-pong round trips per method and size, method order rotated per round; "
        f"medians over rounds, ratios between medians." + busy)


def details(plan: Plan, rounds: list[Round]) -> dict:
    return {"methods": list(plan.methods), "messages": plan.messages, "pings": plan.pings,
            "rounds": [[{"method": m, "size_label": s, **asdict(f)} for (m, s), f in r.items()] for r in rounds]}

