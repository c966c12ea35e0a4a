"""The pages' pure modules under Node.js: stats as tables of numbers, face label placement,
the latency histogram's buckets, and what both pages share (reconnect backoff, the close
note, visions by frame id, millisecond figures). Runs only where Node.js is installed (as
test_server_wire_js); ``run`` serves test_page_lipsync_js too."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from echo_hooks import EchoHooks

from stages.server.http_routes import STATIC_DIR
from stages.server.protocol import encode_message

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js not installed")


def run(tmp_path, body: str) -> list:
    """Run ``body`` as an ES module beside copies of the pages' modules; one JSON value per line."""
    # A package.json saying "module" lets Node load the .js files as the ES modules they
    # are, under their own names, so their imports of each other resolve as in the browser.
    (tmp_path / "package.json").write_text('{"type": "module"}')
    for path in STATIC_DIR.glob("*.js"):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    script = tmp_path / "check.js"
    script.write_text(body)
    result = subprocess.run([NODE, str(script)], capture_output=True, text=True, timeout=60, check=True)
    return [json.loads(line) for line in result.stdout.splitlines()]


def runtime_stats() -> dict:
    """A ``stats`` payload as the page receives it: the double's (shaped like the runtime's
    aggregator) plus the server's part, through the real encoder."""
    hooks = EchoHooks()
    try:
        stats = {**hooks.stats(), "server": {"sessions": 2, "uptime_s": 12.5,
                                             "session": {"id": "abc", "uptime_s": 3.25, "frames_in": 7}}}
    finally:
        hooks.close()
    return json.loads(encode_message("stats", stats))["payload"]


def test_stats_become_tables_of_numbers_never_json(tmp_path):
    [model] = run(tmp_path, 'import { statsModel } from "./stats_view.js";\n'
                            f"console.log(JSON.stringify(statsModel({json.dumps(runtime_stats())})));")
    texts = [f["value"] for f in model["figures"]] + [i["value"] for g in model["groups"] for i in g["items"]]
    texts += [c["text"] for t in model["tables"] for rows in (t["head"], t["rows"]) for row in rows for c in row]
    assert all(isinstance(t, str) for t in texts)
    assert not [t for t in texts if any(ch in t for ch in '{}[]"')]

    tables = {t["key"]: t for t in model["tables"]}
    assert list(tables) == ["ranks", "stages", "hops", "spans", "server"]
    stages = tables["stages"]
    top, sub = stages["head"]
    assert {"text": "compute (ms)", "colspan": 4, "cls": "group"} in top
    assert [c["text"] for c in sub][:4] == ["p50", "p95", "p99", "n"]
    generator = next(r for r in stages["rows"] if r[0]["text"] == "generator")
    cells = [c["text"] for c in generator]
    assert cells[:6] == ["generator", "120", "120", "60", "0", "0"]
    assert cells[-4:] == ["11.0", "15.2", "18.7", "120"]  # compute_ms, a group of columns after the plain ones
    hop = tables["hops"]["rows"][0]
    assert hop[0]["text"] == "ingest#0 → vision#0" and "123 KB" in [c["text"] for c in hop]
    ranks = tables["ranks"]
    assert [c["text"] for c in ranks["head"][0]] == ["rank", "role", "alive", "last seen (s)"]
    assert [c["text"] for c in ranks["rows"][0]] == ["0", "server", "● up", "0"]
    server_sub = [c["text"] for c in tables["server"]["head"][1]]
    assert server_sub == ["id", "uptime (s)", "in"]  # the session's own columns, units where the group has none

    spans = tables["spans"]
    assert spans["title"] == "spans of a frame (ms)" and [c["text"] for c in spans["head"][0]] == ["", "p50", "p95", "p99", "n"]
    assert [c["text"] for c in spans["rows"][1]] == ["generator.start → generator.end", "11.0", "15.2", "18.7", "120"]

    groups = {g["key"]: g for g in model["groups"]}
    assert groups["server_latency_ms"]["items"] == [{"label": "p50", "value": "0.40 ms"},
                                                    {"label": "p95", "value": "0.90 ms"},
                                                    {"label": "p99", "value": "1.20 ms"},
                                                    {"label": "n", "value": "10"}]
    assert groups["drops"]["title"] == "drops"
    figures = {f["key"]: f["value"] for f in model["figures"]}
    assert figures["revision"] == "1" and figures["nan_is_null"] == "–"


def test_face_labels_go_above_inside_at_the_top_and_never_overlap(tmp_path):
    bounds = {"left": 0, "top": 0, "right": 400, "bottom": 300}
    cases = {
        "above": [{"x": 100, "y": 100, "w": 80, "h": 80, "width": 90}],
        "top_edge": [{"x": 100, "y": 5, "w": 80, "h": 80, "width": 90}],
        "right_edge": [{"x": 350, "y": 100, "w": 50, "h": 50, "width": 90}],
        "side_by_side": [{"x": 100, "y": 100, "w": 60, "h": 60, "width": 90},
                         {"x": 170, "y": 102, "w": 60, "h": 60, "width": 90}],
        "crowd": [{"x": 10 + 12 * i, "y": 4, "w": 30, "h": 30, "width": 120} for i in range(6)],
    }
    [placed] = run(tmp_path, f"""
        import {{ placeLabels, overlaps }} from "./overlay.js";
        const cases = {json.dumps(cases)}; const bounds = {json.dumps(bounds)};
        const out = {{}};
        for (const [name, items] of Object.entries(cases)) {{
          const labels = placeLabels(items, bounds);
          const clash = labels.some((a, i) => labels.some((b, j) => i < j && overlaps(a, b)));
          out[name] = {{ labels, clash }};
        }}
        console.log(JSON.stringify(out));
    """)
    assert placed["above"]["labels"] == [{"x": 100, "y": 80, "w": 90, "h": 20}]        # on top of the box
    assert placed["top_edge"]["labels"] == [{"x": 100, "y": 5, "w": 90, "h": 20}]      # inside, at its top
    assert placed["right_edge"]["labels"][0]["x"] == 310                              # pulled into the frame
    for name, result in placed.items():
        assert not result["clash"], name
        for r in result["labels"]:
            assert 0 <= r["x"] <= r["x"] + r["w"] <= 400 and 0 <= r["y"] <= r["y"] + r["h"] <= 300, (name, r)
    first = placed["side_by_side"]["labels"][0]
    assert first == {"x": 100, "y": 80, "w": 90, "h": 20}  # the first (primary) keeps its place


