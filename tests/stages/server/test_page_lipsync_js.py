"""The lip-sync page's pure modules under Node.js: PCM16 packing, resampling, chunking and
real-time pacing (audio_pcm.js), and the A/V schedule, frame i <-> samples [640 i, 640 (i + 1))
(av_schedule.js). Runs only where Node.js is installed (as test_page_js)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from test_page_js import NODE, run

from stages.server.protocol import SAMPLES_PER_VIDEO_FRAME, frame_samples

pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js not installed")


# --- PCM16 ---

def test_float_to_pcm16_and_its_wire_bytes(tmp_path):
    values = [0, 1, -1, 0.5, -0.5, 2, -2, 1 / 32767, 0.49 / 32767]
    [pcm, wire] = run(tmp_path, f"""
        import {{ floatToPcm16, pcm16Bytes }} from "./audio_pcm.js";
        const pcm = floatToPcm16({json.dumps(values)});
        console.log(JSON.stringify([...pcm]));
        console.log(JSON.stringify(Buffer.from(pcm16Bytes(pcm)).toString("hex")));
    """)
    assert pcm == [0, 32767, -32767, 16384, -16384, 32767, -32767, 1, 0]  # clamped, rounded
    assert bytes.fromhex(wire) == struct.pack(f"<{len(pcm)}h", *pcm)     # what the server unpacks


def test_pcm16_round_trip_and_level(tmp_path):
    [back, levels] = run(tmp_path, """
        import { floatToPcm16, pcm16ToFloat, levelDb } from "./audio_pcm.js";
        console.log(JSON.stringify([...pcm16ToFloat(Int16Array.from([-32768, 0, 16384, 32767]))]));
        const square = Int16Array.from({ length: 640 }, (_, i) => (i % 2 ? 16384 : -16384));
        console.log(JSON.stringify([levelDb(new Int16Array(640)), levelDb(square), levelDb(new Int16Array(0))]));
    """)
    assert back == [-1, 0, 0.5, 32767 / 32768]
    assert levels[0] == -100 and levels[1] == pytest.approx(20 * np.log10(0.5)) and levels[2] == -100


# --- resampling ---

RESAMPLE = """
    import { Resampler, resample } from "./audio_pcm.js";
    const sine = (rate, hz, seconds, amp = 0.5) =>
      Float32Array.from({ length: Math.round(rate * seconds) }, (_, n) => amp * Math.sin(2 * Math.PI * hz * n / rate));
    const out = (x) => console.log(JSON.stringify(Array.from(x)));
