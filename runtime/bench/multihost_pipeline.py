"""The pipeline part of section 'multihost': the mirror pipeline on one host vs two hosts.

The default mirror pipeline (embedded config, style-net generator) with ``RANKS`` ranks —
rank 0 server+ingest+display, rank 1 vision, the others generators — in two placements:

- one host: every rank in host A's namespace (one torchrun agent);
- two hosts: ranks 0-1 on host A, 2-3 on host B (an agent in each namespace), so the
  vision -> generator and generator -> display hops cross the veth pair.

Both use torchrun's static rendezvous on host A's address, ``--node-rank`` pinning rank
0 to host A (c10d's ``is_host`` does not, in torch 2.13), and ``GLOO_SOCKET_IFNAME=eth0``:
the single-host run differs from the two-host one only by where the ranks are. The
benchmark client (``runtime.bench.client``, via ``remote_client``) runs inside host A,
where rank 0's server listens on 127.0.0.1, and streams the 640x480 fixture at
``options.fps``; rows use section 'pipeline''s own figures (``pipeline.run_row``), and
the per-hop time and bytes come from the server's stats, as there.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.bench import pipeline
from runtime.bench.client import ClientResult, ClientSettings
from runtime.bench.jobs import LAUNCHER, JobError, PipelineJob
from runtime.bench.options import BenchOptions
from runtime.bench.pipeline import FIXTURE, Layout
from runtime.bench.progress import Progress
from runtime.bench.remote_client import run_in as run_client_in
from runtime.bench.results import Column
from runtime.bench.stats import ratio
from runtime.bench.sysmon import SysMonitor, Usage
from runtime.bench.virtual_hosts import Host
from runtime.config import config_from_dict
from runtime.planner import LinkKind, plan

PART = "Mirror pipeline, default config: one host vs two hosts"
RANKS = 4
RANKS_PER_HOST = 2
RDZV_TIMEOUT_S = 60
RDZV_PORTS = {"one-host": 29400, "two-hosts": 29401}
"""Rendezvous port per placement on host A. The namespaces are made for the section, so
nothing else can hold a port there; one port each keeps a run clear of the previous
run's sockets in TIME_WAIT."""


@dataclass(frozen=True, slots=True)
class Placement:
    layout: Layout
    """What section 'pipeline' calls a layout: name, key, ranks, config, generator."""
    ranks_per_host: tuple[int, ...]
    """Ranks on host A, host B, ... (host A's agent is node 0: it gets rank 0)."""


def placements() -> list[Placement]:
    def layout(key: str, name: str) -> Layout:
        return Layout(key=key, name=name, world_size=RANKS, config={}, generator="stylenet")

    return [Placement(layout("one-host", f"one host, {RANKS} ranks"), (RANKS,)),
            Placement(layout("two-hosts", f"two hosts, {RANKS_PER_HOST} + {RANKS - RANKS_PER_HOST} ranks"),
                      (RANKS_PER_HOST, RANKS - RANKS_PER_HOST))]


# -- the job -----------------------------------------------------------------------


class NodeJob(PipelineJob):
    """One host's share of a mirror job: a torchrun agent inside the host's namespace,
    joining the static rendezvous on ``head``. Everything else (log, readiness from rank
    0's line, an orderly stop of this host's ranks) is ``PipelineJob``'s; its
    ``world_size`` is the ranks of this host."""

    def __init__(self, host: Host, *, head: Host, node_rank: int, nnodes: int, nproc: int, rdzv_port: int,
                 name: str, out_dir: Path) -> None:
        super().__init__({}, name=name, out_dir=out_dir, world_size=nproc)
        self.host, self.head = host, head
        self.node_rank, self.nnodes, self.rdzv_port = node_rank, nnodes, rdzv_port

    def command(self) -> list[str]:
        # In a namespace the machine's hostname resolves to no address of it: name the
        # interface gloo uses and the address torchrun advertises.
        return self.host.command(
            "env", f"GLOO_SOCKET_IFNAME={self.host.interface}",
            sys.executable, "-m", "torch.distributed.run", "--nnodes", str(self.nnodes),
            "--nproc-per-node", str(self.world_size), "--node-rank", str(self.node_rank),
            "--rdzv-backend", "static", "--rdzv-endpoint", f"{self.head.address}:{self.rdzv_port}",
            "--rdzv-conf", f"timeout={RDZV_TIMEOUT_S}", "--local-addr", self.host.address,
            str(LAUNCHER), "--config", str(self.config_path), "--port", "0")


