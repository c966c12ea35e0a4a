"""Benchmark section 'transport': plan, rows and targets from fixed numbers, the gRPC
tensor service in one process, and real two-rank runs (a quick section, a dead rank)."""

from __future__ import annotations

import io
import math
import multiprocessing
import time

import grpc
import pytest
import torch

from comms.config import TransportConfig
from runtime.bench import grpc_tensor, transport
from runtime.bench.options import BenchOptions
from runtime.bench.progress import Progress
from runtime.bench.results import SectionResult
from runtime.bench.report import section_markdown
from runtime.bench.transport import PAYLOADS, Figures, figures_of, plan_of, rows_of, targets_of
from runtime.bench.transport_ranks import METHODS, Job, Payload, Ranks, Sample


def options(tmp_path, **kw) -> BenchOptions:
    return BenchOptions(out_dir=tmp_path, sections=("transport",), **kw)


# ------------------------------------------------------------------ plan


def test_standard_payloads_have_the_issue_sizes_and_dtypes():
    assert [(p.label, p.nbytes, p.dtype) for p in PAYLOADS] == [
        ("32 KB", 32768, torch.float32), ("1.2 MB", 1_228_800, torch.float32),
        ("2.5 MB", 2_457_600, torch.float32), ("2.76 MB", 2_764_800, torch.uint8)]
    frame = PAYLOADS[3].make()
    assert frame.shape == (720, 1280, 3) and frame.dtype == torch.uint8


def test_sizes_pick_standard_payloads_or_flat_bytes():
    sizes = transport.payloads_of("1228800,1000")
    assert sizes[0] is PAYLOADS[1]
    assert (sizes[1].label, sizes[1].dtype, sizes[1].shape, sizes[1].nbytes) == ("1,000 B", torch.uint8, (1000,), 1000)
    assert transport.payloads_of([32768]) == transport.payloads_of(32768) == (PAYLOADS[0],)
    with pytest.raises(ValueError, match="byte counts"):
        transport.payloads_of("0")


def test_quick_plan_is_one_short_round_and_full_plan_follows_options(tmp_path):
    quick = plan_of(options(tmp_path, quick=True, rounds=5))
    full = plan_of(options(tmp_path, rounds=3))
    assert (quick.rounds, quick.messages, quick.pings, quick.sizes) == (1, 20, 20, PAYLOADS)
    assert full.rounds == 3 and full.messages >= 100 and full.pings >= 100
    assert transport.steps(options(tmp_path, rounds=3)) == 2 + 3 * len(PAYLOADS) * len(METHODS)


def test_extra_knobs_override_the_plan_and_unknown_ones_are_refused(tmp_path):
    plan = plan_of(options(tmp_path, quick=True, extra={"transport.sizes": "32768", "transport.messages": "7",
                                                         "pipeline.whatever": 1}))
    assert (plan.sizes, plan.messages) == ((PAYLOADS[0],), 7)
    shared = plan_of(options(tmp_path, extra={"messages": 500, "sizes": [2764800, 32768], "mode": "fast"}))
    assert (shared.messages, shared.sizes) == (500, (PAYLOADS[3], PAYLOADS[0]))
    with pytest.raises(ValueError, match="transport.mesages"):
        plan_of(options(tmp_path, extra={"transport.mesages": 7}))
    with pytest.raises(ValueError, match="'messages'.*invalid literal"):
        plan_of(options(tmp_path, extra={"messages": "many"}))
    with pytest.raises(ValueError, match=">= 1"):
        plan_of(options(tmp_path, extra={"transport.pings": 0}))


def test_the_channels_inline_threshold_is_a_knob_checked_by_the_transport_config(tmp_path):
    assert plan_of(options(tmp_path)).transport == TransportConfig()
    plan = plan_of(options(tmp_path, extra={"transport.inline_max_bytes": "16384"}))
    assert plan.transport == TransportConfig(inline_max_bytes=16384)
    assert any("16384 B with their header" in note for note in transport.notes_of(plan))
    with pytest.raises(ValueError, match="inline_max_bytes: must be an integer within 0..slot_bytes/2"):
        plan_of(options(tmp_path, extra={"inline_max_bytes": 2**20}))


