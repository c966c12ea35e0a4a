"""Recover instead of exit, on real rank processes: a lost worker rank whose work another
replica (or a stage's fallback) can take leaves the job running degraded, its browser
sessions open and told so; one nothing can replace fails the job, and under
``torchrun --max-restarts`` the workers restart and a reconnecting page is served again.

The measuring functions return the figures the README quotes; ``recovery_timing.py``
runs them several times."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from tests.integration.mirror_client import MirrorClient
from tests.integration.processes import LAUNCHER, REPO, URL, RankProcesses, free_port, kill_torchrun, worker_pid
from tests.integration.reconnecting_client import ReconnectingClient
from tests.integration.test_fallback_routing import chunks_seen, fallback_config
from tests.integration.test_torchrun import torchrun_command

TONE = Path(__file__).parent / "tone"


def stats_of(client: ReconnectingClient) -> dict:
    stats = [p for s in client.sessions for p in s.of_type("stats")]
    return stats[-1] if stats else {}


def serving_generator(client: ReconnectingClient) -> int:
    """The generator replica this (only) session's frames go through, from the stats."""
    stages = stats_of(client).get("stages", {})
    busy = [int(label.split("#")[1]) for label, s in stages.items()
            if label.startswith("generator#") and s.get("frames_out", 0) > 0]
    assert len(busy) == 1, stages
    return busy[0]


# -- degraded: 4 ranks, two generator replicas, one is killed -----------------------

def measure_degraded(tmp_path: Path) -> dict:
    """Kill the generator replica that serves the session; the session must stay open, be
    told, and keep getting frames from the other replica. Returns the figures."""
    ranks = RankProcesses(4, None, tmp_path)
    try:
        port = ranks.wait_ready()
        figures = asyncio.run(_degraded_session(ranks, port))
        figures["codes"] = ranks.wait_all(30)
        figures["log0"] = ranks.log(0)
        return figures
    finally:
        ranks.kill_all()


async def _degraded_session(ranks: RankProcesses, port: int) -> dict:
    client = ReconnectingClient(port, fps=10)
    client.start()
    try:
        # 5 s of frames before the kill: the same window's longest gap without a kill, to compare.
        assert await client.wait_for(lambda c: len(c.frames()) >= 10 and c.frames()[-1][0] - c.frames()[0][0] > 5.5
                                     and stats_of(c).get("delivered", 0) >= 5, 60)
        replica = serving_generator(client)
        victim = 2 + replica  # generator#0 on rank 2, generator#1 on rank 3 (the plan's order)
        killed_at = time.monotonic()
        ranks.procs[victim].kill()
        # Frames for 4 s after the kill: the gap is measured over that window and the second before.
        assert await client.wait_for(lambda c: c.first_frame_after(killed_at + 4.0) is not None, 30), \
            f"frames stopped after the kill:\n{ranks.log(0)[-3000:]}"
        window = (killed_at - 1.0, client.first_frame_after(killed_at + 4.0))
        late = MirrorClient(port)  # a page that connects now hears that the job is degraded
        await late.__aenter__()
        try:
            assert await late.wait_for(lambda g: g.of_type("status"), 5)
            late_status = late.got.of_type("status")[0]
        finally:
            await late.__aexit__()
        with pytest.raises(urllib.error.HTTPError) as unhealthy:  # 503: not every rank is up
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
        health = json.load(unhealthy.value)
        figures = {"killed_rank": victim, "killed_at": killed_at, "sessions": len(client.sessions),
                   "closed": client.sessions[0].closed, "statuses": client.statuses(), "late_status": late_status,
                   "gap_s": client.longest_gap(*window), "baseline_gap_s": client.longest_gap(killed_at - 5.0, killed_at),
                   "frames_after": len([f for f in client.frames() if f[0] > killed_at]),
                   "first_frame_after_s": client.first_frame_after(killed_at) - killed_at,
                   "other_replica_frames": stats_of(client)["stages"][f"generator#{1 - replica}"]["frames_out"],
                   "health": health}
        for rank in (0, 1, 2, 3):  # stop the rest, as torchrun would to restart them
            if rank != victim:
                ranks.signal(rank, signal.SIGTERM)
        assert await client.wait_for(lambda c: c.sessions[0].closed is not None, 20)
        figures["stop_close"] = (client.sessions[0].close_code, client.sessions[0].close_reason)
        return figures
    finally:
        await client.stop()


