"""Section 'lipsync': the pure parts (frames a session should get, per-hop bytes from two stats
messages, a session's and a run's figures, targets, the report's per-part tables, the GPU
part's merge), then one real quick run of the section on the CPU: both layouts with real
speech (espeak-ng) and the in-process figures, CUDA reported absent."""

from __future__ import annotations

import io
import json
import math
import time

import pytest
import torch
import yaml

from runtime.bench import lipsync, lipsync_cpu, lipsync_gpu, lipsync_gpu_report, lipsync_inputs, runner
from runtime.bench.lipsync_cpu import MICRO_PART
from runtime.bench.lipsync_pipeline import (
    LAYOUTS,
    PIPELINE_COLUMNS,
    PIPELINE_PART,
    job_config,
    run_row,
    session_counts,
)
from runtime.bench.lipsync_session import (
    AUDIO_WAIT_MS,
    LOOKAHEAD_MS,
    SessionRecord,
    enabling_chunk,
    expected_frames,
    hop_bytes,
    link_pair,
    session_figures,
)
from runtime.bench.machine import describe
from runtime.bench.options import SECTIONS, BenchOptions
from runtime.bench.progress import Progress
from runtime.bench.report import section_markdown, write_report
from runtime.bench.results import Column, SectionResult
from runtime.bench.speech import have_espeak
from runtime.bench.sysmon import Usage
from runtime.config import config_from_dict
from stages.lipsync.audio_windows import lookahead_samples, lookahead_seconds

needs_espeak = pytest.mark.skipif(not have_espeak(), reason="needs espeak-ng (apt install espeak-ng)")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def quiet_progress(total: int) -> Progress:
    return Progress(total, stream=io.StringIO())


def test_the_section_is_registered_after_gpu():
    assert SECTIONS.index("lipsync") == SECTIONS.index("gpu") + 1
    assert runner.SECTION_MODULES["lipsync"] == "runtime.bench.lipsync"


def test_session_counts_default_to_1_and_4_and_take_a_knob(tmp_path):
    def counts(**extra):
        return session_counts(BenchOptions(out_dir=tmp_path, extra=extra))

    assert counts() == (1, 4) and counts(lipsync_sessions=8) == (8,) and counts(lipsync_sessions=[2, 16]) == (2, 16)
    for bad in ("many", [], [0], [65], True, [1.5]):
        with pytest.raises(ValueError, match="lipsync_sessions"):
            counts(lipsync_sessions=bad)
    options = BenchOptions(out_dir=tmp_path, extra={"lipsync_sessions": [1, 2, 3]})
    assert lipsync.steps(options) == lipsync.steps(BenchOptions(out_dir=tmp_path)) + len(LAYOUTS)


def test_jobs_run_the_shipped_configs_with_the_avatar_folder_swapped(tmp_path):
    for layout in LAYOUTS:
        shipped = yaml.safe_load(layout.config_path.read_text())
        config = job_config(layout, tmp_path)
        assert config["lipsync"]["avatar_dir"] == config["composite"]["avatar_dir"] == str(tmp_path)
        assert config["pipeline"] == shipped["pipeline"] and "server" not in config  # the job picks the port
        assert config_from_dict(config).pipeline.name == "lipsync"
    assert job_config(LAYOUTS[0], tmp_path, sessions=16)["server"] == {"max_sessions": 16}
    assert [layout.world_size for layout in LAYOUTS] == [1, 4]


# -- frames and the look-ahead ---------------------------------------------------------------

def test_a_session_gets_every_frame_whose_look_ahead_its_audio_covers():
    assert expected_frames(0) == 0
    for frame in (0, 1, 4, 5, 37):
        enough = 640 * frame + lookahead_samples(frame)
        assert expected_frames(enough) == frame + 1
        assert expected_frames(enough - 1) == frame
    # The integration test's rule of thumb (seconds less the look-ahead, at 25 fps) is a lower bound.
    for samples in (16000, 47_999, 80_000):
        assert expected_frames(samples) >= int((samples / 16000 - lookahead_seconds()) * 25)


