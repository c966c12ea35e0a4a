"""Run a Mind Mirror pipeline: one process, or one per rank under torchrun.

    python launch/mirror.py                                   # embedded default, one process
    torchrun --standalone --nproc-per-node 3 launch/mirror.py # rank 0 web + ingest/display,
                                                              # rank 1 vision, rank 2 generator
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc-per-node 3 --max-restarts 3 launch/mirror.py
                                                              # restarts the workers after losing
                                                              # a rank the job cannot do without
    python launch/mirror.py --config configs/mirror-2node.yaml --dry-run --world-size 8 --nnodes 2
    MINDMIRROR_TOKEN=... python launch/mirror.py --host 0.0.0.0 --tls-cert cert.pem --tls-key key.pem
                                                              # for browsers on other machines
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback

from core.config import ConfigError
from runtime.compose import compose, format_part
from runtime.config import ComputeConfig, JobConfig, load_config
from runtime.dist import Launch, cuda_devices, destroy_distributed, init_distributed, launch_from_env
from runtime.lifecycle import JobFailed
from runtime.log import init_logger
from runtime.placement import PlanError
from runtime.planner import format_plan, plan
from stages.server.access import page_url, resolve_token


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config; omitted: the embedded default mirror pipeline")
    p.add_argument("--host", help="address the web server binds (overrides server.host)")
    p.add_argument("--port", type=int, help="web server port (overrides server.port)")
    p.add_argument("--tls-cert", metavar="PEM",
                   help="certificate (chain) file: serve HTTPS/WSS, which browsers on other machines need "
                        "for the camera (overrides server.tls_cert)")
    p.add_argument("--tls-key", metavar="PEM", help="its private key, not encrypted (overrides server.tls_key)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and what every rank runs, then exit")
    p.add_argument("--world-size", type=int, help="with --dry-run: ranks to plan for")
    p.add_argument("--nnodes", type=int, help="with --dry-run: nodes to plan for")
    p.add_argument("--gpus-per-node", type=int, help="with --dry-run: GPUs per node (default: this machine's)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    where = launch_from_env()
    log = init_logger(where.rank, "starting")
    overrides = {k: v for k, v in {"server.host": args.host, "server.port": args.port,
                                   "server.tls_cert": args.tls_cert, "server.tls_key": args.tls_key}.items()
                 if v is not None}
    try:
        config = load_config(args.config, overrides)
        token = resolve_token(config.server.token)  # a bad MINDMIRROR_TOKEN fails here, not at start
        if args.dry_run:
            sys.stdout.write(dry_run(config, args, where) + "\n")
            return 0
        the_plan = plan(config.pipeline, where.world_size, where.nnodes, cuda_devices(), config.transport)
        me = the_plan.ranks[where.rank]
        where.check_matches(me.node, me.local_rank)
        from runtime.rank_loss import Restarts
        from runtime.rank_runtime import RankRuntime  # heavy imports only for a real run

        restarts = Restarts.from_environment()
        runtime = RankRuntime(config, the_plan, where.rank, restarts=restarts)
    except (ConfigError, RuntimeError) as e:
        # Every rank reads the same file: one line per node is enough.
        if where.local_rank == 0:
            log.error("%s", e.in_config() if isinstance(e, PlanError) else e)
        return 2

    setup_compute(config.compute)
    log = init_logger(where.rank, me.role, config.compute.log_level)
    if where.rank == 0 and restarts.problem():
        log.warning("%s", restarts.problem())
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda s, _f: runtime.note_signal(signal.Signals(s).name))
    if the_plan.world_size > 1:
        init_distributed(the_plan.backend, config.transport.init_timeout_s)
    try:
        runtime.start()
        if runtime.url:
            sys.stdout.write(f"Mind Mirror is running: open {page_url(runtime.url, token)}\n")
            sys.stdout.flush()
        runtime.wait()
    except JobFailed:
        pass  # logged where the failure was found
    except Exception:
        # A bug: the other ranks must still stop in order, and the traceback must survive.
        runtime.fail("unexpected error (traceback follows in this rank's log)")
        if not shut_down(runtime):
            traceback.print_exc()
            os._exit(1)
        raise
    if not shut_down(runtime):
        os._exit(1)  # a peer left the group wedged; threads may still hold it
    return 0 if runtime.failure is None else 1


def shut_down(runtime) -> bool:
    """Stop every piece of this rank in order, then leave the process group; False when
    the group could not be left in time."""
    runtime.close()
    if runtime.plan.world_size > 1:
        return destroy_distributed(runtime.shutdown_budget())
    return True


def setup_compute(compute: ComputeConfig) -> None:
    """Threads per process, set once here for every stage of this process: the ranks of a
    node share its cores, and a pool per library per rank would oversubscribe them."""
    import cv2
    import torch

    torch.set_num_threads(compute.torch_threads)
    if compute.opencv_threads:
        cv2.setNumThreads(compute.opencv_threads)


def dry_run(config: JobConfig, args: argparse.Namespace, where: Launch) -> str:
    """The plan for the layout asked for, and what each of its ranks would run."""
    world = args.world_size or where.world_size
    gpus = cuda_devices() if args.gpus_per_node is None else args.gpus_per_node
    the_plan = plan(config.pipeline, world, args.nnodes or 1, gpus, config.transport)
    parts = [format_part(compose(the_plan, rank, config)) for rank in range(the_plan.world_size)]
    return "\n".join([format_plan(the_plan), *parts])


if __name__ == "__main__":
    sys.exit(main())