class HostsJob:
    """A mirror job spread over ``hosts`` (``ranks_per_host`` each), started and stopped
    as one: the other hosts' agents are launched first, then host A's, whose rank 0's
    ready line says the job serves."""

    def __init__(self, hosts: tuple[Host, ...], placement: Placement, out_dir: Path) -> None:
        shares = placement.ranks_per_host
        if len(shares) > len(hosts):
            raise ValueError(f"{placement.layout.name}: needs {len(shares)} hosts, got {len(hosts)}")
        self.nodes = [NodeJob(host, head=hosts[0], node_rank=i, nnodes=len(shares), nproc=nproc,
                              rdzv_port=RDZV_PORTS[placement.layout.key],
                              name=f"multihost-{placement.layout.key}-node{i}", out_dir=out_dir)
                      for i, (host, nproc) in enumerate(zip(hosts, shares))]
        self.port: int | None = None
        self._launched: list[NodeJob] = []

    def __enter__(self) -> "HostsJob":
        head, others = self.nodes[0], self.nodes[1:]
        try:
            for node in others:
                node.launch()
                self._launched.append(node)
            self.port = head.start()  # if it fails, it has stopped its own processes
            self._launched.append(head)
        except JobError as e:  # the head's log may only say that a peer never came
            self.stop()
            raise JobError("\n".join([str(e), *(node.log_tail() for node in others)])) from None
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Every host's ranks stopped at once (a rank's orderly stop may wait on a peer's)."""
        with ThreadPoolExecutor(max(1, len(self._launched))) as pool:
            list(pool.map(PipelineJob.stop, self._launched))

    def pids(self) -> list[int]:
        return [pid for node in self.nodes for pid in node.pids()]

    @property
    def startup_s(self) -> float | None:
        return self.nodes[0].startup_s

    def details(self) -> dict[str, Any]:
        """Start-up, stop, whether every host stopped cleanly, the logs, the generators
        that ran (from every host's log)."""
        return {"startup_s": self.startup_s, "stop_s": max(node.stop_s or 0.0 for node in self.nodes),
                "clean_stop": all(node.exit is not None and node.exit.clean for node in self.nodes),
                "returncodes": [node.exit and node.exit.returncode for node in self.nodes],
                "logs": [str(node.log_path) for node in self.nodes],
                "generators_ran": [f"{name} on {device}" for node in self.nodes
                                   for name, device in pipeline.READY.findall(node.log_text())]}


# -- measuring ---------------------------------------------------------------------


def settings_of(options: BenchOptions, port: int) -> ClientSettings:
    duration = pipeline.QUICK_DURATION_S if options.quick else options.duration_s
    return ClientSettings(port=port, jpeg=FIXTURE.read_bytes(), duration_s=duration,
                          warmup_s=pipeline.WARMUP_S[options.quick], fps=options.fps, window=pipeline.MAX_WINDOW)


def measure(hosts: tuple[Host, ...], options: BenchOptions, progress: Progress) -> tuple[list[dict], dict]:
    """One run per placement at the fixed input rate: (rows, details)."""
    rows, details = [], {"runs": {}, "jobs": {}}
    for placement in placements():
        layout = placement.layout
        progress.start(f"multihost: starting the mirror pipeline, {layout.name}")
        with HostsJob(hosts, placement, options.out_dir / "logs") as job:
            progress.start(f"multihost: mirror pipeline, {layout.name}, {options.fps:g} fps in")
            result, usage = _client_run(hosts[0], job, settings_of(options, job.port))
        rows.append({"part": PART, **pipeline.run_row(layout, result, usage)})
        details["runs"][layout.name] = {**pipeline.run_details(result, usage),
                                        "hops_between_hosts": hops_between_hosts(result.stats),
                                        "transports": data_transports(placement)}
        details["jobs"][layout.name] = job.details()
        progress.step()
    add_ratios(rows)
    return rows, details


def _client_run(head: Host, job: HostsJob, settings: ClientSettings) -> tuple[ClientResult, Usage]:
    """The client inside ``head``'s namespace, while the job's CPU use is sampled."""
    with SysMonitor(job.pids) as monitor:
        result = run_client_in(head.command(), settings, FIXTURE)
    return result, monitor.summary(result.window_start, result.window_end)