def test_rounds_rotate_the_method_order(tmp_path):
    plan = plan_of(options(tmp_path, quick=True, extra={"transport.sizes": "32768"}))
    first, second = ([job.method for job in transport._round_jobs(plan, i)] for i in (0, 1))
    assert first == list(METHODS) and second == list(METHODS[1:] + METHODS[:1])


# ------------------------------------------------------------------ figures, rows, targets


def test_figures_are_payload_throughput_and_half_round_trips():
    job = Job("raw", PAYLOADS[1], messages=100, pings=3)
    figures = figures_of(Sample(stream_s=0.1, round_trips_ns=[200_000, 100_000, 300_000]), job)
    assert figures.mb_per_s == pytest.approx(1_228_800 * 100 / 0.1 / 1e6)
    assert figures.p50_us == pytest.approx(100.0)
    assert 100.0 < figures.p99_us <= 150.0


def a_round(channel: Figures, raw: Figures, grpc_: Figures) -> dict:
    others = Figures(mb_per_s=1.0, p50_us=1.0, p99_us=1.0)
    return {(method, size): {"channel": channel, "raw": raw, "grpc": grpc_}.get(method, others)
            for method in METHODS for size in ("32 KB", "1.2 MB")}


def test_rows_take_medians_over_rounds_and_channel_rows_get_ratios():
    raw, grpc_ = Figures(mb_per_s=1000.0, p50_us=50.0, p99_us=90.0), Figures(mb_per_s=400.0, p50_us=300.0, p99_us=900.0)
    rounds = [a_round(Figures(mb_per_s=mb, p50_us=100.0, p99_us=200.0), raw, grpc_) for mb in (800.0, 950.0, 2000.0)]
    rows = rows_of(PAYLOADS[:2], rounds)
    assert [(r["size_label"], r["method"]) for r in rows] == [(s, m) for s in ("32 KB", "1.2 MB") for m in METHODS]
    channel = rows[0]
    assert channel["mb_per_s"] == 950.0 and channel["p50_us"] == 100.0 and channel["p99_us"] == 200.0
    assert channel["vs_raw_mb_per_s"] == pytest.approx(0.95)
    assert channel["vs_raw_p50"] == pytest.approx(2.0)
    assert channel["vs_grpc_mb_per_s"] == pytest.approx(950.0 / 400.0)
    assert rows[1]["method"] == "channel_gloo" and rows[1]["vs_raw_mb_per_s"] == pytest.approx(1.0 / 1000.0)
    assert "vs_raw_mb_per_s" not in rows[2]


def targets_for(channel_mb: float, channel_p50: float) -> dict:
    raw, grpc_ = Figures(mb_per_s=1000.0, p50_us=100.0, p99_us=1.0), Figures(mb_per_s=400.0, p50_us=1.0, p99_us=1.0)
    rounds = [a_round(Figures(mb_per_s=channel_mb, p50_us=channel_p50, p99_us=1.0), raw, grpc_)]
    return {t.name: t for t in targets_of(rows_of(PAYLOADS[:2], rounds))}


def test_targets_are_met_or_not_by_their_bars():
    failing = targets_for(channel_mb=850.0, channel_p50=160.0)
    assert set(failing) == {"channel / raw throughput at 1.2 MB", "channel / raw p50 latency, 32 KB",
                            "channel / gRPC throughput at 1.2 MB"}
    assert failing["channel / raw throughput at 1.2 MB"].met is False
    assert failing["channel / raw throughput at 1.2 MB"].measured == "0.85x (850 vs 1000 MB/s raw)"
    assert failing["channel / raw p50 latency, 32 KB"].met is False
    assert failing["channel / gRPC throughput at 1.2 MB"].met is True  # 850 / 400 = 2.1x
    passing = targets_for(channel_mb=950.0, channel_p50=140.0)
    assert passing["channel / raw throughput at 1.2 MB"].met is True
    assert passing["channel / raw p50 latency, 32 KB"].met is True
    assert targets_for(channel_mb=790.0, channel_p50=1.0)["channel / gRPC throughput at 1.2 MB"].met is False