def test_with_20_ms_chunks_every_frame_waits_460_ms_for_its_audio():
    assert LOOKAHEAD_MS == pytest.approx(452.5)
    assert AUDIO_WAIT_MS == pytest.approx(460.0)
    for frame in range(50):
        k = enabling_chunk(frame)
        needed = 640 * frame + lookahead_samples(frame)  # samples that must have arrived
        assert 320 * k < needed <= 320 * (k + 1)
        assert (320 * (k + 1) - 640 * frame) / 16 == pytest.approx(AUDIO_WAIT_MS)


# -- per-hop bytes -----------------------------------------------------------------------------

def stats(**links: tuple[int, int]) -> dict:
    return {"hops": {name.replace("__", "->").replace("_", "#"): {"messages_sent": n, "bytes_sent": b,
                                                                   "hop_ms": {"p50": 0.5}}
                     for name, (n, b) in links.items()}}


def test_link_names_give_their_stage_pair():
    assert link_pair("speech#0->lipsync#1") == ("speech", "lipsync")
    assert link_pair("composite#0->present#0") == ("composite", "present")
    assert link_pair("no arrow") is None


def test_hop_bytes_are_the_growth_between_two_stats_messages_summed_per_stage_pair():
    before = stats(speech_0__lipsync_0=(10, 51_200), lipsync_0__composite_0=(10, 3_072_000))
    after = stats(speech_0__lipsync_0=(30, 153_600), speech_0__lipsync_1=(20, 102_400),
                  lipsync_0__composite_0=(30, 6_144_000), lipsync_1__composite_0=(20, 0),
                  composite_0__present_0=(0, 0))
    hops = hop_bytes(before, after)
    assert hops["links"]["speech#0->lipsync#0"] == {"messages": 20, "bytes": 102_400, "bytes_per_message": 5120.0,
                                                    "hop_p50_ms": 0.5}
    assert hops["links"]["composite#0->present#0"]["bytes_per_message"] is None  # nothing went over it
    assert hops["pairs"]["speech->lipsync"] == {"messages": 40, "bytes": 204_800, "links": 2,
                                                "bytes_per_message": 5120.0}
    # Silent frames carry no patch: the pair's average is over all frames.
    assert hops["pairs"]["lipsync->composite"]["bytes_per_message"] == 3_072_000 / 40
    assert "composite->present" not in hops["pairs"]
    since_start = hop_bytes(None, after)["pairs"]["speech->lipsync"]
    assert (since_start["messages"], since_start["bytes"]) == (50, 256_000)
    assert hop_bytes(None, None) == {"links": {}, "pairs": {}}


# -- a session's and a run's figures -----------------------------------------------------------

def record(frames: list[int], *, t0: float = 100.0, delay_s: float = 0.01, chunks: int = 200) -> SessionRecord:
    """A session whose chunk k went out at t0 + (k + 1) x 20 ms (as it filled) and whose frame
    i came back ``delay_s`` after its enabling chunk; frame ids in the order given."""
    rec = SessionRecord(avatar="astronaut", chunk_sent=[t0 + (k + 1) * 0.02 for k in range(chunks)])
    for frame in frames:
        arrival = rec.chunk_sent[enabling_chunk(frame)] + delay_s
        rec.arrivals.append((frame, arrival, 1000.0 * (t0 + frame * 0.04), 40_000))
        rec.visions[frame] = {"avatar": "astronaut", "generator": "mouth-synth" if frame % 2 else "silence"}
    return rec


def test_session_figures_split_the_pages_latency_into_audio_wait_and_processing():
    figures = session_figures(record(list(range(10)), delay_s=0.012), expected=12)
    assert figures["received"] == 10 and figures["lost"] == 2 and figures["out_of_order"] == 0
    assert figures["latencies_ms"] == pytest.approx([AUDIO_WAIT_MS + 12.0] * 10)
    assert figures["after_audio_ms"] == pytest.approx([12.0] * 10)
    assert figures["fps"] == pytest.approx(25.0)
    assert figures["generators"] == {"silence": 5, "mouth-synth": 5}
    assert figures["avatars_shown"] == ["astronaut"] and figures["jpeg_bytes"] == 40_000


