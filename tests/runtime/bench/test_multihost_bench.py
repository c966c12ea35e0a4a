"""Section 'multihost': the transport part's plan, rounds, rows and targets and the pipeline
part's placements and commands from fixed numbers, the skip without namespaces, and one
real quick run across a veth pair (root only: 26 s on 2 quiet cores, up to ~40 s when they are busy)."""

from __future__ import annotations

import io
import math
import subprocess
import sys
import time

import psutil
import pytest

from runtime.bench import multihost, multihost_pipeline, multihost_transport
from runtime.bench.jobs import JobError
from runtime.bench.multihost_ranks import METHODS
from runtime.bench.options import BenchOptions
from runtime.bench.progress import Progress
from runtime.bench.sysmon import Usage
from runtime.bench.transport import PAYLOADS, Figures
from runtime.bench.transport_ranks import Sample
from runtime.bench.virtual_hosts import Host, VirtualHostsUnavailable, unavailable_reason

THREE = ("raw", "channel", "channel_gloo")
"""The methods the figure tests use, whatever multihost_ranks runs today."""
HOST_A = Host("mmtesta", "eth0", "10.1.2.1")
HOST_B = Host("mmtestb", "eth0", "10.1.2.2")


def options(tmp_path, **kw) -> BenchOptions:
    return BenchOptions(out_dir=tmp_path, sections=("multihost",), **kw)


# ------------------------------------------------------------------ transport: plan and jobs



def own_children() -> set[int]:
    """This test process's descendants (others' tests may leave some, e.g. a module-scoped
    world of ranks: only new ones count)."""
    return {child.pid for child in psutil.Process().children(recursive=True)}

def test_quick_plan_is_one_short_round_and_full_plan_follows_options(tmp_path):
    quick = multihost_transport.plan_of(options(tmp_path, quick=True, rounds=5))
    full = multihost_transport.plan_of(options(tmp_path, rounds=3))
    assert (quick.rounds, quick.messages, quick.pings) == (1, 20, 20)
    assert (full.rounds, full.messages, full.pings) == (3, 200, 200)
    assert quick.sizes == full.sizes == PAYLOADS and quick.methods == full.methods == METHODS


def test_jobs_warm_every_method_at_every_size_then_rotate_the_order_per_round():
    plan = multihost_transport.Plan(sizes=PAYLOADS[:2], rounds=3, messages=50, pings=40, methods=THREE)
    warmup, rounds = multihost_transport.jobs_of(plan)
    assert {(j.method, j.payload.label, j.messages, j.pings) for j in warmup} == {
        (m, p.label, 3, 3) for m in THREE for p in PAYLOADS[:2]} and len(warmup) == 6
    assert len(rounds) == 3
    for jobs in rounds:
        assert sorted((j.method, j.payload.label) for j in jobs) == sorted((m, p.label) for m in THREE
                                                                           for p in PAYLOADS[:2])
        assert all((j.messages, j.pings) == (50, 40) for j in jobs)
    first_of_each_round = [jobs[0].method for jobs in rounds]
    assert first_of_each_round == ["raw", "channel", "channel_gloo"]


def test_rounds_skip_the_warm_up_samples_and_refuse_a_short_list():
    plan = multihost_transport.Plan(sizes=PAYLOADS[:1], rounds=2, messages=10, pings=2, methods=("raw", "channel"))
    warmup, rounds = multihost_transport.jobs_of(plan)
    warm = [Sample(stream_s=99.0, round_trips_ns=[1]) for _ in warmup]
    measured = [Sample(stream_s=0.001 * (i + 1), round_trips_ns=[2000 * (i + 1)]) for i in range(4)]
    figures = multihost_transport.rounds_of(warmup, rounds, warm + measured)
    assert [sorted(r) for r in figures] == [[("channel", "32 KB"), ("raw", "32 KB")]] * 2
    first = rounds[0][0]
    assert figures[0][first.method, "32 KB"].mb_per_s == pytest.approx(32768 * 10 / 0.001 / 1e6)
    assert figures[0][first.method, "32 KB"].p50_us == pytest.approx(1.0)
    with pytest.raises(RuntimeError, match="3 samples for 6 jobs"):
        multihost_transport.rounds_of(warmup, rounds, (warm + measured)[:3])


