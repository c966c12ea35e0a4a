"""The mirror pipeline across 2-4 real gloo rank processes, driven by a WebSocket client."""

import asyncio
import json
import signal
import socket
import time
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.mirror_client import MirrorClient
from tests.integration.processes import RankProcesses
from tests.integration.test_single_process import check_stream

pytestmark = pytest.mark.timeout(180)


def write_config(tmp_path, data):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def stream_and_collect(port, sessions=1, frames=20, fps=12):
    async def scenario():
        clients = [MirrorClient(port) for _ in range(sessions)]
        for c in clients:
            await c.__aenter__()
        try:
            await asyncio.gather(*(c.stream(frames, fps) for c in clients))
            for c in clients:
                assert await c.wait_for(lambda g: g.outputs and g.outputs[-1].frame_id == frames - 1, 30)
                await c.wait_for(lambda g: g.of_type("stats") and g.of_type("stats")[-1]["delivered"] > 0, 5)
            return [c.got for c in clients]
        finally:
            for c in clients:
                await c.__aexit__()

    return asyncio.run(scenario())


def stop_cleanly(ranks):
    for rank in range(ranks.world_size):
        ranks.signal(rank, signal.SIGTERM)
    codes = ranks.wait_all(20)
    logs = "\n".join(ranks.log(r)[-2000:] for r in range(ranks.world_size))
    assert codes == [0] * ranks.world_size, f"exit codes {codes}\n{logs}"


@pytest.fixture
def launch(tmp_path):
    started = []

    def start(world_size, config=None):
        ranks = RankProcesses(world_size, config, tmp_path)
        started.append(ranks)
        return ranks, ranks.wait_ready()

    yield start
    for ranks in started:
        ranks.kill_all()


def test_three_ranks_default_pipeline(launch):
    ranks, port = launch(3)
    (got,) = stream_and_collect(port)
    check_stream(got, 19)
    stats = got.of_type("stats")[-1]
    assert [r["role"] for r in stats["ranks"]] == ["server+ingest+display", "vision", "generator"]
    assert all(r["alive"] for r in stats["ranks"])
    assert {"vision#0", "generator#0", "ingest#0", "display#0"} <= set(stats["stages"])
    hops = stats["hops"]
    assert hops["ingest#0->vision#0"]["bytes_sent"] >= 20 * 640 * 480 * 3 * 0.5  # raw frames crossed
    assert hops["vision#0->generator#0"]["hop_ms"]["count"] > 0
    health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5))
    assert health["ok"] and [r["device"] for r in health["ranks"]] == ["cpu"] * 3
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'mindmirror_stage_compute_ms{quantile="0.50",stage="vision#0"}' in metrics
    assert_one_scrape_covers_every_rank(port, frames=len(got.outputs))
    assert_the_trace_spans_the_ranks(port)
    assert_config_change_reaches_the_generator_rank(port)
    stop_cleanly(ranks)


def assert_one_scrape_covers_every_rank(port, frames):
    """Rank 0's /metrics has the other ranks' histograms and counters, from their heartbeats."""
    def scrape():
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return {f.name: f for f in text_string_to_metric_families(text)}

    def counts(family, key):
        return {key(s.labels): s.value for s in family.samples if s.name == family.name + "_count"}

    deadline = time.monotonic() + 5  # the workers' next heartbeat carries their last frames
    while True:
        families = scrape()
        compute = counts(families["mindmirror_stage_compute_seconds"], lambda m: (m["stage"], m["rank"], m["role"]))
        if min(compute.get(k, 0) for k in (("vision", "1", "vision"), ("generator", "2", "generator"))) >= frames:
            break
        assert time.monotonic() < deadline, compute
    assert {s.labels["rank"]: (s.labels["node"], s.value) for s in families["mindmirror_rank_up"].samples} == {
        "0": ("0", 1.0), "1": ("0", 1.0), "2": ("0", 1.0)}
    sent = {s.labels["link"]: s for s in families["mindmirror_link_bytes"].samples}
    assert sent["vision#0->generator#0"].value >= frames * 640 * 480 * 3
    assert (sent["vision#0->generator#0"].labels["src_rank"], sent["vision#0->generator#0"].labels["dst_rank"]) == (
        "1", "2")
    hops = counts(families["mindmirror_hop_seconds"], lambda m: m["hop"])
    assert hops["ingest#0->vision#0"] >= frames and hops["vision#0->generator#0"] >= frames
    waits = counts(families["mindmirror_stage_queue_wait_seconds"], lambda m: (m["stage"], m["rank"]))
    assert waits[("vision", "1")] >= frames and waits[("generator", "2")] >= frames
    (latency,) = counts(families["mindmirror_frame_latency_seconds"], lambda m: m["generator"]).items()
    assert latency[1] >= frames


def assert_the_trace_spans_the_ranks(port):
    trace = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/trace?last=3", timeout=5))
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in spans if e["name"] in ("vision", "generator")} == {1, 2}
    assert len([e for e in spans if e["cat"] == "frame"]) == 3 and all(e["dur"] >= 0 for e in spans)
    assert set(trace["metadata"]["clock_offsets"]) == {"0", "1", "2"}


def assert_config_change_reaches_the_generator_rank(port):
    """The generator (rank 2) stamps the revision it used; rank 0 shows it per frame."""
    async def scenario():
        async with MirrorClient(port) as client:
            await client.send_text("preset.apply", {"name": "comic"})
            assert await client.wait_for(lambda g: any(c["revision"] == 2 for c in g.of_type("config.current")))
            await client.stream(8, fps=10, first_id=100)
            assert await client.wait_for(lambda g: g.outputs and g.outputs[-1].frame_id == 107, 20)
            return client.got

    got = asyncio.run(scenario())
    revisions = {v["frame_id"]: v["revision"] for v in got.of_type("vision")}
    assert revisions[107] == 2, revisions


