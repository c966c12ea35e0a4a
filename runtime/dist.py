"""Process-group lifecycle: where this process sits, init, and a teardown that cannot hang."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Launch:
    """Where torchrun put this process (or a lone process: rank 0 of 1)."""

    rank: int
    world_size: int
    local_world_size: int
    local_rank: int
    node: int

    @property
    def nnodes(self) -> int:
        # torchrun gives every node the same --nproc-per-node, so this divides exactly.
        return max(1, self.world_size // max(1, self.local_world_size))


    def check_matches(self, node: int, local_rank: int) -> None:
        """The plan assumes torchrun's node-major rank order; refuse to run (and pick the
        wrong GPU) if this process was placed differently."""
        if (node, local_rank) != (self.node, self.local_rank):
            raise RuntimeError(
                f"rank {self.rank} is local rank {self.local_rank} on node {self.node}, but the plan "
                f"expects local rank {local_rank} on node {node}: launch with torchrun and the same "
                f"--nproc-per-node on every node")


def launch_from_env() -> Launch:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return Launch(rank=rank, world_size=world, local_world_size=local_world,
                  local_rank=int(os.environ.get("LOCAL_RANK", str(rank % local_world))),
                  node=int(os.environ.get("GROUP_RANK", str(rank // local_world))))


def init_distributed(backend: str, timeout_s: float) -> None:
    """Join the job's process group (env:// rendezvous set up by torchrun).

    ``backend`` is 'gloo' or 'nccl'. With NCCL the default group still gets a gloo
    side ("cpu:gloo,cuda:nccl") because headers, credits and control always travel
    on CPU; NCCL carries only tensor payloads between GPUs.
    """
    # Make a failed or timed-out NCCL operation abort the communicator and raise,
    # instead of leaving a rank blocked forever inside a collective.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    spec = "cpu:gloo,cuda:nccl" if backend == "nccl" else "gloo"
    dist.init_process_group(backend=spec, timeout=timedelta(seconds=timeout_s))
    log.info("process group ready: backend %s, rank %d of %d", spec, dist.get_rank(), dist.get_world_size())


def destroy_distributed(timeout_s: float) -> bool:
    """Destroy the process group, giving up after ``timeout_s`` (a dead peer can make
    the destroy block); returns False when it had to give up."""
    if not dist.is_initialized():
        return True
    done = threading.Event()

    def destroy() -> None:
        try:
            dist.destroy_process_group()
        except Exception as e:  # a broken peer: nothing left to release cleanly
            log.warning("destroy_process_group: %s", e)
        done.set()

    threading.Thread(target=destroy, name="destroy-pg", daemon=True).start()
    if not done.wait(timeout_s):
        log.error("destroy_process_group did not return in %.0f s; exiting anyway", timeout_s)
        return False
    return True


def cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
