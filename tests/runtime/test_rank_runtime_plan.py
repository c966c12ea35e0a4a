"""What a rank builds from its plan, checked without starting processes."""

from runtime.config import load_config
from runtime.planner import plan
from runtime.rank_runtime import RankRuntime


def link_backend(world_size: int, gpus_per_node: int, requested: str = "auto") -> str:
    config = load_config(None, {"transport.backend": requested})
    runtime = RankRuntime(config, plan(config.pipeline, world_size, 1, gpus_per_node), rank=1)
    return runtime._link_transport().backend


def test_ranks_sharing_one_gpu_never_get_nccl_links():
    # 3 ranks on a 1-GPU node: vision and generator both on cuda:0, where NCCL refuses.
    assert link_backend(3, gpus_per_node=1) == "gloo"


def test_ranks_with_their_own_gpus_let_each_link_choose():
    assert link_backend(3, gpus_per_node=2) == "auto"  # NCCL GPU<->GPU, gloo to rank 0's CPU
    assert link_backend(3, gpus_per_node=0) == "gloo"
    assert link_backend(3, gpus_per_node=2, requested="gloo") == "gloo"
