"""A pipeline the project does not ship — its stage classes and YAML live in
tests/integration/tone/ — runs as 3 real gloo ranks and in one process, with no edit to
comms/ or runtime/: the reshape's proof that a new pipeline is stage files plus YAML."""

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from runtime.config import load_config
from runtime.planner import plan
from runtime.rank_runtime import RankRuntime
from tests.integration.mirror_client import FIXTURE, MirrorClient, camera_frame
from tests.integration.processes import LAUNCHER, REPO, RankProcesses

pytestmark = pytest.mark.timeout(120)

TONE = Path(__file__).parent / "tone"
CHUNKS = 40


def tone_config(tmp_path: Path, **gain) -> tuple[Path, Path]:
    """tone.yaml with the sink writing into ``tmp_path`` (and ``gain`` settings changed);
    the plugin file stays where it is."""
    data = yaml.safe_load((TONE / "tone.yaml").read_text())
    data["gain"].update(gain)
    data["pipeline"]["plugins"] = [str(TONE / "tone_stages.py")]
    sink_path = tmp_path / "sink.jsonl"
    data["tone_sink"]["path"] = str(sink_path)
    config = tmp_path / "tone.yaml"
    config.write_text(yaml.safe_dump(data))
    return config, sink_path


def wait_for_lines(path: Path, n: int, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            lines = path.read_text().splitlines()
            if len(lines) >= n:
                return [json.loads(line) for line in lines]
        time.sleep(0.1)
    raise AssertionError(f"the sink saw {len(path.read_text().splitlines()) if path.exists() else 0} of {n} chunks")


def check_chunks(seen: list[dict], sink_rank: int) -> None:
    assert [c["frame_id"] for c in seen] == list(range(CHUNKS)), "every chunk, in order, once"
    assert {c["rank"] for c in seen} == {sink_rank}
    assert all(c["samples"] == 160 and c["dtype"] == "torch.float32" for c in seen)
    assert max(c["max_error"] for c in seen) < 1e-6, "each chunk is the tone at half gain"
    assert all(c["stages"] == ["tone", "gain"] for c in seen)


def test_tone_pipeline_across_three_gloo_ranks(tmp_path):
    config, sink_path = tone_config(tmp_path)
    ranks = RankProcesses(3, config, tmp_path)
    try:
        ranks.wait_ready()
        check_chunks(wait_for_lines(sink_path, CHUNKS), sink_rank=0)
        for rank in range(3):
            ranks.signal(rank, signal.SIGTERM)
        codes = ranks.wait_all(20)
        assert codes == [0, 0, 0], f"{codes}\n{ranks.log(0)}"
        assert "[rank 1 tone]" in ranks.log(1) and "[rank 2 gain]" in ranks.log(2)
        assert "pipeline 'tone' ready on 3 rank(s)" in ranks.log(0)
    finally:
        ranks.kill_all()


def test_an_unexpected_error_keeps_its_traceback_and_stops_every_rank(tmp_path):
    config, _ = tone_config(tmp_path, broken=True)
    ranks = RankProcesses(3, config, tmp_path)
    try:
        codes = ranks.wait_all(60)
    finally:
        ranks.kill_all()
    assert codes == [1, 1, 1], f"{codes}\n{ranks.log(0)}\n{ranks.log(2)}"
    assert "Traceback (most recent call last)" in ranks.log(2) and "KeyError: 'missing'" in ranks.log(2)
    assert "job failed: rank 2 (gain) failed: unexpected error (traceback follows in this rank's log)" in ranks.log(0)
    for rank in range(3):
        assert "INFO runtime.rank_runtime: stopped after a failure" in ranks.log(rank), ranks.log(rank)


def test_tone_pipeline_in_one_process(tmp_path):
    config_path, sink_path = tone_config(tmp_path)
    config = load_config(config_path, {"server.port": 0})
    runtime = RankRuntime(config, plan(config.pipeline, 1), 0)
    try:
        runtime.start()
        check_chunks(wait_for_lines(sink_path, CHUNKS), sink_rank=0)
        health = runtime.health()
        assert health["ok"] and health["ranks"][0]["role"] == "server+tone+gain+sink"
    finally:
        runtime.close()
    assert runtime.failure is None


def test_the_tone_pipeline_takes_no_camera_frames_and_says_so(tmp_path):
    config_path, _ = tone_config(tmp_path)
    config = load_config(config_path, {"server.port": 0})
    runtime = RankRuntime(config, plan(config.pipeline, 1), 0)

    async def send_a_camera_frame():
        async with MirrorClient(runtime.pieces.front.server.port) as client:
            await client.ws.send(camera_frame(1, FIXTURE.read_bytes()))
            assert await client.wait_for(lambda got: got.of_type("error"), timeout=5)
            return client.got.of_type("error")[0]

    try:
        runtime.start()
        error = asyncio.run(send_a_camera_frame())
        assert error["code"] == "unsupported_kind" and error["message"] == "pipeline 'tone' takes no camera frames"
    finally:
        runtime.close()


def test_dry_run_of_the_tone_pipeline_shows_source_sink_and_no_browser_ends():
    result = subprocess.run([sys.executable, str(LAUNCHER), "--config", str(TONE / "tone.yaml"), "--dry-run",
                             "--world-size", "3"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "rank 0 (server+sink) on node 0, cpu:" in out
    assert "the page's frames feed nothing (the pipeline starts with a source)" in out
    assert "  tone#0 (tone on cpu): nothing (source) -> audio.f32 [float32]" in out
    assert "  sink#0 (tone_sink on cpu): audio.f32 [float32] -> nothing (sink)" in out
