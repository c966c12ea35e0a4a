"""One rank of the between-hosts transport benchmark, started inside a network namespace.

    ip netns exec NS python -m runtime.bench.multihost_ranks --rank R --master ADDR:PORT \
        --jobs jobs.json --out samples.json

The two ranks form a gloo world over the namespaces' veth pair (``GLOO_SOCKET_IFNAME``
names the interface) and run the jobs listed in ``jobs.json`` in order, each on both
ranks at once: ``raw`` (bare ``send``/``recv`` on the default group), ``channel`` (our
channel as the runtime builds it between nodes: a TCP socket link) and ``channel_gloo``
(the torch.distributed link on gloo, ``transport.between_nodes: gloo``). The methods are
those of the same-host transport benchmark (``runtime.bench.transport_ranks``), so the
two sections measure the same thing on different wires. Rank 0 writes its timings to
``--out``; both ranks exit non-zero with the traceback on stderr if anything fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from comms.config import TransportConfig
from comms.link_spec import Transport
from runtime.bench.transport_ranks import ChannelPath, Job, Payload, RawPath, run_job
from runtime.dist import destroy_distributed

METHODS = ("raw", "channel", "channel_gloo")
GROUP_TIMEOUT_S = 120.0
"""Bound on every gloo wait of the default group (raw transfers, barriers)."""


def job_to_dict(job: Job) -> dict:
    payload = job.payload
    return {"method": job.method, "label": payload.label, "dtype": str(payload.dtype).removeprefix("torch."),
            "shape": list(payload.shape), "messages": job.messages, "pings": job.pings}


def job_from_dict(data: dict) -> Job:
    payload = Payload(data["label"], getattr(torch, data["dtype"]), tuple(data["shape"]))
    return Job(data["method"], payload, int(data["messages"]), int(data["pings"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, choices=(0, 1), required=True)
    p.add_argument("--master", required=True, help="ADDR:PORT of rank 0's rendezvous")
    p.add_argument("--jobs", type=Path, required=True, help="JSON list of jobs (job_to_dict)")
    p.add_argument("--out", type=Path, help="rank 0: where its timings go (JSON)")
    args = p.parse_args(argv)
    jobs = [job_from_dict(d) for d in json.loads(args.jobs.read_text())]
    unknown = {job.method for job in jobs} - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; this benchmark runs {', '.join(METHODS)}")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}", rank=args.rank, world_size=2,
                            timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    methods = {"raw": RawPath(args.rank), "channel": ChannelPath(args.rank, Transport.TCP, TransportConfig()),
               "channel_gloo": ChannelPath(args.rank, Transport.TORCH, TransportConfig())}
    samples = [run_job(methods, args.rank, job) for job in jobs]
    for method in methods.values():
        method.close()
    destroy_distributed(10.0)
    if args.rank == 0 and args.out is not None:
        args.out.write_text(json.dumps([asdict(sample) for sample in samples]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
