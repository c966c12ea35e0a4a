"""The lip-sync page in headless Chromium against the lip-sync double (and, briefly, the mirror's).

It picks an avatar, streams a WAV file (44.1 kHz stereo, through the page's real decode,
resample and pacing path), then speaks into Chromium's fake microphone, and checks what
the server received (16 kHz PCM16 that is still the file's 220 Hz tone, numbered chunks
20 ms apart, sent at the pace the file plays) and what the page did with the frames that
came back (painted on the jitter buffer's schedule, each with its slice of audio, and the
page's own end-to-end latency and A/V offset figures). Here the double's stats name every
rank's node and every link's end nodes, and one rank is down: the "Links and ranks" card
marks the links between machines and the dead rank.

Skipped only when no Chromium binary is found (CI installs the ``chromium`` package).
"""

from __future__ import annotations

import asyncio
import os
import time
import wave
from pathlib import Path

import numpy as np
import pytest
from chromium import Chromium, Page, find_chromium, set_viewport

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary found (apt-get install chromium)")

WIDTH, HEIGHT = 1280, 800
SECONDS = 2.0
TONE_HZ = 220.0
# The page's AudioContext is made in a click; a file set through DevTools is no click, so
# let Web Audio start without one (a person's drop or click would do the same).
FLAGS = ("--autoplay-policy=no-user-gesture-required",)
SNAPSHOT = "window.mindMirrorLipSync.snapshot()"


FILE_FRAMES = 50 + 13
"""Video frames of the 2 s file as the page sends it: 50, and 13 more of silence (the
pipeline's 0.45 s look-ahead, rounded up to whole frames, plus one) so its last words get
their frames."""


def write_wav(path: Path, seconds: float = SECONDS, rate: int = 44100) -> Path:
    """Stereo 16-bit: a 220 Hz tone in two 'syllables' a second (so loudness moves)."""
    t = np.arange(int(seconds * rate)) / rate
    x = 0.5 * (0.5 - 0.5 * np.cos(2 * np.pi * 2 * t)) * np.sin(2 * np.pi * TONE_HZ * t)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.stack([x, x], 1) * 32767).astype("<i2").tobytes())
    return path


async def click(page: Page, selector: str) -> None:
    """A real mouse click (a user gesture, unlike element.click())."""
    box = await page.evaluate(f"""(() => {{ const r = document.querySelector('{selector}').getBoundingClientRect();
        return {{x: r.x + r.width / 2, y: r.y + r.height / 2}}; }})()""")
    for kind in ("mousePressed", "mouseReleased"):
        await page.call("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left", clickCount=1)


