"""The mirror with a diffusion stage that has no model: it says so, and every frame is
served by its fallback (the style net) — the page keeps getting portraits, each saying
which generator made it, and the stats say why diffusion is not serving."""

import asyncio
import json
import re
import urllib.request

import pytest

from runtime.config import config_from_dict
from runtime.planner import plan
from runtime.rank_runtime import RankRuntime
from tests.integration.mirror_client import MirrorClient

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def runtime():
    config = config_from_dict({
        "pipeline": {"name": "mirror-diffusion", "stages": [
            {"name": "ingest", "placement": "server", "routing": "session"},
            {"name": "vision", "max_batch": 4, "routing": "session"},
            {"name": "diffusion", "routing": "session", "fallback": "stylize"},
            {"name": "stylize", "kind": "generator", "max_batch": 4},
            {"name": "display", "placement": "server"}]},
        "server": {"port": 0}, "compute": {"torch_threads": 1}})
    rt = RankRuntime(config, plan(config.pipeline, 1), 0)
    rt.start()
    yield rt
    rt.close()


def test_without_a_model_the_fallback_serves_every_frame(runtime):
    async def scenario():
        async with MirrorClient(runtime.pieces.front.server.port) as client:
            await client.stream(12, fps=10)
            assert await client.wait_for(lambda g: g.outputs and g.outputs[-1].frame_id == 11)
            return client.got

    got = asyncio.run(scenario())
    assert [f.frame_id for f in got.outputs] == list(range(12)), "no frame lost to the unconfigured stage"
    assert {v["generator"] for v in got.of_type("vision")} == {"stylenet"}
    assert not [e for e in got.of_type("error") if e["code"] == "diffusion_unavailable"]
    port = runtime.pieces.front.server.port
    stats = runtime.pieces.front.aggregator.stats()
    assert stats["unavailable"] == {"diffusion": "diffusion: no model configured"}
    assert stats["stages"]["vision#0"]["diverted"]["unavailable"] == 12
    current = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5))
    assert current["ok"]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert re.search(r'mindmirror_frames_diverted_total\{reason="unavailable",stage="vision#0"\} 12', metrics), metrics