"""


@pytest.mark.parametrize("rate", [48000, 44100, 22050, 8000])
def test_resampling_keeps_a_speech_band_tone(tmp_path, rate):
    [y] = run(tmp_path, RESAMPLE + f"out(resample(sine({rate}, 1000, 1), {rate}, 16000));")
    y = np.array(y)
    assert len(y) == 16000
    ideal = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    inner = slice(100, -100)  # the first and last few ms see the zeros around the file
    assert np.max(np.abs(y[inner] - ideal[inner])) < 0.005


def test_resampling_down_removes_what_would_fold_back(tmp_path):
    # 12 kHz is above the 8 kHz that 16 kHz can hold; without a low-pass it would come
    # back as a 4 kHz tone right in the speech band.
    [y] = run(tmp_path, RESAMPLE + "out(resample(sine(48000, 12000, 0.5), 48000, 16000));")
    y = np.array(y)[100:-100]
    assert np.sqrt(np.mean(y ** 2)) < 0.5 / np.sqrt(2) / 100  # at least 40 dB down


def test_resampling_keeps_a_constant(tmp_path):
    [y] = run(tmp_path, RESAMPLE + "out(resample(new Float32Array(4800).fill(0.25), 48000, 16000));")
    assert np.allclose(np.array(y)[40:-40], 0.25, atol=1e-6)


def test_streaming_resampler_equals_the_whole_file(tmp_path):
    [whole, streamed, counts] = run(tmp_path, RESAMPLE + """
        const x = sine(44100, 440, 0.5);
        out(resample(x, 44100, 16000));
        const r = new Resampler(44100, 16000);
        const parts = [];
        let at = 0;
        const sizes = [1, 127, 128, 441, 3, 1000, 2048];
        for (let k = 0; at < x.length; k++) {
          const n = sizes[k % sizes.length];
          parts.push(...r.push(x.subarray(at, at + n)));
          at += n;
        }
        const beforeFlush = parts.length;
        parts.push(...r.flush());
        out(parts);
        out([beforeFlush, r.buffer.length]);
    """)
    assert streamed == whole  # same arithmetic, bit for bit
    assert len(whole) == 8000
    assert counts[0] < 8000          # some output waits for input after it, until the flush
    assert counts[1] < 44100 * 0.01  # and it keeps only a few ms of input, not the whole stream


# --- chunking and pacing ---

def test_chunker_cuts_320_sample_chunks_stamped_at_their_first_sample(tmp_path):
    # Samples captured in real time from T0: sample s at T0 + s / 16 ms. Pushes of odd sizes,
    # each stamped with the time just after its last sample.
    [chunks] = run(tmp_path, """
        import { Chunker } from "./audio_pcm.js";
        const c = new Chunker();
        const T0 = 5000;
        let s = 0;
        const got = [];
        for (const n of [100, 250, 700, 50, 341, 1]) {
          const block = Int16Array.from({ length: n }, (_, k) => s + k);  // sample number as value
          s += n;
          for (const ch of c.push(block, T0 + s / 16)) got.push([ch.seq, ch.ts, ch.pcm[0], ch.pcm[319], ch.pcm.length]);
        }
        got.push(c.waiting);
        console.log(JSON.stringify(got));
    """)
    waiting = chunks.pop()
    assert [c[0] for c in chunks] == [0, 1, 2, 3]                       # 1442 samples: 4 chunks
    assert [c[1] for c in chunks] == pytest.approx([5000, 5020, 5040, 5060])  # T0 + 20 ms * k
    assert [(c[2], c[3], c[4]) for c in chunks] == [(320 * k, 320 * k + 319, 320) for k in range(4)]
    assert waiting == 1442 - 4 * 320


def test_chunks_due_paces_a_file_at_real_time(tmp_path):
    [due] = run(tmp_path, """
        import { chunksDue } from "./audio_pcm.js";
        console.log(JSON.stringify([chunksDue(1000, 999), chunksDue(1000, 1000), chunksDue(1000, 1019.9),
          chunksDue(1000, 1020), chunksDue(1000, 3000), chunksDue(0, 0.1 + 0.2 - 0.3 + 40)]));
    """)
    assert due == [0, 1, 1, 2, 101, 3]


# --- frame i <-> samples, the PCM store and the schedule ---

def test_frame_i_shows_samples_640_i(tmp_path):
    [mapping, constants] = run(tmp_path, """
        import { frameSamples, SAMPLES_PER_FRAME, FRAME_MS } from "./av_schedule.js";
        console.log(JSON.stringify([0, 1, 2, 25, 1000].map(frameSamples)));
        console.log(JSON.stringify([SAMPLES_PER_FRAME, FRAME_MS]));
    """)
    assert constants == [SAMPLES_PER_VIDEO_FRAME, 40]
    assert [tuple(m) for m in mapping] == [frame_samples(i) for i in (0, 1, 2, 25, 1000)]  # the server's mapping


def test_pcm_store_slices_frames_across_chunks_and_renumbers_after_a_refusal(tmp_path):
    [out] = run(tmp_path, """
        import { PcmStore } from "./av_schedule.js";
        const store = new PcmStore();
        const chunk = (id, n) => store.append(id, Int16Array.from({ length: n }, () => id));
        const starts = [chunk(0, 320), chunk(1, 320), chunk(2, 500), chunk(3, 320)];
        const frame1 = store.frame(1);   // samples 640..1279: chunk 2 (500) then chunk 3 (140)
        const summary = (a) => [a.length, a[0], a[499], a[500], a[639]];
        const before = [starts, store.length, summary(frame1), [...store.slice(1400, 1500).slice(58, 62)]];
        const dropped = [store.drop(1), store.drop(99)];
        const after = [store.length, [...store.frame(0).slice(318, 322)], [...store.slice(819, 821)]];
        console.log(JSON.stringify({ before, dropped, after }));
    """)
    starts, length, frame1, tail = out["before"]
    assert starts == [0, 320, 640, 1140] and length == 1460
    assert frame1 == [640, 2, 2, 3, 3]
    assert tail == [3, 3, 0, 0]  # past the end: silence
    assert out["dropped"] == [True, False]
    length, seam, seam_2_3 = out["after"]
    assert length == 1140
    assert seam == [0, 0, 2, 2]            # chunk 2 now follows chunk 0 directly ...
    assert seam_2_3 == [2, 3]              # ... and chunk 3 starts at 320 + 500


def test_pcm_store_keeps_only_the_newest_samples(tmp_path):
    [out] = run(tmp_path, """
        import { PcmStore } from "./av_schedule.js";
        const store = new PcmStore(1000);
        for (let id = 0; id < 10; id++) store.append(id, new Int16Array(320).fill(id + 1));
        console.log(JSON.stringify([store.length, store.chunks.length, store.slice(0, 2)[0], store.slice(3199, 3200)[0]]));
    """)
    length, kept, oldest, newest = out
    assert length == 3200 and kept <= 5 and oldest == 0 and newest == 10


def test_schedule_paints_frame_i_at_t0_plus_40_i(tmp_path):
    [places] = run(tmp_path, """
        import { AvSchedule } from "./av_schedule.js";
        const s = new AvSchedule({ leadMs: 120, resyncMs: 400, slackMs: 300 });
        const out = [];
        out.push(s.place(0, 1000));   // first frame: shown 120 ms after it is ready
        out.push(s.place(1, 1050));   // on time: waits for 1160
        out.push(s.place(5, 1330));   // due 1320, 10 ms late: painted now, audio from 10 ms into its slice
        out.push(s.place(6, 1380));   // 20 ms late
        out.push(s.place(7, 1440));   // 40 ms late: its audio is skipped
        out.push(s.place(30, 2800));  // due 2320, 480 ms late: the timeline moves
        out.push(s.place(31, 2900));  // on time again (due 2960)
        out.push(s.place(60, 3600));  // due 4120, 520 ms ahead (the pipeline caught up): moves back
        out.push([s.rebases, s.due(61)]);
        console.log(JSON.stringify(out));
    """)
    first, on_time, tail10, tail20, skip, resync, after, early, (rebases, due61) = places
    assert first == {"dueMs": 1120, "lateMs": 0, "audio": "full", "offsetMs": 0, "rebased": False}
    assert on_time == {"dueMs": 1160, "lateMs": 0, "audio": "full", "offsetMs": 0, "rebased": False}
    assert tail10 == {"dueMs": 1330, "lateMs": 10, "audio": "tail", "offsetMs": 10, "rebased": False}
    assert (tail20["audio"], tail20["offsetMs"]) == ("tail", 20)
    assert (skip["audio"], skip["dueMs"], skip["lateMs"]) == ("skip", 1440, 40)
    assert resync == {"dueMs": 2920, "lateMs": 0, "audio": "full", "offsetMs": 0, "rebased": True}
    assert after == {"dueMs": 2960, "lateMs": 0, "audio": "full", "offsetMs": 0, "rebased": False}
    assert early == {"dueMs": 3720, "lateMs": 0, "audio": "full", "offsetMs": 0, "rebased": True}
    assert (rebases, due61) == (2, 3760)


def test_pick_frame_paints_the_newest_due_and_passes_over_older(tmp_path):
    [picked] = run(tmp_path, """
        import { pickFrame } from "./av_schedule.js";
        const w = [{ dueMs: 100, i: 0 }, { dueMs: 140, i: 1 }, { dueMs: 180, i: 2 }];
        const ids = (r) => [r.paint ? r.paint.i : null, r.passed.map((x) => x.i), r.rest.map((x) => x.i)];
        console.log(JSON.stringify([ids(pickFrame(w, 90)), ids(pickFrame(w, 95)), ids(pickFrame(w, 145)),
                                    ids(pickFrame(w, 500)), ids(pickFrame([], 500))]));
    """)
    assert picked == [[None, [], [0, 1, 2]],   # nothing due yet
                      [0, [], [1, 2]],         # due within half a refresh: paint now
                      [1, [0], [2]],           # two due: the newer one, the older passed over
                      [2, [0, 1], []],
                      [None, [], []]]


def test_microphone_errors_read_as_sentences(tmp_path):
    [texts] = run(tmp_path, """
        import { micErrorText } from "./audio_in.js";
        const e = (name) => Object.assign(new Error("x"), { name });
        console.log(JSON.stringify(["NotAllowedError", "NotFoundError", "NotReadableError", "Weird"].map((n) => micErrorText(e(n)))));
    """)
    assert texts[0].startswith("microphone permission denied")
    assert texts[1] == "no microphone found"
    assert "in use" in texts[2]
    assert "https or localhost" in texts[3]  # Node has no getUserMedia, like an insecure page


def test_models_card_reads_the_directory_and_a_plain_list(tmp_path):
    directory = {"placement": "least_loaded",
                 "replicas": [{"replica": 0, "capacity_bytes": 4e9, "used_bytes": 9.6e7},
                              {"replica": 1, "capacity_bytes": 4e9, "used_bytes": 0}],
                 "avatars": {"robot": {"replicas": [1], "state": "loading", "assigned": 1},
                             "astronaut": {"replicas": [0, 1], "state": "resident", "assigned": None},
                             "ghost": {"replicas": [], "state": "failed", "assigned": None}}}
    plain = {"models": [{"id": "astronaut", "loaded": True, "bytes": 48_000_000}, {"id": "robot", "loaded": False}]}
    [a, b, lines, actions] = run(tmp_path, f"""
        import {{ modelRows, replicaLines, actionFor }} from "./models_view.js";
        const rows = modelRows({json.dumps(directory)}, ["astronaut", "robot", "broken"]);
        console.log(JSON.stringify(rows));
        console.log(JSON.stringify(modelRows({json.dumps(plain)}, ["astronaut", "robot"])));
        console.log(JSON.stringify(replicaLines({json.dumps(directory)})));
        console.log(JSON.stringify(rows.map(actionFor)));
    """)
    assert [(r["id"], r["state"], r["where"]) for r in a] == [
        ("astronaut", "resident", "GPU 0, 1"), ("robot", "loading", "GPU 1"), ("broken", "not loaded", ""),
        ("ghost", "failed", "")]  # the page's avatars in its order, then the pipeline's others
    assert [(r["id"], r["state"], r["size"]) for r in b] == [("astronaut", "resident", "48.0 MB"),
                                                              ("robot", "not loaded", "")]
    assert lines == ["GPU 0: 96.0 MB of 4.00 GB", "GPU 1: 0 B of 4.00 GB"]
    assert actions == ["unload", "unload", "load", "load"]