# ------------------------------------------------------------------ transport: rows and targets


def a_round(channel: Figures, raw: Figures, gloo: Figures, sizes=PAYLOADS) -> dict:
    return {(method, p.label): {"channel": channel, "raw": raw, "channel_gloo": gloo}[method]
            for method in THREE for p in sizes}


def plan_of(sizes=PAYLOADS, methods=THREE) -> multihost_transport.Plan:
    return multihost_transport.Plan(sizes=sizes, rounds=1, messages=1, pings=1, methods=methods)


def test_rows_are_the_transport_rows_with_ratios_to_raw_only():
    raw, gloo = Figures(mb_per_s=1000.0, p50_us=100.0, p99_us=1.0), Figures(mb_per_s=500.0, p50_us=300.0, p99_us=1.0)
    rounds = [a_round(Figures(mb_per_s=mb, p50_us=120.0, p99_us=1.0), raw, gloo) for mb in (800.0, 950.0, 990.0)]
    rows = multihost_transport.rows_of(plan_of(), rounds)
    assert [(r["size_label"], r["method"]) for r in rows] == [(p.label, m) for p in PAYLOADS for m in THREE]
    assert all(row["part"] == multihost_transport.PART for row in rows)
    by = {(r["method"], r["size_label"]): r for r in rows}
    assert by["channel", "1.2 MB"]["mb_per_s"] == 950.0
    assert by["channel", "1.2 MB"]["vs_raw_mb_per_s"] == pytest.approx(0.95)
    assert by["channel", "32 KB"]["vs_raw_p50"] == pytest.approx(1.2)
    assert by["channel_gloo", "2.5 MB"]["vs_raw_mb_per_s"] == pytest.approx(0.5)
    assert not any("vs_grpc_mb_per_s" in row for row in rows)
    assert "vs_raw_mb_per_s" not in by["raw", "32 KB"]
    line = multihost_transport.information(rows)
    assert "channel_gloo / raw: 32 KB 0.50x MB/s, 3.00x p50" in line and "channel / raw: 32 KB 0.95x MB/s" in line


def targets_for(channel_mb: float, channel_p50: float) -> dict:
    raw, gloo = Figures(mb_per_s=1000.0, p50_us=100.0, p99_us=1.0), Figures(mb_per_s=1.0, p50_us=1e6, p99_us=1.0)
    rows = multihost_transport.rows_of(plan_of(), [a_round(Figures(mb_per_s=channel_mb, p50_us=channel_p50,
                                                                   p99_us=1.0), raw, gloo)])
    return {t.name: t for t in multihost_transport.targets_of(rows)}


def test_targets_hold_the_channel_to_raw_at_every_large_payload_and_at_32_kb():
    failing = targets_for(channel_mb=850.0, channel_p50=160.0)
    assert list(failing) == [f"channel / raw throughput at {size}, between hosts"
                             for size in ("1.2 MB", "2.5 MB", "2.76 MB")] + [
        "channel / raw p50 latency, 32 KB, between hosts"]
    assert all(t.met is False for t in failing.values())
    assert failing["channel / raw throughput at 1.2 MB, between hosts"].measured == "0.85x (850 vs 1000 MB/s raw)"
    assert failing["channel / raw p50 latency, 32 KB, between hosts"].goal == "<= 1.5x"
    passing = targets_for(channel_mb=900.0, channel_p50=150.0)  # the bars themselves pass
    assert all(t.met is True for t in passing.values())


def test_without_a_channel_method_the_targets_are_unmeasured_not_failed():
    same = Figures(mb_per_s=1.0, p50_us=1.0, p99_us=1.0)
    rounds = [{(m, p.label): same for m in ("raw", "channel_gloo") for p in PAYLOADS}]
    rows = multihost_transport.rows_of(plan_of(methods=("raw", "channel_gloo")), rounds)
    targets = multihost_transport.targets_of(rows)
    assert len(targets) == 4 and all(t.met is None for t in targets)
    assert all(t.measured == "not measured: no channel in this run" for t in targets)