def test_latency_histogram_buckets(tmp_path):
    out = run(tmp_path, """
        import { histogram, chooseStep } from "./latency_chart.js";
        console.log(JSON.stringify(histogram([1, 2, 12, 19, 22, 300], 12)));
        console.log(JSON.stringify(histogram([30, 60, 90, 120, 130], 12)));
        console.log(JSON.stringify([chooseStep(40, 12), chooseStep(40, 12, 10), chooseStep(40, 12, 200), chooseStep(0, 12)]));
    """)
    assert out[0] == {"step": 50, "counts": [5, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]}  # p95 is 300 ms: 50-ms buckets
    assert out[1] == {"step": 20, "counts": [0, 1, 0, 1, 1, 0, 2, 0, 0, 0, 0, 0]}
    assert out[2] == [5, 10, 5, 5]  # a step that still fits is kept unless far too coarse


# --- what both pages share ---

def test_reconnects_back_off_doubling_to_a_cap_and_say_why(tmp_path):
    [delays, notes] = run(tmp_path, """
        import { reconnectDelay, closeText } from "./connection.js";
        console.log(JSON.stringify([0, 1, 2, 3, 4, 5, 10].map((n) => [reconnectDelay(n, 0), reconnectDelay(n, 0.5), reconnectDelay(n, 1)])));
        console.log(JSON.stringify([closeText({ code: 1006, reason: "" }), closeText({ code: 1013, reason: "busy" }),
                                    closeText({ code: 4000, reason: "" })]));
    """)
    assert [d[1] for d in delays] == [500, 1000, 2000, 4000, 8000, 8000, 8000]  # doubling, capped at 8 s
    assert all(d[0] == 0.75 * d[1] and d[2] == 1.25 * d[1] for d in delays)    # +-25% jitter
    assert notes == ["disconnected: server unreachable (1006)",
                     "disconnected: server full, try again later (1013 busy)", "disconnected: closed (4000)"]


def test_after_a_1012_close_the_page_tries_every_second_for_a_while(tmp_path):
    [delays, note] = run(tmp_path, """
        import { reconnectDelay, closeText } from "./connection.js";
        console.log(JSON.stringify([0, 1, 2, 3, 19, 20, 21].map((n) => reconnectDelay(n, 0.5, true))));
        console.log(JSON.stringify(closeText({ code: 1012, reason: "rank 2 (generator) died" })));
    """)
    assert delays == [500, 1000, 1000, 1000, 1000, 8000, 8000]  # then the usual backoff
    assert note == "disconnected: server restarting (1012 rank 2 (generator) died)"


def test_a_status_becomes_a_banner_and_a_note(tmp_path):
    [degraded, restarting, note] = run(tmp_path, """
        import { statusModel, statusNote } from "./job_status.js";
        const lost = [{ rank: 3, role: "generator", cause: "died" }];
        console.log(JSON.stringify(statusModel({ state: "degraded", message: "rank 3 (generator) died; its 'generator' frames go to rank 2", lost })));
        console.log(JSON.stringify(statusModel({ state: "restarting", message: "m", lost: [] })));
        console.log(JSON.stringify(statusNote({ state: "degraded", message: "m" })));
    """)
    assert degraded == {"headline": "Running degraded", "text": "rank 3 (generator) died; its 'generator' frames go "
                        "to rank 2", "lost": ["rank 3 (generator) died"], "level": "warn"}
    assert restarting == {"headline": "Restarting", "text": "m", "lost": [], "level": "bad"}
    assert note == "degraded: m"


def test_frame_visions_are_taken_when_their_frame_is_painted(tmp_path):
    [out] = run(tmp_path, """
        import { FrameVisions } from "./frame_visions.js";
        const v = new FrameVisions(3);
        for (const id of [1, 2, 3, 4, 5]) v.add({ frame_id: id });  // 1 and 2 pushed out
        const got = [v.take(1), v.take(4)?.frame_id, [...v.byId.keys()], v.take(4)];
        v.clear();
        got.push(v.byId.size);
        console.log(JSON.stringify(got));
    """)
    assert out == [None, 4, [5], None, 0]  # taking 4 forgets 3 (never painted now) and 4 itself


def test_milliseconds_keep_steady_decimals(tmp_path):
    [texts] = run(tmp_path, """
        import { ms } from "./latency_card.js";
        console.log(JSON.stringify([24, 99.94, 100, 1234.5, -12.34, -150, NaN, undefined].map(ms)));
    """)
    assert texts == ["24.0", "99.9", "100", "1235", "-12.3", "-150", "–", "–"]  # A/V offsets may be negative
