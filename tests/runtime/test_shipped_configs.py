"""Every config the project ships loads, builds its stages' sections and plans."""

from pathlib import Path

import pytest

from runtime.compose import compose
from runtime.config import load_config
from runtime.planner import plan

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
LAYOUT = {"local.yaml": (1, 1), "mirror-2node.yaml": (8, 2), "mirror-diffusion.yaml": (8, 2),
          "lipsync.yaml": (4, 1), "lipsync-local.yaml": (1, 1)}
"""(world size, nodes) each config is written for (its header comment); others: 3 ranks, 1 node."""


def test_configs_are_found():
    assert {p.name for p in CONFIGS} >= {"local.yaml", "mirror.yaml", "mirror-lowfi.yaml", "mirror-2node.yaml",
                                         "mirror-diffusion.yaml", "lipsync.yaml", "lipsync-local.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_plans(path):
    config = load_config(path, {})
    world, nnodes = LAYOUT.get(path.name, (3, 1))
    layout = plan(config.pipeline, world, nnodes=nnodes, gpus_per_node=0, transport=config.transport)
    for rank in range(world):
        compose(layout, rank, config)
    for spec in config.pipeline.stages:
        config.stage_config(spec)  # the stage's own section, with its per-stage options


def test_lowfi_config_selects_the_lowfi_generator():
    config = load_config(Path(CONFIGS[0]).parent / "mirror-lowfi.yaml", {})
    generator = next(s for s in config.pipeline.stages if s.kind == "generator")
    assert config.stage_config(generator).model == "lowfi"
