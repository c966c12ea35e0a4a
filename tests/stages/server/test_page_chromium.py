"""The real page in headless Chromium, with Chromium's fake camera, against the echo double.

It checks what a person at a 1280x800 window would see once frames flow: no horizontal
scroll, stats as tables of numbers (no JSON in any cell), a filled latency histogram,
the bandwidth of every link (rates from the double's growing byte counters, which count
the frames the page really sent) and the ranks grouped by node (from GET /health, since
these stats name no nodes), the generator and style of the frame on screen, a note that
live settings are shared, form labels and face labels that do not overlap, and no
console errors.

Skipped only when no Chromium binary is found (CI installs the ``chromium`` package).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import pytest
from chromium import Chromium, Page, find_chromium, set_viewport
from echo_hooks import GENERATOR, PLACES

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary found (apt-get install chromium)")

WIDTH, HEIGHT = 1280, 800
FRAMES = 30
"""Portraits painted before the page is judged: enough for every panel to have data."""

READY = f"""(() => {{
  const m = window.mindMirror && window.mindMirror.snapshot();
  const bars = [...document.querySelectorAll('#latency-histogram .hist-bar')];
  return !!m && m.painted >= {FRAMES} && m.labels.length >= 2
    && document.querySelectorAll('#stats table').length >= 3
    && bars.some((b) => Number(b.dataset.count) > 0)
    && document.getElementById('generator').textContent !== '–'
    && m.job.links.length === 3 && m.job.links.every((l) => l.bytesPerS > 0) && m.job.nodes.length === 2;
}})()"""

FACTS = """(() => {
  const box = (e) => { const r = e.getBoundingClientRect(); return {x: r.x, y: r.y, w: r.width, h: r.height}; };
  const text = (id) => document.getElementById(id).textContent.trim();
  const overlay = document.getElementById('overlay').getBoundingClientRect();
  return {
    scrollWidth: document.documentElement.scrollWidth,
    innerWidth: window.innerWidth,
    statsTexts: [...document.querySelectorAll('#stats th, #stats td, #stats .figure-value, #stats .pair-value')]
      .map((e) => e.textContent),
    tables: [...document.querySelectorAll('#stats .stats-section')].map((s) => s.dataset.key),
    scrollingBoxes: [...document.querySelectorAll('.table-box, .card')]
      .filter((e) => e.scrollWidth > e.clientWidth + 1).map((e) => e.className),
    bins: [...document.querySelectorAll('#latency-histogram .hist-bar')].map((b) => Number(b.dataset.count)),
    g2g: [text('g2g-p50'), text('g2g-p90'), text('latency-p50'), text('latency-p90')],
    makerHidden: document.getElementById('maker').hidden,
    generator: text('generator'),
    styleName: text('style-name'),
    note: text('shared-note'),
    noteBox: box(document.getElementById('shared-note')),
    formBox: box(document.getElementById('config-form')),
    formLabels: [...document.querySelectorAll('#config-form label')].map(box),
    overlay: {w: overlay.width, h: overlay.height},
    snapshot: window.mindMirror.snapshot(),
    pageErrors: [...document.querySelectorAll('#messages li.error')].map((li) => li.textContent),
    links: [...document.querySelectorAll('#job-links tbody tr')].map((tr) => [...tr.cells].map((c) => c.textContent)),
    linkHead: [...document.querySelectorAll('#job-links th')].map((th) => th.textContent),
    bars: [...document.querySelectorAll('#job-links .bw-bar i')].map((i) => i.getBoundingClientRect().width),
    nodes: [...document.querySelectorAll('#job-nodes .node')].map((n) => ({
      node: n.dataset.node, head: n.querySelector('.node-head').textContent,
      ranks: [...n.querySelectorAll('li.rank')].map((li) => [li.dataset.rank, li.className, li.title])})),
    mediaProblemHidden: document.getElementById('media-problem').hidden,
  };
})()"""


def intersects(a: dict, b: dict) -> bool:
    return a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]


async def look_at_page(url: str, port: int, screenshot, hooks) -> dict:
    page = await Page.attach(port)
    try:
        await page.call("Emulation.setDeviceMetricsOverride", **set_viewport(WIDTH, HEIGHT))
        await page.call("Page.navigate", url=url)
        await page.wait_for(READY, timeout_s=45, what=f"{FRAMES} painted frames with stats, histogram, labels and link rates")
        facts = await page.evaluate(FACTS)
        facts["mean_jpeg"] = hooks.bytes_in / hooks.count_in  # what the page's frames weigh on the wire
        await page.screenshot(screenshot)
        facts["problems"] = list(page.problems)
        return facts
    finally:
        await page.close()


@pytest.mark.timeout(120)
def test_page_in_headless_chromium(server, hooks, tmp_path):
    started = time.monotonic()
    screenshot = Path(os.environ.get("MM_PAGE_SCREENSHOT") or tmp_path / "page.png")  # to look at it
    with Chromium(CHROMIUM, width=WIDTH, height=HEIGHT) as browser:
        facts = asyncio.run(look_at_page(server.url, browser.port, screenshot, hooks))
    elapsed = time.monotonic() - started
    shot = f"(screenshot: {screenshot})"

    assert facts["problems"] == [], shot
    assert facts["pageErrors"] == [], shot
    # Nothing wider than the window, and no table that needs its own scrollbar at 1280 px.
    assert facts["scrollWidth"] <= facts["innerWidth"] == WIDTH, shot
    assert facts["scrollingBoxes"] == [], shot

    # Stats: tables of numbers and words; nested percentiles became columns, not JSON.
    assert {"stages", "hops", "spans"} <= set(facts["tables"]), facts["tables"]
    assert "ranks" not in facts["tables"]  # shown by node in the "Links and ranks" card instead
    json_like = [t for t in facts["statsTexts"] if re.search(r'[{}\[\]]|"\w+"\s*:', t)]
    assert json_like == [], json_like
    assert {"p50", "p95", "p99", "18.7"} <= set(facts["statsTexts"]), shot  # compute_ms of the generator

    # The page's own glass-to-glass latency: a histogram with frames in it, and percentiles.
    assert 0 < sum(facts["bins"]) <= facts["snapshot"]["g2g"]["count"]  # the chart redraws 4x a second
    assert all(re.fullmatch(r"\d+(\.\d+)?", v) for v in facts["g2g"]), facts["g2g"]
    # ... split into encode, round trip and paint: each part a time, none longer than the whole.
    split, g2g = facts["snapshot"]["split_p50_ms"], facts["snapshot"]["g2g"]
    assert set(split) == {"encode_send", "server_round_trip", "decode_paint"}, split
    assert all(0 <= v <= g2g["p99"] for v in split.values()), (split, g2g)

    # Bandwidth per link: a row each, rates from successive stats. The frames the page sends
    # make the first two links' counters grow, so bytes per message there is a frame's JPEG.
    assert facts["linkHead"] == ["link", "MB/s", "msgs/s", "sent"]  # no "nodes": these stats name none
    names = [row[0] for row in facts["links"]]
    assert names == ["ingest#0 → vision#0", "vision#0 → generator#0", "generator#0 → display#0"]
    assert all(re.fullmatch(r"\d+\.\d{3}", row[1]) and re.fullmatch(r"\d+\.\d", row[2]) for row in facts["links"])
    links = {link["name"]: link for link in facts["snapshot"]["job"]["links"]}
    into = links["vision#0->generator#0"]
    assert 0.5 < into["bytesPerS"] / into["messagesPerS"] / facts["mean_jpeg"] < 2, (into, facts["mean_jpeg"])
    assert 1 <= into["messagesPerS"] <= 60  # frames per second, as the page sends them
    assert all(link["crossNode"] is None for link in links.values())
    assert max(facts["bars"]) > 0  # the busiest link's bar is drawn

    # Rank liveness per node, placed through GET /health: node-a holds ranks 0 and 2.
    nodes = facts["nodes"]
    assert [(n["node"], [r[0] for r in n["ranks"]]) for n in nodes] == [("node-a", ["0", "2"]), ("node-b", ["1"])]
    assert [n["head"] for n in nodes] == ["node-a 2/2 up", "node-b 1/1 up"]
    assert nodes[1]["ranks"][0][1:] == ["rank up", f"rank 1, generator on {PLACES[1]['device']}: up, heard from 0.1 s ago"]
    assert facts["mediaProblemHidden"]  # 127.0.0.1 is a secure page: the camera works

    # Which generator made the frame on screen, in which style.
    assert not facts["makerHidden"]
    assert facts["generator"] == GENERATOR == facts["snapshot"]["generator"]
    assert facts["styleName"] == hooks.live.current()[1].style

    # Live settings are shared, and the page says so next to the form.
    assert "every browser session" in facts["note"] and "1 session is connected" in facts["note"]
    assert facts["noteBox"]["h"] > 0 and facts["noteBox"]["y"] < facts["formBox"]["y"]

    # Nothing overlaps: form labels, and the face labels drawn over the video.
    labels = facts["formLabels"]
    assert len(labels) == 7 and all(b["w"] > 0 and b["h"] > 0 for b in labels)
    assert not [(i, j) for i in range(len(labels)) for j in range(i) if intersects(labels[i], labels[j])]
    faces = facts["snapshot"]["labels"]
    assert len(faces) == 2 and faces[0]["text"].startswith("★ ")  # the primary face first, marked
    assert not intersects(faces[0], faces[1]), faces
    w, h = facts["overlay"]["w"], facts["overlay"]["h"]
    assert all(0 <= f["x"] and f["x"] + f["w"] <= w and 0 <= f["y"] and f["y"] + f["h"] <= h for f in faces), faces

    assert elapsed < 60, f"the check took {elapsed:.1f} s"


LEGACY_READY = """(() => {
  const m = window.mindMirror && window.mindMirror.snapshot();
  return !!m && m.painted >= 10 && m.labels.length >= 2 && document.querySelectorAll('#stats table').length >= 3;
})()"""


async def look_at_legacy_page(url: str, port: int) -> dict:
    page = await Page.attach(port)
    try:
        await page.call("Emulation.setDeviceMetricsOverride", **set_viewport(WIDTH, HEIGHT))
        await page.call("Page.navigate", url=url)
        await page.wait_for(LEGACY_READY, timeout_s=45, what="painted frames and face labels")
        facts = await page.evaluate("""({
            makerHidden: document.getElementById('maker').hidden,
            snapshot: window.mindMirror.snapshot(),
            scrollWidth: document.documentElement.scrollWidth,
            pageErrors: [...document.querySelectorAll('#messages li.error')].map((li) => li.textContent),
        })""")
        facts["problems"] = list(page.problems)
        return facts
    finally:
        await page.close()


@pytest.mark.timeout(120)
def test_page_takes_vision_from_older_servers(server, hooks):
    """No generator, style, landmarks or primary flag: the page shows what it has, quietly."""
    hooks.legacy_vision = True
    with Chromium(CHROMIUM, width=WIDTH, height=HEIGHT) as browser:
        facts = asyncio.run(look_at_legacy_page(server.url, browser.port))
    assert facts["problems"] == [] and facts["pageErrors"] == []
    assert facts["makerHidden"] and facts["snapshot"]["generator"] is None
    texts = [label["text"] for label in facts["snapshot"]["labels"]]
    assert sorted(texts) == ["happy 80%", "neutral 60%"]  # no face is marked primary
    assert facts["scrollWidth"] <= WIDTH


async def watch_a_lost_rank(url: str, port: int, server) -> dict:
    """The page before and after a ``status`` (degraded), then after a 1012 close."""
    page = await Page.attach(port)
    try:
        await page.call("Page.navigate", url=url)
        await page.wait_for("window.mindMirror && window.mindMirror.snapshot().painted >= 3", timeout_s=45,
                            what="3 painted frames")
        server.deliver_status("degraded", "rank 3 (generator) died; its 'generator' frames go to rank 2",
                              [{"rank": 3, "role": "generator", "cause": "died"}])
        await page.wait_for("!document.getElementById('job-status').hidden", timeout_s=10, what="the banner")
        painted = await page.evaluate("window.mindMirror.snapshot().painted")
        await page.wait_for(f"window.mindMirror.snapshot().painted >= {painted + 3}", timeout_s=10,
                            what="frames after the status")
        facts = {"banner": await page.evaluate("document.getElementById('job-status').textContent"),
                 "bannerClass": await page.evaluate("document.getElementById('job-status').className"),
                 "degraded": await page.evaluate("window.mindMirror.snapshot()")}
        server.stop(restart_reason="rank 2 (generator) died; the job is restarting")
        await page.wait_for("document.getElementById('connection').textContent.startsWith('reconnecting')",
                            timeout_s=10, what="the page reconnecting")
        facts["notes"] = await page.evaluate("[...document.querySelectorAll('#messages li')].map((li) => li.textContent)")
        facts["problems"] = list(page.problems)
        return facts
    finally:
        await page.close()


@pytest.mark.timeout(120)
def test_page_shows_a_lost_rank_keeps_its_session_and_reconnects_after_a_restart(server, hooks):
    with Chromium(CHROMIUM, width=WIDTH, height=HEIGHT) as browser:
        facts = asyncio.run(watch_a_lost_rank(server.url, browser.port, server))
    assert facts["banner"] == "Running degraded: rank 3 (generator) died; its 'generator' frames go to rank 2"
    assert "job-warn" in facts["bannerClass"]
    assert facts["degraded"]["connection"] == "live" and facts["degraded"]["jobStatus"] == "degraded"
    notes = facts["notes"]
    assert any("degraded: rank 3 (generator) died" in n for n in notes), notes
    assert any("disconnected: server restarting (1012 rank 2 (generator) died; the job is restarting)" in n
               for n in notes), notes
    assert facts["problems"] == []