def test_frames_out_of_order_and_missing_ones_are_counted():
    figures = session_figures(record([0, 2, 1, 3]), expected=5)
    assert (figures["received"], figures["lost"], figures["out_of_order"]) == (4, 1, 1)
    one = session_figures(record([0]), expected=1)
    assert math.isnan(one["fps"]) and one["lost"] == 0


def test_a_run_row_pools_the_sessions_and_leaves_out_what_it_could_not_measure():
    layout = LAYOUTS[1]
    figures = [session_figures(record(list(range(10)), delay_s=0.01 * (s + 1)), expected=10) for s in range(4)]
    hops = hop_bytes(None, stats(speech_0__lipsync_0=(20, 102_400), lipsync_1__composite_0=(20, 3_072_000),
                                         composite_0__present_0=(40, 1_600_000)))
    usage = Usage(samples=3, mean={"job_cpu_pct": 55.0, "system_cpu_pct": 40.0, "other_cpu_pct": 2.0})
    row = run_row(layout, figures, hops, usage)
    assert row["part"] == PIPELINE_PART and (row["layout"], row["ranks"]) == ("4 ranks (lipsync.yaml)", 4)
    assert (row["sessions"], row["sessions_label"], row["avatars"]) == (4, "4 sessions", 1)
    assert (row["frames"], row["expected"], row["lost"]) == (40, 40, 0)
    assert row["fps_session"] == pytest.approx(25.0) and row["fps_total"] == pytest.approx(100.0)
    assert row["after_p50_ms"] == pytest.approx(25.0) and row["p50_ms"] == pytest.approx(460.0 + 25.0)
    assert row["lookahead_ms"] == pytest.approx(452.5)
    assert row["generators"] == "mouth-synth 20, silence 20"
    assert (row["kb_speech_lipsync"], row["kb_lipsync_composite"], row["kb_composite_present"]) == (
        pytest.approx(5.12), pytest.approx(153.6), pytest.approx(40.0))
    assert (row["cpu_job_pct"], row["cpu_system_pct"], row["cpu_other_pct"]) == (55.0, 40.0, 2.0)
    empty = run_row(layout, [session_figures(SessionRecord(avatar="a"), expected=3)],
                            hop_bytes(None, None), None)
    assert empty["lost"] == 3 and empty["generators"] == "none"
    for key in ("fps_session", "p50_ms", "after_p50_ms", "kb_speech_lipsync", "cpu_job_pct"):
        assert key not in empty  # prints '–', never NaN in the JSON
    assert {c.key for c in PIPELINE_COLUMNS} <= set(row)


# -- targets, the report's parts, the GPU merge ------------------------------------------------

def test_cpu_targets_are_informational_and_name_the_anchors():
    layout = LAYOUTS[0]
    run = run_row(layout, [session_figures(record(list(range(10))), expected=10)],
                          hop_bytes(None, None), None)
    micro = [{"part": MICRO_PART, "micro_id": key, "ms": ms, "bytes_frame": b}
             for key, ms, b in (("mouth-synth", 1.5, None), ("U-Net half", 170.0, None), ("U-Net full", 400.0, None),
                                ("feather 6", 0.4, None), ("JPEG", 0.7, 44_000), ("audio chunk", 0.6, None),
                                ("patch uint8", 0.3, 307_200), ("patch float16", 0.7, 614_400),
                                ("patch float32", 0.6, 1_228_800))]
    sessions, latency, cost, patch = lipsync.cpu_targets([run] + micro)
    assert all(t.met is None for t in (sessions, latency, cost, patch))
    assert "2-3 talkers" in sessions.goal and "25.0 FPS each, 0/10 lost" in sessions.measured
    assert "452.5 ms" in latency.goal and "= 460 ms" in latency.measured and "+ 10 ms" in latency.measured
    assert "15-18 ms per frame, 58 FPS per process" in cost.goal and "U-Net half width 170.0 ms" in cost.measured
    assert patch.measured == "uint8 307,200 B; float16 614,400 B; float32 1,228,800 B; output JPEG 44,000 B"
    nothing = lipsync.cpu_targets([])
    assert "not measured" in nothing[0].measured and nothing[1].measured == "not measured"