@pytest.mark.timeout(150)
def test_a_lost_generator_replica_leaves_the_session_open_and_served_by_the_other(tmp_path):
    f = measure_degraded(tmp_path)
    print(f"killed rank {f['killed_rank']}: longest gap {f['gap_s']:.2f} s ({f['baseline_gap_s']:.2f} s before), "
          f"first frame after the kill {f['first_frame_after_s']:.2f} s, {f['frames_after']} frames in 4 s")
    victim = f["killed_rank"]
    assert f["sessions"] == 1 and f["closed"] is None, "the session stayed open"
    (status,) = f["statuses"]
    assert status == {"state": "degraded", "lost": [{"rank": victim, "role": "generator", "cause": "died"}],
                      "message": f"rank {victim} (generator) died; its 'generator' frames go to rank {5 - victim}"}
    assert f["late_status"] == status
    assert f["other_replica_frames"] >= 10  # stats lag the frames by a heartbeat or two
    assert f["gap_s"] < 3.0, f"the stream stopped for {f['gap_s']:.2f} s"
    assert f["health"]["lost"] == [status["message"]] and not f["health"]["ok"]
    assert f"the job goes on degraded: rank {victim} (generator) died" in f["log0"]
    code, reason = f["stop_close"]  # stopped while degraded: the page is told to come back
    assert code == 1012 and reason.startswith("the job is stopping (") and "while degraded: rank" in reason, reason
    survivors = [code for rank, code in enumerate(f["codes"]) if rank != victim]
    assert survivors == [0, 0, 0] and f["codes"][victim] == -signal.SIGKILL, f["codes"]


# -- degraded onto a stage's fallback, and a stall, on the cheap tone pipeline ------

@pytest.mark.timeout(90)
def test_a_lost_stage_hands_its_frames_to_its_fallback(tmp_path):
    config, sink = fallback_config(tmp_path, chunks=80, chunk_ms=40, gain=0.5)  # 'slow' without a delay
    ranks = RankProcesses(4, config, tmp_path)
    try:
        ranks.wait_ready()
        assert "[rank 2 slow]" in ranks.log(2)
        before = max(c["frame_id"] for c in chunks_seen(sink, 10))
        ranks.procs[2].kill()
        seen = chunks_seen(sink, 70)  # at most a few in flight to the dead rank are lost
        while max(c["frame_id"] for c in seen) < 79:
            seen = chunks_seen(sink, len(seen) + 1, timeout=10)
        for rank in (0, 1, 3):
            ranks.signal(rank, signal.SIGTERM)
        codes = ranks.wait_all(20)
    finally:
        ranks.kill_all()
    by_id = {c["frame_id"]: c["gain_by"] for c in seen}
    # The source was at most a few chunks further than the sink when the kill came.
    assert {by for i, by in by_id.items() if i > before + 5} == {"quick"}, by_id
    assert len(by_id) >= 80 - 4, f"lost {sorted(set(range(80)) - set(by_id))}"
    assert "rank 2 (slow) died; serving the fallback 'quick' instead of 'slow'" in ranks.log(0)
    assert codes[0] == codes[1] == codes[3] == 0, f"{codes}\n{ranks.log(0)}"


@pytest.mark.timeout(90)
def test_a_stalled_replica_is_routed_around_and_dismissed(tmp_path):
    data = yaml.safe_load((TONE / "tone.yaml").read_text())
    data["pipeline"]["plugins"] = [str(TONE / "tone_stages.py")]
    data["pipeline"]["stages"][0]["routing"] = "session"  # the one session 'tone' is on gain#0 (rank 2)
    data["tone"] = {"chunks": 120, "chunk_ms": 40}
    data["tone_sink"].update(tone=data["tone"], path=str(tmp_path / "sink.jsonl"))
    data["control"] = {"heartbeat_s": 0.25, "liveness_timeout_s": 1.5}
    config = tmp_path / "tone-stall.yaml"
    config.write_text(yaml.safe_dump(data))
    sink = tmp_path / "sink.jsonl"
    ranks = RankProcesses(4, config, tmp_path)
    try:
        ranks.wait_ready()
        assert chunks_seen(sink, 10)[-1]["gain_by"] == "gain"
        ranks.signal(2, signal.SIGSTOP)
        stalled_at = time.monotonic()
        before = len(chunks_seen(sink, 1))
        chunks_seen(sink, before + 20, timeout=30)  # flowing again, through gain#1 on rank 3
        took = time.monotonic() - stalled_at
        ranks.signal(2, signal.SIGCONT)  # it wakes up to its dismissal
        code2 = ranks.wait_all(20, ranks=[2])[2]
        for rank in (0, 1, 3):
            ranks.signal(rank, signal.SIGTERM)
        codes = ranks.wait_all(20)
    finally:
        ranks.kill_all()
    log0 = ranks.log(0)
    assert "rank 2 (gain) stalled: no heartbeat for" in log0 and "its 'gain' frames go to rank 3" in log0
    assert took < 1.5 + 20 * 0.04 + 5, took
    assert code2 == 1 and "went on without this rank" in ranks.log(2), ranks.log(2)[-2000:]
    assert codes[0] == codes[1] == codes[3] == 0, f"{codes}\n{log0[-3000:]}"