def test_spread_gives_each_judged_ratio_per_round_from_the_same_round():
    raw = Figures(mb_per_s=1000.0, p50_us=100.0, p99_us=1.0)
    rounds = [a_round(Figures(mb_per_s=mb, p50_us=p50, p99_us=1.0), raw, raw)
              for mb, p50 in ((800.0, 300.0), (1200.0, 120.0), (950.0, 150.0))]
    line = multihost_transport.spread(plan_of(), rounds)
    assert line == ("channel / raw per round (min-max over 3 round(s)): 32 KB p50 1.20-3.00x, "
                    "1.2 MB MB/s 0.80-1.20x, 2.5 MB MB/s 0.80-1.20x, 2.76 MB MB/s 0.80-1.20x.")
    assert multihost_transport.spread(plan_of(methods=("raw", "channel_gloo")), rounds) is None


def test_notes_name_every_method_and_the_rounds():
    plan = plan_of()
    usage = Usage(samples=3, mean={"other_cpu_pct": 12.0}, max={"other_cpu_pct": 30.0})
    text = multihost_transport.note(plan, usage)
    for method in THREE:
        assert f"{method}: {multihost_transport.DESCRIPTIONS[method]}" in text
    assert "1 round(s)" in text and "Others' CPU meanwhile: mean 12%, max 30%" in text


# ------------------------------------------------------------------ pipeline part


def test_placements_are_four_ranks_on_one_host_then_two_on_each():
    one, two = multihost_pipeline.placements()
    assert (one.ranks_per_host, two.ranks_per_host) == ((4,), (2, 2))
    assert one.layout.world_size == two.layout.world_size == 4
    assert one.layout.config == two.layout.config == {} and one.layout.key != two.layout.key


def test_each_host_runs_a_torchrun_agent_in_its_namespace_on_the_static_rendezvous(tmp_path):
    _, two = multihost_pipeline.placements()
    job = multihost_pipeline.HostsJob((HOST_A, HOST_B), two, tmp_path)
    head, other = (node.command() for node in job.nodes)
    assert head[:6] == ["ip", "netns", "exec", "mmtesta", "env", "GLOO_SOCKET_IFNAME=eth0"]
    assert other[:4] == ["ip", "netns", "exec", "mmtestb"]

    def option(argv: list[str], name: str) -> str:
        return argv[argv.index(name) + 1]

    for node_rank, (argv, host) in enumerate(((head, HOST_A), (other, HOST_B))):
        assert option(argv, "--node-rank") == str(node_rank) and option(argv, "--nnodes") == "2"
        assert option(argv, "--nproc-per-node") == "2" and option(argv, "--rdzv-backend") == "static"
        assert option(argv, "--rdzv-endpoint").startswith("10.1.2.1:") and option(argv, "--local-addr") == host.address
        assert option(argv, "--port") == "0"
    with pytest.raises(ValueError, match="needs 2 hosts, got 1"):
        multihost_pipeline.HostsJob((HOST_A,), two, tmp_path)


def test_a_head_that_fails_to_start_stops_the_other_hosts_and_the_error_shows_every_log(tmp_path, monkeypatch):
    commands = {0: [sys.executable, "-c", "import time; print('head gives up'); time.sleep(0.5); raise SystemExit(3)"],
                1: ["sh", "-c", "echo peer waiting; sleep 60 & wait"]}
    monkeypatch.setattr(multihost_pipeline.NodeJob, "command", lambda self: commands[self.node_rank])
    _, two = multihost_pipeline.placements()
    job = multihost_pipeline.HostsJob((HOST_A, HOST_B), two, tmp_path)
    started, before = time.monotonic(), own_children()
    with pytest.raises(JobError) as failure, job:
        pytest.fail("the job should not have started")
    text = str(failure.value)
    assert "exited with 3 during startup" in text and "head gives up" in text and "peer waiting" in text
    assert job.nodes[1].exit is not None and not job.nodes[1].exit.killed
    assert time.monotonic() - started < 20
    assert own_children() <= before  # nothing of the job's is left


def test_the_planned_transports_differ_only_on_the_links_between_hosts():
    one, two = (multihost_pipeline.data_transports(p) for p in multihost_pipeline.placements())
    assert set(one) == set(two) and "vision#0->generator#0" in one
    assert set(one.values()) == {"same-host"}
    crossing = {name for name in two if two[name] != "same-host"}
    assert crossing == {"vision#0->generator#0", "vision#0->generator#1", "generator#0->display#0",
                        "generator#1->display#0"}


