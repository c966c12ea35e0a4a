"""Run a Mind Mirror pipeline: one process, or one per rank under torchrun.

    python launch/mirror.py                                   # embedded default, one process
    torchrun --standalone --nproc-per-node 3 launch/mirror.py # rank 0 web + ingest/display,
                                                              # rank 1 vision, rank 2 generator
    python launch/mirror.py --config configs/mirror-2node.yaml --dry-run --world-size 8 --nnodes 2
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


from runtime.config import load_config
from runtime.config_loader import ConfigError
from runtime.dist import cuda_devices, destroy_distributed, init_distributed, launch_from_env
from runtime.log import init_logger
from runtime.planner import PlanError, format_plan, plan


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config; omitted: the embedded default mirror pipeline")
    p.add_argument("--host", help="address the web server binds (overrides server.host)")
    p.add_argument("--port", type=int, help="web server port (overrides server.port)")
    p.add_argument("--dry-run", action="store_true", help="print the rank plan and exit")
    p.add_argument("--world-size", type=int, help="with --dry-run: ranks to plan for")
    p.add_argument("--nnodes", type=int, help="with --dry-run: nodes to plan for")
    p.add_argument("--gpus-per-node", type=int, help="with --dry-run: GPUs per node (default: this machine's)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    where = launch_from_env()
    log = init_logger(where.rank, "starting")
    overrides = {k: v for k, v in {"server.host": args.host, "server.port": args.port}.items() if v is not None}
    try:
        config = load_config(args.config, overrides)
        if args.dry_run:
            world = args.world_size or where.world_size
            the_plan = plan(config.pipeline, world, args.nnodes or 1,
                            cuda_devices() if args.gpus_per_node is None else args.gpus_per_node)
            sys.stdout.write(format_plan(the_plan, config.transport.backend) + "\n")
            return 0
        the_plan = plan(config.pipeline, where.world_size, where.nnodes, cuda_devices())
        where.check_matches(the_plan.ranks[where.rank].node, the_plan.ranks[where.rank].local_rank)
    except PlanError as e:
        log.error("cannot place the pipeline: %s", e.in_config())
        return 2
    except (ConfigError, RuntimeError) as e:
        log.error("%s", e)
        return 2

    from runtime.rank_runtime import RankRuntime  # heavy imports only for a real run
    import torch

    torch.set_num_threads(config.compute.torch_threads)
    log = init_logger(where.rank, the_plan.ranks[where.rank].role, config.compute.log_level)
    runtime = RankRuntime(config, the_plan, where.rank)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda s, _f: runtime.note_signal(signal.Signals(s).name))
    if the_plan.world_size > 1:
        init_distributed(the_plan.backend(config.transport.backend), config.transport.init_timeout_s)
    clean = True
    try:
        runtime.start()
        if runtime.url:
            sys.stdout.write(f"Mind Mirror is running: open {runtime.url}\n")
            sys.stdout.flush()
        runtime.wait()
    except Exception as e:
        runtime.fail(f"{type(e).__name__}: {e}")
    finally:
        runtime.close()
        if the_plan.world_size > 1:
            clean = destroy_distributed(runtime.shutdown_budget())
    if not clean:
        os._exit(1)  # a peer left the group wedged; threads may still hold it
    return 0 if runtime.failure is None else 1


if __name__ == "__main__":
    sys.exit(main())