def test_rows_with_parts_print_as_one_table_per_part_with_the_columns_it_fills():
    columns = [Column(key="what", header="what"), Column(key="fps", header="FPS", fmt="{:.1f}"),
               Column(key="ms", header="ms", fmt="{:.2f}")]
    result = SectionResult(name="s", title="S", columns=columns,
                           rows=[{"part": "Runs", "what": "a", "fps": 25.0}, {"part": "Costs", "what": "b", "ms": 1.5},
                                 {"part": "Runs", "what": "c", "fps": math.nan}])
    assert section_markdown(result) == ("## S\n\n**Runs**\n\n| what | FPS |\n| --- | --- |\n| a | 25.0 |\n| c | – |"
                                        "\n\n**Costs**\n\n| what | ms |\n| --- | --- |\n| b | 1.50 |")
    plain = SectionResult(name="s", title="S", columns=columns, rows=[{"what": "a", "fps": 25.0}])
    assert section_markdown(plain) == "## S\n\n| what | FPS | ms |\n| --- | --- | --- |\n| a | 25.0 | – |"


def test_every_gpu_column_is_in_the_section_once():
    keys = [c.key for c in lipsync.COLUMNS]
    assert len(keys) == len(set(keys))
    assert {c.key for c in lipsync_gpu_report.COLUMNS} <= set(keys)


def test_gpu_rows_are_tagged_with_their_part_and_a_gpu_failure_keeps_the_cpu_figures(monkeypatch, tmp_path):
    options = BenchOptions(out_dir=tmp_path, quick=True, sections=("lipsync",))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(lipsync_gpu, "gpu_part", lambda quick, progress: ([{"what": "U-Net", "batch": 1}],
                                                                          {"device": "fake"}))
    details: dict = {}
    rows, gpu = lipsync.gpu_part(options, quiet_progress(1), details)
    assert rows == [{"what": "U-Net", "batch": 1, "part": lipsync.GPU_PART}] and gpu == {"device": "fake"}

    def broken(quick, progress):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(lipsync_gpu, "gpu_part", broken)
    details = {}
    assert lipsync.gpu_part(options, quiet_progress(1), details) == ([], None)
    assert details["gpu_error"] == "RuntimeError: CUDA out of memory"
    targets = lipsync.gpu_targets([], None, details)
    assert len(targets) == 3 and all("the GPU part failed (RuntimeError: CUDA out of memory" in t.measured
                                     for t in targets)