def test_targets_without_their_payload_are_unmeasured():
    rounds = [{(m, "2.76 MB"): Figures(mb_per_s=1.0, p50_us=1.0, p99_us=1.0) for m in METHODS}]
    targets = {t.name: t for t in targets_of(rows_of(PAYLOADS[3:], rounds))}
    assert targets["channel / raw p50 latency, 32 KB"].met is None
    assert "not measured" in targets["channel / raw p50 latency, 32 KB"].measured
    assert targets["channel / raw throughput at 2.76 MB"].met is True


def test_markdown_prints_a_dash_for_missing_ratios():
    same = Figures(mb_per_s=1.0, p50_us=1.0, p99_us=1.0)
    rounds = [a_round(same, same, same)]
    result = SectionResult(name="transport", title="t", columns=transport.COLUMNS,
                                     rows=rows_of(PAYLOADS[:1], rounds), targets=[])
    lines = section_markdown(result).splitlines()[2:]
    assert lines[0].startswith("| payload | tensor | method | MB/s")
    assert lines[2].endswith("| 1.00x | 1.00x | 1.00x |") and lines[3].endswith("| 1.00x | 1.00x | 1.00x |")
    assert lines[4].endswith("| – | – | – |")


# ------------------------------------------------------------------ gRPC in one process


@pytest.mark.filterwarnings("ignore:The given buffer is not writable")  # torch, on gRPC's immutable bytes
def test_grpc_tensor_round_trips_keep_dtype_shape_and_content():
    sink = grpc_tensor.TensorSink()
    server, port = grpc_tensor.serve(sink)
    client = grpc_tensor.TensorClient(port, timeout_s=10)
    try:
        with pytest.raises(grpc.RpcError):
            client.echo(torch.zeros(4))  # the server was not told what to expect
        for payload in (Payload("frame", torch.uint8, (4, 6, 3)), Payload("floats", torch.float32, (2, 5))):
            tensor = payload.make()
            sink.expect(payload.dtype, payload.shape)
            assert torch.equal(client.echo(tensor), tensor)
            assert client.stream(tensor, 5) == 5
    finally:
        client.close()
        server.stop(grace=None)


# ------------------------------------------------------------------ real ranks


def test_quick_section_measures_every_method_and_size(tmp_path):
    opts = options(tmp_path, quick=True)
    stream = io.StringIO()
    progress = Progress(transport.steps(opts), stream=stream)
    result = transport.run(opts, progress)
    assert progress.done == progress.total
    assert result.name == "transport" and result.skipped is None
    assert {(r["method"], r["size_label"]) for r in result.rows} == {(m, p.label) for m in METHODS for p in PAYLOADS}
    for row in result.rows:
        for key in ("mb_per_s", "p50_us", "p99_us"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["method"], row["size_label"], key, row[key])
    names = [t.name for t in result.targets]
    for kind in ("channel / raw throughput at", "channel / raw p50 latency, 32 KB", "channel / gRPC throughput at"):
        assert any(name.startswith(kind) for name in names), (kind, names)
    assert all(t.met is not None for t in result.targets)
    assert (tmp_path / "transport-ranks.log").exists()
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("transport-rank")]


def test_a_dead_rank_is_named_with_the_job_it_stopped(tmp_path):
    started = time.monotonic()
    with pytest.raises(RuntimeError) as failure:
        with Ranks(tmp_path / "ranks.log") as ranks:
            (rank_1,) = [p for p in multiprocessing.active_children() if p.name == "transport-rank-1"]
            rank_1.kill()
            rank_1.join(10)
            ranks.run(Job("channel", PAYLOADS[0], messages=5, pings=5))
    assert "rank 1 died" in str(failure.value) and "during channel at 32 KB" in str(failure.value)
    assert time.monotonic() - started < 60
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("transport-rank")]