async def drive(url: str, port: int, wav: Path, screenshot: Path) -> dict:
    page = await Page.attach(port)
    try:
        await page.call("Emulation.setDeviceMetricsOverride", **set_viewport(WIDTH, HEIGHT))
        await page.watch_network()
        await page.call("Page.navigate", url=url)
        await page.wait_for(f"window.mindMirrorLipSync && {SNAPSHOT}.avatars.length === 3", 10, "avatars")
        await page.evaluate("""(() => { const s = document.getElementById('avatar-select');
            s.value = 'robot'; s.dispatchEvent(new Event('change', {bubbles: true})); })()""")
        await page.wait_for(f"{SNAPSHOT}.avatar === 'robot'", 5, "avatar robot selected")

        await page.call("DOM.enable")
        root = (await page.call("DOM.getDocument"))["root"]["nodeId"]
        node = (await page.call("DOM.querySelector", nodeId=root, selector="#file"))["nodeId"]
        started = time.monotonic()
        await page.call("DOM.setFileInputFiles", nodeId=node, files=[str(wav)])
        await page.wait_for(f"{SNAPSHOT}.source.includes('all 2.5 s sent')", 15, "the file streamed")
        streamed_s = time.monotonic() - started
        # Every frame painted, or passed over when it came too late for its time (a loaded machine).
        await page.wait_for(f"(({{painted, passed}}) => painted + passed)({SNAPSHOT}.player) >= {FILE_FRAMES}", 10,
                            "every frame of the file painted or passed")
        after_file = await page.evaluate(SNAPSHOT)
        await page.wait_for(f"{SNAPSHOT}.job.links.filter((l) => l.bytesPerS > 0).length === 3", 5, "link rates")
        job = await page.evaluate("""({
            crossRows: [...document.querySelectorAll('#job-links tr.cross')].map((tr) => tr.dataset.link),
            nodeCells: [...document.querySelectorAll('#job-links tbody tr')].map((tr) => tr.cells[1].textContent),
            heading: document.querySelector('.job-links h3').textContent,
            nodes: [...document.querySelectorAll('#job-nodes .node')].map((n) => [n.dataset.node, n.className,
              n.querySelector('.node-head').textContent, [...n.querySelectorAll('li.rank')].map((li) => li.className)]),
            snapshot: window.mindMirrorLipSync.snapshot().job,
        })""")
        await page.screenshot(screenshot)

        # Load robot's model from the Models card: a same-origin POST, then the row says so.
        await page.wait_for("!!document.querySelector('#models tbody tr:nth-child(2) button')", 5, "the models table")
        await click(page, "#models tbody tr:nth-child(2) button")
        await page.wait_for("document.querySelector('#models tbody tr:nth-child(2)').cells[1].textContent"
                            " === 'resident'", 5, "robot's model loaded")

        await click(page, "#mic")
        await page.wait_for(f"{SNAPSHOT}.source.startsWith('microphone on')", 10, "the microphone on")
        await page.wait_for(f"{SNAPSHOT}.painted >= {after_file['painted'] + 20}", 10, "frames from the microphone")
        after_mic = await page.evaluate(SNAPSHOT)
        await click(page, "#stop")
        facts = await page.evaluate("""({
            scrollWidth: document.documentElement.scrollWidth,
            pageErrors: [...document.querySelectorAll('#messages li.error')].map((li) => li.textContent),
            models: [...document.querySelectorAll('#models tbody tr')].map((tr) => tr.cells[0].textContent),
            status: document.getElementById('source-status').textContent,
        })""")
        return {"file": after_file, "mic": after_mic, "streamed_s": streamed_s, "problems": list(page.problems),
                "job": job, "requests": [r[1] for r in page.requests], **facts}
    finally:
        await page.close()