def hops_between_hosts(stats: dict | None) -> list[str]:
    """The links that carried messages and whose two ends the server's stats place on
    different nodes (one session feeds one generator: the other's links stay idle)."""
    hops = (stats or {}).get("hops", {})
    return sorted(name for name, link in hops.items() if link.get("messages_sent")
                  and "src_node" in link and "dst_node" in link and link["src_node"] != link["dst_node"])


def data_transports(placement: Placement) -> dict[str, str]:
    """Each data link's transport as the planner picks it for ``placement`` (what the
    ranks build: e.g. same-host within a host, tcp between hosts)."""
    config = config_from_dict(placement.layout.config)
    the_plan = plan(config.pipeline, placement.layout.world_size, len(placement.ranks_per_host), 0, config.transport)
    return {link.name: link.describe_transport() for link in the_plan.links if link.kind is LinkKind.DATA}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """The two-host row's FPS and p50 as multiples of the one-host row's."""
    one = next((row for row in rows if row["layout_key"] == "one-host"), None)
    for row in rows:
        if one is not None and row is not one:
            row["fps_vs_one_host"] = ratio(row["fps"], one["fps"])
            row["p50_vs_one_host"] = ratio(row["p50_ms"], one["p50_ms"])


COLUMNS = [
    Column(key="layout", header="placement"),
    Column(key="input", header="input"),
    Column(key="fps", header="output FPS", fmt="{:.1f}"),
    Column(key="p50_ms", header="g2g p50 ms", fmt="{:.1f}"),
    Column(key="p95_ms", header="p95 ms", fmt="{:.1f}"),
    Column(key="sent", header="sent"),
    Column(key="received", header="received"),
    Column(key="cpu_job_pct", header="job CPU % of 1 core", fmt="{:.0f}"),
    Column(key="cpu_other_pct", header="others' CPU %", fmt="{:.0f}"),
    Column(key="fps_vs_one_host", header="FPS ÷ one host", fmt="{:.2f}x"),
    Column(key="p50_vs_one_host", header="p50 ÷ one host", fmt="{:.2f}x"),
]
"""Columns of the pipeline rows (``part`` PART); ``COLUMNS`` of multihost_transport
fill the transport part's table. Keys the two share mean the same in both."""


def notes(options: BenchOptions, details: dict[str, Any]) -> list[str]:
    duration = pipeline.QUICK_DURATION_S if options.quick else options.duration_s
    setup = (f"Pipeline: embedded default config ({RANKS} ranks: server+ingest+display, vision, 2 generators; "
             f"style-net generator on CPU), torchrun static rendezvous on host A, GLOO_SOCKET_IFNAME=eth0 on every "
             f"host; one host = all {RANKS} ranks in host A's namespace, two hosts = ranks 0-1 on A, 2-3 on B. "
             f"Client in host A's namespace (a process of its own: its CPU counts in others' CPU, unlike in "
             f"section 'pipeline', where it runs in the benchmark's process), "
             f"{FIXTURE.name} at {options.fps:g} fps: {pipeline.WARMUP_S[options.quick]:g} s warm-up, "
             f"{duration:g} s measured, one run per placement, one placement after the other.")
    timing = "Job start (launch to serving) / stop: " + ", ".join(
        f"{name} {job['startup_s']:.1f} s / {job['stop_s']:.1f} s" for name, job in details["jobs"].items())
    out = [setup, timing]
    for name, job in details["jobs"].items():
        ran = job["generators_ran"]
        if not ran or any(not entry.startswith("stylenet on ") for entry in ran):
            out.append(f"{name}: expected the style-net generator, the logs show {', '.join(ran) or 'none'}")
        if not job["clean_stop"]:
            out.append(f"{name}: the job did not stop cleanly (exits {job['returncodes']}); see {job['logs']}")
    for label, run in details["runs"].items():
        out += pipeline.run_warnings(label, run)
        crossing = ", ".join(f"{hop} ({run['transports'].get(hop, '?')})" for hop in run["hops_between_hosts"])
        out.append(f"{label}: {pipeline.breakdown(run)}; hops between hosts: {crossing or 'none'}")
    return out


def steps() -> int:
    return len(placements())