def test_hops_between_hosts_are_the_busy_links_whose_ends_are_on_two_nodes():
    stats = {"hops": {"a->b": {"messages_sent": 5, "src_node": 0, "dst_node": 1},
                      "b->c": {"messages_sent": 5, "src_node": 1, "dst_node": 1},
                      "idle": {"src_node": 0, "dst_node": 1},
                      "unplaced": {"messages_sent": 5}}}
    assert multihost_pipeline.hops_between_hosts(stats) == ["a->b"]
    assert multihost_pipeline.hops_between_hosts(None) == []


def test_the_two_host_row_gets_its_ratios_to_the_one_host_row():
    rows = [{"layout_key": "one-host", "fps": 20.0, "p50_ms": 50.0},
            {"layout_key": "two-hosts", "fps": 15.0, "p50_ms": 75.0}]
    multihost_pipeline.add_ratios(rows)
    assert "fps_vs_one_host" not in rows[0]
    assert rows[1]["fps_vs_one_host"] == pytest.approx(0.75) and rows[1]["p50_vs_one_host"] == pytest.approx(1.5)


# ------------------------------------------------------------------ the section


def test_without_namespaces_the_section_is_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(multihost, "unavailable_reason", lambda: "needs root to create network namespaces")

    def refuse():
        raise VirtualHostsUnavailable("needs root to create network namespaces")

    monkeypatch.setattr(multihost, "veth_pair", refuse)
    opts = options(tmp_path, quick=True)
    assert multihost.steps(opts) == 1
    progress = Progress(1, stream=io.StringIO())
    result = multihost.run(opts, progress)
    assert result.name == "multihost" and progress.done == 1
    assert result.skipped.startswith("needs root to create network namespaces")
    assert not result.rows and not result.targets


@pytest.mark.timeout(240)
@pytest.mark.skipif(unavailable_reason() is not None, reason=f"network namespaces: {unavailable_reason()}")
def test_quick_section_measures_every_method_size_and_placement(tmp_path):
    opts = options(tmp_path, quick=True)
    progress = Progress(multihost.steps(opts), stream=io.StringIO())
    before = own_children()
    result = multihost.run(opts, progress)
    assert result.skipped is None and progress.done == progress.total == 3
    transport_rows = [r for r in result.rows if r["part"] == multihost_transport.PART]
    assert {(r["method"], r["size_label"]) for r in transport_rows} == {(m, p.label) for m in METHODS
                                                                        for p in PAYLOADS}
    for row in transport_rows:
        for key in ("mb_per_s", "p50_us", "p99_us"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["method"], row["size_label"], key, row[key])
        if row["method"] != "raw":
            assert math.isfinite(row["vs_raw_mb_per_s"]) and math.isfinite(row["vs_raw_p50"]), row
    assert len(result.targets) == 4
    assert all((t.met is not None) == ("channel" in METHODS) for t in result.targets)
    one, two = (r for r in result.rows if r["part"] == multihost_pipeline.PART)
    assert (one["layout_key"], two["layout_key"]) == ("one-host", "two-hosts")
    for row in (one, two):
        assert row["received"] > 0 and row["sent"] >= row["received"], row
        for key in ("fps", "p50_ms", "p95_ms", "cpu_job_pct"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["layout"], key, row[key])
    assert math.isfinite(two["fps_vs_one_host"]) and math.isfinite(two["p50_vs_one_host"])
    runs = result.details["pipeline"]["runs"]
    assert runs[one["layout"]]["hops_between_hosts"] == []
    crossing = runs[two["layout"]]["hops_between_hosts"]
    assert crossing, "no hop crossed the veth pair"
    assert all(runs[two["layout"]]["transports"][hop] != "same-host" for hop in crossing)
    assert all(job["clean_stop"] for job in result.details["pipeline"]["jobs"].values())
    assert result.details["setup"]["mtu"] and any("MTU" in note for note in result.notes)
    # Nothing is left behind: the namespaces, the ranks, the agents, the client.
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not any(host["namespace"] in namespaces for host in result.details["setup"]["hosts"])
    assert own_children() <= before  # no rank, agent or client is left