def test_without_cuda_the_gpu_part_is_one_skipped_step(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    progress = quiet_progress(1)
    details: dict = {}
    assert lipsync.gpu_part(BenchOptions(out_dir=tmp_path), progress, details) == ([], None)
    assert progress.done == 1 and details == {}
    assert all(t.measured == "not measured: no CUDA device" for t in lipsync.gpu_targets([], None, details))


# -- one real quick run ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """(result, progress, options, wall seconds) of one quick run with CUDA reported absent."""
    options = BenchOptions(out_dir=tmp_path_factory.mktemp("lipsync"), quick=True, sections=("lipsync",))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        progress = quiet_progress(lipsync.steps(options))
        threads = torch.get_num_threads()
        started = time.monotonic()
        result = lipsync.run(options, progress)
        wall = time.monotonic() - started
        assert torch.get_num_threads() == threads  # restored for the sections after
    return result, progress, options, wall


def finite_figures(row: dict) -> list:
    return [v for v in row.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]


@needs_espeak
@pytest.mark.timeout(240)
def test_quick_run_measures_both_layouts_with_1_and_4_sessions(quick):
    result, progress, options, _ = quick
    assert result.name == "lipsync" and result.skipped is None and progress.done == lipsync.steps(options)
    runs = [r for r in result.rows if r["part"] == PIPELINE_PART]
    assert [(r["layout_key"], r["sessions"]) for r in runs] == [("local", 1), ("local", 4), ("ranks", 1), ("ranks", 4)]
    for row in runs:
        assert row["frames"] > 0 and row["errors"] == 0, row
        assert {"mouth-synth", "silence"} <= {part.split()[0] for part in row["generators"].split(", ")}
        assert row["p50_ms"] > row["after_p50_ms"] > 0 and row["fps_session"] > 0
        for key in ("kb_speech_lipsync", "kb_lipsync_composite", "kb_composite_present"):
            assert row[key] > 0, (key, row)
    four = [r for r in runs if r["sessions"] == 4]
    assert all(r["avatars"] == 4 for r in four)  # distinct avatars, one per session
    jobs = result.details["jobs"]
    placement = jobs["4 ranks (lipsync.yaml)"]["placement"]
    assert set(placement) == {"astronaut", "mirrored", "shifted", "zoomed"}
    assert {r for replicas in placement.values() for r in replicas} == {0, 1}  # both lip-sync replicas serve
    assert all(job["clean_stop"] for job in jobs.values()), jobs


def test_quick_run_gives_the_in_process_figures_and_says_the_gpu_was_skipped(quick):
    result, _, _, wall = quick
    micro = {r["micro_id"]: r for r in result.rows if r["part"] == MICRO_PART}
    assert set(micro) == {"paste", "feather 6", "JPEG", "composite", "patch uint8", "patch float16", "patch float32",
                          "mouth-synth", "U-Net half", "U-Net full", "audio chunk"}
    assert [micro[f"patch {d}"]["bytes_frame"] for d in ("uint8", "float16", "float32")] == [307_200, 614_400,
                                                                                             1_228_800]
    assert micro["JPEG"]["bytes_frame"] > 10_000 and all(r["ms"] > 0 for r in micro.values())
    for row in result.rows:  # what the report and the CLI test require of every row
        assert all(math.isfinite(v) and v >= 0 for v in finite_figures(row)), row
    assert not any(r["part"] == lipsync.GPU_PART for r in result.rows)
    assert lipsync_gpu_report.NO_CUDA in result.notes
    assert [t.measured for t in result.targets[-3:]] == ["not measured: no CUDA device"] * 3
    assert "random weights" in micro["U-Net full"]["what"]
    print(f"quick lipsync section: {wall:.1f} s")


def test_quick_run_writes_its_tables_and_plots(quick, tmp_path):
    result = quick[0]
    options = BenchOptions(out_dir=tmp_path, quick=True, sections=("lipsync",))
    written = write_report(describe(), options, [result], 1.0)
    for spec in result.plots:
        assert (tmp_path / spec.file).read_bytes()[:8] == PNG_MAGIC
    markdown = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert f"**{MICRO_PART}**" in markdown and "look-ahead" in markdown
    json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert len(written) == 2 + len(result.plots)


def test_without_espeak_the_pipeline_runs_are_skipped_and_the_cpu_figures_still_come(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(lipsync_inputs, "have_espeak", lambda: False)
    monkeypatch.setattr(lipsync_cpu, "UNET_WIDTHS", (0.5,))  # the full width costs seconds here; the quick run has it
    options = BenchOptions(out_dir=tmp_path, quick=True, sections=("lipsync",))
    result = lipsync.run(options, quiet_progress(lipsync.steps(options)))
    assert not any(r["part"] == PIPELINE_PART for r in result.rows)
    assert any(r.get("micro_id") == "audio chunk" for r in result.rows)
    assert result.details["speech"]["source"] == "synthetic (no espeak-ng)"
    assert any(note.startswith("Pipeline runs not measured: needs espeak-ng") for note in result.notes)
    assert "not measured: no pipeline run" in result.targets[0].measured