@pytest.mark.timeout(90)
def test_lipsync_page_streams_a_wav_and_the_microphone(lipsync_server, lipsync_hooks, tmp_path):
    lipsync_hooks.stats_nodes = True
    lipsync_hooks.down = {2}
    started = time.monotonic()
    wav = write_wav(tmp_path / "speech.wav")
    screenshot = Path(os.environ.get("MM_LIPSYNC_SCREENSHOT") or tmp_path / "lipsync.png")
    with Chromium(CHROMIUM, width=WIDTH, height=HEIGHT, extra_args=FLAGS) as browser:
        got = asyncio.run(drive(lipsync_server.url + "lipsync", browser.port, wav, screenshot))
    elapsed = time.monotonic() - started
    shot = f"(screenshot: {screenshot})"

    assert got["problems"] == [] and got["pageErrors"] == [], shot
    assert got["scrollWidth"] <= WIDTH, shot
    assert got["models"] == ["astronaut", "robot", "broken"]  # GET /models, drawn as a table
    assert "robot" in lipsync_hooks.loaded                     # POST /models/robot/load from its button

    # What the server received from the file: 2 s of 16 kHz PCM16, still a 220 Hz tone.
    [session] = lipsync_hooks.opened
    assert lipsync_hooks.selected == {session: "robot"}
    chunks = [c for c in lipsync_hooks.audio if c[0] == session]
    file_chunks = chunks[:100]
    assert [c[1] for c in chunks] == list(range(len(chunks)))             # numbered from 0, none missing
    assert {c[3] for c in file_chunks} == {640}                             # 20 ms each
    assert np.allclose(np.diff([c[2] for c in file_chunks]), 20.0)          # stamped 20 ms apart
    pcm = np.frombuffer(bytes(lipsync_hooks.pcm[session][:64000]), "<i2") / 32768
    spectrum = np.abs(np.fft.rfft(pcm))
    assert np.fft.rfftfreq(len(pcm), 1 / 16000)[spectrum.argmax()] == pytest.approx(TONE_HZ, abs=1)
    assert 0.45 < np.abs(pcm).max() < 0.52
    assert not np.any(lipsync_hooks.pcm[session][64000:FILE_FRAMES * 1280])  # then the look-ahead's silence
    # ... at the pace it plays: 2.5 s of audio took about 2.5 s, and nothing was refused.
    assert 2.4 < got["streamed_s"] < 5.5, got["streamed_s"]
    file = got["file"]
    assert file["sent"]["refused"] == 0 and file["sent"]["chunks"] == FILE_FRAMES * 2

    # What the page did with the file's frames: painted on time, each with its audio.
    assert file["lipsync"]["avatar"] == "robot" and file["lipsync"]["generator"] == "echo"
    player = file["player"]
    assert player["decoded"] == FILE_FRAMES and player["painted"] + player["passed"] == FILE_FRAMES
    assert player["audio_full"] + player["audio_tail"] >= 45, player
    assert file["e2e"]["count"] >= 45 and 40 < file["e2e"]["p50"] < 1000, file["e2e"]
    assert file["av"]["count"] >= 45 and file["av"]["abs_p90"] < 40, file["av"]  # within a frame
    assert file["audio"] == "running"

    # Then the fake microphone: more chunks, more frames, on the same session's timeline.
    mic = got["mic"]
    assert mic["sent"]["chunks"] > file["sent"]["chunks"] + 20 and mic["sent"]["refused"] == 0
    assert mic["painted"] >= file["painted"] + 20
    assert len(chunks) >= 120
    assert got["status"] == "Stopped."

    # Links and ranks, as these stats name them: two of three links cross between nodes.
    job = got["job"]
    assert job["crossRows"] == ["vision#0->generator#0", "generator#0->display#0"]
    assert job["nodeCells"] == ["node-a → node-a", "node-a → node-b", "node-b → node-a"]
    assert [link["crossNode"] for link in job["snapshot"]["links"]] == [False, True, True]
    totals = job["snapshot"]["totals"]
    assert 0 < totals["crossNodeBytesPerS"] < totals["bytesPerS"]
    assert "between nodes" in job["heading"]
    # ... and rank 2 (vision, on node-a) is down: its node says so.
    assert job["nodes"] == [["node-a", "node degraded", "node-a 1/2 up", ["rank up", "rank down"]],
                            ["node-b", "node", "node-b 1/1 up", ["rank up"]]]
    assert not any(url.endswith("/health") for url in got["requests"])  # the stats placed every rank
    assert elapsed < 30, f"the check took {elapsed:.1f} s"


async def look_at_mirror(url: str, port: int) -> dict:
    page = await Page.attach(port)
    try:
        await page.call("Page.navigate", url=url)
        await page.wait_for("!!window.mindMirrorLipSync && window.mindMirrorLipSync.snapshot().connection === 'live'",
                            10, "the page")
        await click(page, "#mic")
        await page.wait_for("!!document.querySelector('#source-status.error')", 10, "the refusal shown")
        return await page.evaluate("""({
            select: document.getElementById('avatar-select').disabled,
            models: document.getElementById('models').textContent,
            status: document.getElementById('source-status').textContent,
            errors: [...document.querySelectorAll('#messages li.error')].map((li) => li.textContent),
        })""") | {"problems": list(page.problems)}
    finally:
        await page.close()


@pytest.mark.timeout(60)
def test_lipsync_page_on_a_camera_pipeline_says_so(server):
    with Chromium(CHROMIUM, width=WIDTH, height=HEIGHT, extra_args=FLAGS) as browser:
        got = asyncio.run(look_at_mirror(server.url + "lipsync", browser.port))
    assert got["problems"] == []  # not even a 404 for /models: the page knows there are none
    assert got["select"] is True
    assert got["models"] == "this pipeline serves no models"
    assert got["status"].startswith("the server's pipeline takes no audio")
    assert any("unsupported_kind" in e for e in got["errors"])