def test_two_ranks_with_vision_and_generator_sharing_a_rank(launch, tmp_path):
    config = write_config(tmp_path, {"pipeline": {"stages": [
        {"name": "ingest", "placement": "server"},
        {"name": "vision", "ranks": [1]},
        {"name": "generator", "ranks": [1]},
        {"name": "display", "placement": "server"},
    ]}})
    ranks, port = launch(2, config)
    (got,) = stream_and_collect(port, frames=12)
    check_stream(got, 11)
    assert got.of_type("stats")[-1]["ranks"][1]["role"] == "vision+generator"
    stop_cleanly(ranks)


def test_four_ranks_two_generators_two_sessions_each_in_order(launch):
    ranks, port = launch(4)
    got = stream_and_collect(port, sessions=2, frames=12, fps=8)
    for session in got:
        check_stream(session, 11)
    stages = got[0].of_type("stats")[-1]["stages"]
    assert {"generator#0", "generator#1"} <= set(stages)
    stop_cleanly(ranks)


def test_a_killed_rank_that_nothing_can_replace_ends_the_job_with_its_name(launch):
    # Vision has one replica and no fallback: the job cannot go on without rank 1 (a lost
    # generator replica with a twin does not end it: test_recovery.py).
    ranks, port = launch(3)

    async def run_until_killed():
        async with MirrorClient(port) as client:
            streaming = asyncio.create_task(client.stream(100, fps=10))
            assert await client.wait_for(lambda g: len(g.outputs) >= 3)
            ranks.procs[1].kill()
            killed_at = time.monotonic()
            await client.closed.wait()  # rank 0 closes the browser sessions as it stops
            streaming.cancel()
            return time.monotonic() - killed_at, client.got.of_type("status"), (client.ws.close_code,
                                                                                 client.ws.close_reason)

    seconds_to_close, statuses, close = asyncio.run(asyncio.wait_for(run_until_killed(), 60))
    codes = ranks.wait_all(15)
    assert codes[0] == 1 and codes[2] == 1, f"survivors should fail: {codes}"
    assert "job failed: rank 1 (vision) died" in ranks.log(0)
    assert seconds_to_close < 10
    told = "rank 1 (vision) died and nothing else can serve 'vision'; the job is stopping"
    assert statuses == [{"state": "stopping", "message": told, "lost": [{"rank": 1, "role": "vision",
                                                                         "cause": "died"}]}]
    assert close == (1012, told)  # service restart: the page reconnects, to a restarted job if any


def test_a_stalled_rank_is_detected_and_the_job_ends(launch, tmp_path):
    config = write_config(tmp_path, {"control": {"heartbeat_s": 0.25, "liveness_timeout_s": 2.0}})
    ranks, port = launch(3, config)
    ranks.signal(2, signal.SIGSTOP)  # alive but silent: the worst case for a pipeline
    stopped_at = time.monotonic()
    codes = ranks.wait_all(20, ranks=[0, 1])
    took = time.monotonic() - stopped_at
    ranks.kill_all()
    assert codes[0] == 1 and codes[1] == 1, f"rank 0 and 1 should fail: {codes}\n{ranks.log(0)}"
    assert "rank 2 (generator) stalled: no heartbeat" in ranks.log(0)
    assert took < 15


def test_sigterm_to_one_worker_stops_the_whole_job_cleanly(launch, tmp_path):
    # A shutdown budget far above the wait below: a stop that waits for something that
    # never comes (an END nobody reads) would sit out the budget and fail here.
    ranks, _ = launch(3, write_config(tmp_path, {"control": {"shutdown_timeout_s": 120}}))
    ranks.signal(1, signal.SIGTERM)
    codes = ranks.wait_all(20)
    assert codes == [0, 0, 0], f"{codes}\n{ranks.log(0)}"
    assert "stopping: rank 1 (vision) stopped: SIGTERM" in ranks.log(0)


def test_a_frozen_rank_0_is_noticed_by_the_workers(launch, tmp_path):
    config = write_config(tmp_path, {"control": {"heartbeat_s": 0.25, "liveness_timeout_s": 2.0},
                                     "transport": {"peer_timeout_s": 3.0}})
    ranks, _ = launch(3, config)
    ranks.signal(0, signal.SIGSTOP)
    frozen_at = time.monotonic()
    codes = ranks.wait_all(25, ranks=[1, 2])
    took = time.monotonic() - frozen_at
    ranks.kill_all()
    assert codes[1] == 1 and codes[2] == 1, f"{codes}\n{ranks.log(1)}"
    # A status send to a frozen rank 0 stalls inside gloo until peer_timeout_s, or finds
    # no credit for longer than liveness_timeout_s: either way the worker names rank 0.
    for r in (1, 2):
        log = ranks.log(r)
        assert "rank 0 (server+ingest+display) stalled" in log or "lost the link to rank 0 (server" in log, log
        assert "Traceback" not in ranks.log(r), ranks.log(r)
    assert took < 15


def test_a_port_in_use_is_reported_once_with_what_to_do(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ranks = RankProcesses(3, None, tmp_path, extra=["--port", str(port)])
        try:
            codes = ranks.wait_all(60)
        finally:
            ranks.kill_all()
    logs = "".join(ranks.log(r) for r in range(3))
    assert codes == [1, 1, 1], f"{codes}\n{logs}"
    assert logs.count(str(port)) == 1, logs
    assert (f"job failed: port {port} on 127.0.0.1 is already in use by another program: stop it, or choose a "
            f"free port with --port (e.g. --port {port + 1})") in ranks.log(0)
    assert "Traceback" not in logs
