"""The soak: its verdict on made-up figures, its refusals, an attached soak that must fail
(one session too many), and the CI version of the real thing: 8 browser-like sessions for
60 s against the default pipeline on 3 torchrun ranks, zero errors, no session starved,
every rank's RSS within the bound."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import soak
from runtime.bench.jobs import PipelineJob
from runtime.bench.soak_client import SessionRecord, SessionSettings, socket_url
from runtime.bench.soak_memory import MiB, RankMemory, RankProcess, find_ranks
from runtime.bench.soak_report import SoakLimits, SoakResult, format_report, judge, summarize_rank, summarize_session

REPO = Path(__file__).resolve().parents[2]
SYNTHETIC = {"pipeline": {"name": "soaktest", "stages": [
    {"name": "ingest", "placement": "server"},
    {"name": "s1", "kind": "synthetic", "options": {"cost_ms": 1}},
    {"name": "display", "placement": "server"}]}}


# -- URLs and settings ---------------------------------------------------------------------

def test_the_printed_page_url_becomes_the_socket_url_and_origin_with_the_token():
    assert socket_url("http://127.0.0.1:8765/") == ("ws://127.0.0.1:8765/ws", "http://127.0.0.1:8765")
    assert socket_url("https://box:9000/?token=abc") == ("wss://box:9000/ws?token=abc", "https://box:9000")
    assert socket_url("http://box:9000/?token=abc", "s3cret")[0] == "ws://box:9000/ws?token=s3cret"
    assert socket_url("ws://127.0.0.1:1/ws")[0] == "ws://127.0.0.1:1/ws"
    with pytest.raises(ValueError, match="url: expected http"):
        socket_url("ftp://127.0.0.1/")


def test_session_settings_refuse_rates_the_page_cannot_have():
    for fps in (0.0, math.nan, 61.0):
        with pytest.raises(ValueError, match="fps must be within"):
            SessionSettings(url="ws://x/ws", origin="http://x", jpeg=b"", fps=fps)
    with pytest.raises(ValueError, match="max_in_flight"):
        SessionSettings(url="ws://x/ws", origin="http://x", jpeg=b"", max_in_flight=0)


# -- the verdict -------------------------------------------------------------------------------

def record(index: int, arrivals: list[float], errors: list[str] = ()) -> SessionRecord:
    r = SessionRecord(index=index, sent_at=[t - 0.1 for t in arrivals], arrivals=list(arrivals),
                      latencies_ms=[100.0 + i for i in range(len(arrivals))])
    for e in errors:
        r.error(e)
    return r


def memory(rank: int, rss_mb: list[float], gone: bool = False) -> RankMemory:
    """Samples one second apart from t = -1 (idle, before the window that starts at 0)."""
    return RankMemory(rank=rank, pid=1000 + rank, gone_at=99.0 if gone else None,
                      samples=[(float(t), int(mb * MiB)) for t, mb in enumerate(rss_mb, start=-1)])


def result(records: list[SessionRecord], memories: list[RankMemory], start: float = 0.0, end: float = 10.0,
           limits: SoakLimits | None = None) -> SoakResult:
    limits = limits or SoakLimits()
    out = SoakResult(window_s=end - start, world_size=len(memories),
                     sessions=[summarize_session(r, start, end) for r in records],
                     ranks=[summarize_rank(m, "role", start) for m in memories])
    judge(out, limits)
    return out


def steady(index: int, every: float = 0.25) -> SessionRecord:
    return record(index, [every * (k + 1) for k in range(int(10 / every) - 1)])


def test_a_session_counts_only_the_window_and_its_longest_wait_includes_the_edges():
    s = summarize_session(record(0, [-1.0, 1.0, 2.0, 8.0, 11.0]), 0.0, 10.0)
    assert (s.frames, s.sent, s.fps) == (3, 3, 0.3)
    assert s.max_gap_s == 6.0 and s.p50_ms == 102.0  # latencies of the frames at 1, 2 and 8 s
    assert summarize_session(record(1, []), 0.0, 10.0).max_gap_s == 10.0


def test_rss_start_is_the_sample_at_the_baseline_and_growth_is_end_minus_start():
    r = summarize_rank(memory(0, [100, 150, 152, 170, 160]), "vision", baseline_at=0.0)
    assert (r.idle_mb, r.start_mb, r.end_mb, r.max_mb) == (100, 150, 160, 170)
    assert r.growth_mb == 10


def test_healthy_sessions_and_flat_memory_pass():
    out = result([steady(i) for i in range(8)], [memory(r, [200, 250, 251, 249]) for r in range(3)])
    assert out.passed, out.failures
    text = format_report(out, SoakLimits())
    assert text.startswith("Soak: 8 sessions, 10 s measured") and "PASS" in text
    assert json.loads(json.dumps(out.as_dict()))["ranks"][0]["growth_mb"] == -1.0


def test_an_error_message_fails_the_soak_and_is_quoted():
    out = result([steady(0), steady(1, 0.3), record(2, steady(2).arrivals, ["error message: bad_jpeg: nope"])],
                 [memory(0, [200, 200])])
    assert out.failures == ["session 2: 1 error(s), first: error message: bad_jpeg: nope"]
    assert "FAIL:" in format_report(out, SoakLimits())


def test_a_session_under_half_the_median_or_waiting_too_long_is_starved():
    slow = record(3, [0.5 * (k + 1) for k in range(19)])  # 19 frames; the others get 39
    stalled = record(4, [0.25 * (k + 1) for k in range(20)] + [9.9])  # nothing from 5 s to 9.9 s
    out = result([steady(0), steady(1), steady(2), slow, stalled], [memory(0, [200, 200])],
                 limits=SoakLimits(max_gap_s=4.0))
    assert out.failures == ["session 3 starved: 19 frames, under 50% of the median session's 39",
                            "session 4 starved: waited 4.9 s for a frame (bound 4 s)"]


def test_rss_growth_past_the_bound_and_a_rank_that_exited_fail():
    out = result([steady(0)], [memory(0, [200, 210, 290]), memory(1, [200, 201], gone=True),
                               memory(2, [200, 200, 263])])
    assert out.failures == ["rank 0 (role): RSS grew 80.0 MiB (210.0 -> 290.0), over the 64 MiB bound",
                            "rank 1 (role) exited during the soak"]


def test_limits_refuse_nonsense():
    with pytest.raises(ValueError, match="starved_fraction"):
        SoakLimits(starved_fraction=0)
    with pytest.raises(ValueError, match="rss_growth_mb must be a finite number > 0"):
        SoakLimits(rss_growth_mb=math.nan)


# -- the command line ----------------------------------------------------------------------------

@pytest.mark.parametrize("args, error", [
    (["--clients", "0"], "--clients must be within 1..1024, got 0"),
    (["--duration", "nan"], "--duration must be a finite number > 0, got nan"),
    (["--warmup", "-1"], "--warmup must be a finite number >= 0, got -1.0"),
    (["--url", "ftp://127.0.0.1/"], "url: expected http"),
    (["--url", "http://127.0.0.1:1/", "--config", "configs/local.yaml"], "--config is for a job the soak starts"),
    (["--rss-growth-mb", "0"], "rss_growth_mb must be a finite number > 0, got 0.0"),
])
def test_bad_arguments_are_refused_with_the_reason(args, error, capsys):
    assert soak.main(args) == 2
    assert error in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nothing_listening_at_the_url_is_refused_before_any_session(tmp_path, capsys):
    port = free_port()
    assert soak.main(["--url", f"http://127.0.0.1:{port}/", "--out", str(tmp_path)]) == 2
    assert f"no process listens on port {port}" in capsys.readouterr().err


def test_an_attached_soak_with_one_session_too_many_fails_and_names_it(tmp_path, capsys):
    """A one-process server that takes 2 sessions, soaked by 3: the third is refused with an
    error and closed, and the soak says so and exits 1; the one rank is found from the port."""
    config = {**SYNTHETIC, "server": {"max_sessions": 2}}
    with PipelineJob(config, name="server", out_dir=tmp_path, world_size=1) as job:
        launcher = job.pids()[0]
        assert find_ranks(job.port) == ([RankProcess(rank=0, pid=launcher)], 1)
        assert soak.main(["--url", job.url, "--clients", "3", "--duration", "2", "--warmup", "0.5",
                          "--sample-every", "0.5", "--out", str(tmp_path / "soak")]) == 1
    report = json.loads((tmp_path / "soak" / "soak.json").read_text())
    refused = [s for s in report["sessions"] if s["error_count"]]
    assert len(refused) == 1 and refused[0]["frames"] == 0
    assert refused[0]["errors"][0].startswith("error message: too_many_sessions")
    assert any("closed by the server: 1013" in e for e in refused[0]["errors"])
    assert [(r["rank"], r["pid"]) for r in report["ranks"]] == [(0, launcher)]
    assert not report["passed"] and "FAIL:" in capsys.readouterr().out


# -- the CI soak ----------------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_eight_sessions_for_60_s_on_three_ranks_pass(tmp_path):
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(REPO / "launch" / "soak.py"), "--clients", "8", "--duration", "60",
                           "--warmup", "5", "--sample-every", "2", "--progress-every", "20", "--out", str(tmp_path)],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=240)
    print(done.stdout, done.stderr[-2000:], f"wall {time.monotonic() - started:.0f} s", sep="\n")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["passed"] and report["failures"] == [] and report["world_size"] == 3
    assert math.isclose(report["window_s"], 60, abs_tol=1.5)
    sessions = report["sessions"]
    assert len(sessions) == 8 and all(s["error_count"] == 0 and s["frames"] > 0 for s in sessions)
    assert [(r["rank"], r["role"]) for r in report["ranks"]] == [
        (0, "server+ingest+display"), (1, "vision"), (2, "generator")]
    assert all(r["start_mb"] > 50 and not r["gone"] for r in report["ranks"])
    assert "PASS" in done.stdout and "EXITED" not in done.stdout
