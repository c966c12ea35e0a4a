"""Degrade, don't reject, on real gloo ranks: a stage too slow for its input, or one that
says it cannot serve, has its frames taken by its fallback on another rank, and the
stream keeps flowing. The tone pipeline of tests/integration/tone/ with its gain stage
twice: 'slow' (the primary) and 'quick' (its fallback)."""

import json
import signal
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.processes import RankProcesses

pytestmark = pytest.mark.timeout(120)

TONE = Path(__file__).parent / "tone"


def fallback_config(tmp_path: Path, chunks: int, chunk_ms: float, **slow) -> tuple[Path, Path]:
    data = yaml.safe_load((TONE / "tone.yaml").read_text())
    data["pipeline"] = {"name": "tone-fallback", "plugins": [str(TONE / "tone_stages.py")], "stages": [
        {"name": "tone"},
        {"name": "slow", "kind": "gain", "fallback": "quick", "options": slow},
        {"name": "quick", "kind": "gain"},
        {"name": "sink", "kind": "tone_sink", "placement": "server"}]}
    data["tone"] = {"chunks": chunks, "chunk_ms": chunk_ms}
    data["tone_sink"].update(tone=data["tone"], path=str(tmp_path / "sink.jsonl"))
    config = tmp_path / "tone-fallback.yaml"
    config.write_text(yaml.safe_dump(data))
    return config, tmp_path / "sink.jsonl"


def chunks_seen(path: Path, n: int, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= n:
            return [json.loads(line) for line in lines]
        time.sleep(0.1)
    raise AssertionError(f"the sink saw {len(lines)} of {n} chunks")


def run(tmp_path: Path, chunks: int, chunk_ms: float, **slow) -> tuple[list[dict], RankProcesses]:
    config, sink = fallback_config(tmp_path, chunks, chunk_ms, **slow)
    ranks = RankProcesses(4, config, tmp_path)
    try:
        ranks.wait_ready()
        seen = chunks_seen(sink, chunks)
        for rank in range(4):
            ranks.signal(rank, signal.SIGTERM)
        assert ranks.wait_all(20) == [0, 0, 0, 0], ranks.log(0)
    finally:
        ranks.kill_all()
    assert sorted(c["frame_id"] for c in seen) == list(range(chunks)), "every chunk once, none lost"
    assert max(c["max_error"] for c in seen) < 1e-6, "each chunk is the tone at half gain, by either stage"
    return seen, ranks


def test_a_saturated_stage_hands_the_overflow_to_its_fallback(tmp_path):
    # 'slow' needs 100 ms per chunk; the tone comes every 10 ms. Without the fallback the
    # 40 chunks would queue behind it for 4 s; with it, 'slow' takes what its two credits
    # allow and 'quick' everything else.
    seen, ranks = run(tmp_path, chunks=40, chunk_ms=10, delay_ms=100, gain=0.5)
    by = [c["gain_by"] for c in seen]
    assert by.count("quick") >= 25 and by.count("slow") >= 1, by


def test_an_unavailable_stage_gets_no_frames_once_it_has_said_so(tmp_path):
    # 'slow' says it cannot serve; once that reached the tone's rank (the first heartbeat
    # after setup, through the server rank), every chunk goes to 'quick'.
    seen, ranks = run(tmp_path, chunks=40, chunk_ms=50, unavailable="slow: no model configured", gain=0.5)
    by = [c["gain_by"] for c in sorted(seen, key=lambda c: c["frame_id"])]
    assert set(by[-30:]) == {"quick"}, by
