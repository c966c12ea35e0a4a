"""Section 'multihost': the runtime between two hosts, on one machine.

    python launch/bench.py --sections multihost [--quick] [--rounds N]

The two "hosts" are Linux network namespaces joined by a veth pair
(``runtime.bench.virtual_hosts.veth_pair``): every byte between them crosses a network
device and the kernel's TCP stack, not loopback. Two parts, one after the other on the
same pair:

- transport (``multihost_transport``): our channel as the runtime builds it between two
  nodes against raw gloo send/recv, the figures and targets of section 'transport'
  (channel / raw throughput >= 0.9x at every payload of >= 1 MB, p50 <= 1.5x at 32 KB);
- pipeline (``multihost_pipeline``): the default mirror pipeline, 4 ranks on one host vs
  2 on each of two hosts, at the fixed input rate: output FPS, glass-to-glass p50/p95,
  per-hop time and bytes.

Needs root and iproute2 (namespaces); without them the section is skipped, saying why.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from contextlib import ExitStack

import torch

from runtime.bench import multihost_pipeline, multihost_transport
from runtime.bench.options import BenchOptions
from runtime.bench.progress import Progress
from runtime.bench.results import PlotSpec, SectionResult
from runtime.bench.virtual_hosts import Host, VirtualHostsUnavailable, unavailable_reason, veth_pair

TITLE = "Between two hosts: channel vs raw gloo, and the mirror pipeline on one host vs two"
COLUMNS = multihost_transport.COLUMNS + multihost_pipeline.COLUMNS
"""One list for both parts: each part's table shows the columns its rows fill."""
PLOTS = [
    PlotSpec(file="multihost_throughput.png", title="Between hosts: one-way throughput by payload", x="size_label",
             y="mb_per_s", series="method", ylabel="MB/s"),
    PlotSpec(file="multihost_latency_p50.png", title="Between hosts: one-way latency p50 by payload",
             x="size_label", y="p50_us", series="method", ylabel="µs (log)", log_y=True),
]
MTU = re.compile(r"\bmtu (\d+)\b")


def steps(options: BenchOptions) -> int:
    """One for the transport part, one per pipeline placement; one when skipped."""
    if unavailable_reason() is not None:
        return 1
    return 1 + multihost_pipeline.steps()


def run(options: BenchOptions, progress: Progress) -> SectionResult:
    options.out_dir.mkdir(parents=True, exist_ok=True)
    plan = multihost_transport.plan_of(options)
    load_before = os.getloadavg()
    with ExitStack() as stack:
        try:
            hosts = stack.enter_context(veth_pair())
        except VirtualHostsUnavailable as e:  # not root, no iproute2, or the kernel refused
            progress.step(f"multihost: skipped, {e}")
            return SectionResult(name="multihost", title=TITLE, skipped=f"{e} (the two hosts are network namespaces)")
        mtu = mtu_of(hosts[0])
        progress.start(f"multihost: {', '.join(plan.methods)} across the veth pair")
        rounds, transport_usage = multihost_transport.measure(hosts, plan, options.out_dir)
        progress.step()
        pipeline_rows, pipeline_details = multihost_pipeline.measure(hosts, options, progress)
    transport_rows = multihost_transport.rows_of(plan, rounds)
    setup = {"hosts": [{"namespace": h.namespace, "interface": h.interface, "address": h.address} for h in hosts],
             "mtu": mtu, "load_before": load_before, "load_after": os.getloadavg()}
    spread = multihost_transport.spread(plan, rounds)
    notes = [setup_note(setup), multihost_transport.information(transport_rows), *([spread] if spread else []),
             multihost_transport.note(plan, transport_usage), *multihost_pipeline.notes(options, pipeline_details)]
    return SectionResult(name="multihost", title=TITLE, columns=COLUMNS, rows=transport_rows + pipeline_rows,
                         targets=multihost_transport.targets_of(transport_rows), notes=notes, plots=PLOTS,
                         details={"setup": setup, "transport": multihost_transport.details(plan, rounds),
                                  "pipeline": pipeline_details})


def mtu_of(host: Host) -> int | None:
    """The MTU of ``host``'s veth end, as the kernel reports it (None if unreadable)."""
    shown = subprocess.run(["ip", "-n", host.namespace, "-o", "link", "show", host.interface],
                           check=False, capture_output=True, text=True, timeout=20)
    match = MTU.search(shown.stdout)
    return int(match.group(1)) if match else None


def setup_note(setup: dict) -> str:
    a, b = setup["hosts"]
    mtu = "unknown" if setup["mtu"] is None else str(setup["mtu"])
    before, after = (" / ".join(f"{x:.2f}" for x in setup[key]) for key in ("load_before", "load_after"))
    return (f"Hosts: network namespaces {a['namespace']} ({a['address']}) and {b['namespace']} ({b['address']}) "
            f"joined by one veth pair (eth0 in each, MTU {mtu}), made for this section and removed after it; the "
            f"traffic between them crosses the kernel's TCP stack, on this machine's {os.cpu_count()} CPU cores "
            f"(both hosts share them). torch {torch.__version__}, Python {sys.version.split()[0]}. Load average "
            f"(1/5/15 min) {before} at the start, {after} at the end: what else ran on the machine.")