# -- nothing can replace it: torchrun --max-restarts restarts the workers -----------

RESTARTABLE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
"""What torchrun needs for restarts that work: without it the agent shares its rendezvous
store with the workers and keeps it across restarts, so a restarted worker can read the
first run's addresses and connect to a dead process (pytorch/pytorch#135712)."""


@contextlib.contextmanager
def torchrun_with_restarts(tmp_path: Path, port: int, restarts: int = 1):
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*torchrun_command(), "--standalone", "--nproc-per-node", "3", "--max-restarts", str(restarts),
             str(LAUNCHER), "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1", **RESTARTABLE),
            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not URL.search(log_path.read_text(errors="replace")):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        yield proc, log_path
    finally:
        kill_torchrun(proc)


def measure_restart(tmp_path: Path) -> dict:
    """Kill the only generator under torchrun --max-restarts 1 while a reconnecting client
    streams: seconds from the kill to the first frame served again, and what the page saw."""
    port = free_port()  # a fixed port: the restarted rank 0 must serve where the page reconnects
    with torchrun_with_restarts(tmp_path, port) as (proc, log_path):
        figures = asyncio.run(_restarted_session(proc, port, log_path))
        proc.send_signal(signal.SIGTERM)
        figures["torchrun_exit"] = proc.wait(60)
        figures["log"] = log_path.read_text(errors="replace")
    ready = READY.findall(figures["log"])
    if len(ready) == 2:  # when the restarted rank 0 said it serves, on the log's clock
        figures["kill_to_ready_s"] = _seconds_of_day(ready[1]) - _seconds_of_day(figures.pop("killed_wall"))
    return figures


READY = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) \[rank 0 [^]]*\] INFO runtime\.rank_runtime: pipeline '\w+' ready",
                   re.MULTILINE)


def _seconds_of_day(stamp: str | float) -> float:
    if isinstance(stamp, float):  # a wall-clock time: as the log prints it
        stamp = datetime.fromtimestamp(stamp).strftime("%H:%M:%S.%f")
    hours, minutes, seconds = stamp.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


async def _restarted_session(proc: subprocess.Popen, port: int, log_path: Path) -> dict:
    client = ReconnectingClient(port, fps=10)
    client.start()
    try:
        assert await client.wait_for(lambda c: len(c.frames()) >= 5, 60), log_path.read_text()[-3000:]
        victim = worker_pid(proc.pid, 2)
        killed_at, killed_wall = time.monotonic(), time.time()
        os.kill(victim, signal.SIGKILL)
        served_again = await client.wait_for(
            lambda c: any(s.opened > killed_at and s.frames for s in c.sessions), 100)
        assert served_again, f"not served again:\n{log_path.read_text(errors='replace')[-4000:]}"
        first = client.sessions[0]
        again = next(s for s in client.sessions if s.opened > killed_at and s.frames)
        return {"kill_to_frame_s": again.frames[0][0] - killed_at, "kill_to_close_s": first.closed - killed_at,
                "kill_to_session_s": again.opened - killed_at, "first_close": (first.close_code, first.close_reason),
                "statuses": first.of_type("status"), "failed_connects": client.failed_connects,
                "killed_wall": killed_wall}
    finally:
        await client.stop()


@pytest.mark.skipif(importlib.util.find_spec("torch.distributed.run") is None,
                    reason="torchrun (torch.distributed.run) is not available")
@pytest.mark.timeout(180)
def test_torchrun_restarts_the_workers_and_the_page_is_served_again(tmp_path):
    f = measure_restart(tmp_path)
    print(f"kill -> close {f['kill_to_close_s']:.2f} s, -> rank 0 serves {f.get('kill_to_ready_s', -1):.2f} s, "
          f"-> new session {f['kill_to_session_s']:.2f} s, -> first frame {f['kill_to_frame_s']:.2f} s")
    reason = "rank 2 (generator) died and nothing else can serve 'generator'; the job is restarting " \
             "(torchrun restart 1 of 1)"
    assert f["statuses"] == [{"state": "restarting", "message": reason,
                              "lost": [{"rank": 2, "role": "generator", "cause": "died"}]}], f["statuses"]
    assert f["first_close"] == (1012, reason), f["first_close"]
    assert f["kill_to_close_s"] < 5, f
    assert f["kill_to_frame_s"] < 100, f
    assert f["log"].count("Mind Mirror is running: open") == 2, f["log"][-3000:]
