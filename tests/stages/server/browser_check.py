"""Manual check of the page in headless Chromium with a fake camera (CI runs test_page_chromium.py).

Starts a ``WebServer`` on an echoing runtime double that makes a visible "portrait"
(OpenCV colour map) and finds faces with OpenCV's Haar cascade, opens the page in
headless Chromium with Chromium's fake camera, lets it warm up, then measures for
``--seconds``: it prints the page's own glass-to-glass latency (camera capture -> portrait
painted; p50/p90/p99 over the measured frames), the FPS it painted, the bandwidth of every
link and the ranks up per node as the page shows them, any console errors, and saves a
screenshot::

    python tests/stages/server/browser_check.py --seconds 8 --out /tmp/mirror.png

With ``--url`` it opens a running pipeline instead (no double, and it changes no live
setting, since those are shared with every other session), and ``--face-camera`` feeds
Chromium's fake camera the astronaut fixture (a real face, gently moving), so the real
vision and generator stages have something to see::

    torchrun --standalone --nproc-per-node 3 launch/mirror.py &
    python tests/stages/server/browser_check.py --url http://127.0.0.1:8765/ --face-camera \\
        --warmup 10 --seconds 20 --out /tmp/mind_mirror_page.png

Needs a ``chromium`` binary (``apt-get install chromium``); talks to it over the DevTools
protocol with the ``websockets`` client (``chromium.py`` beside this file).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[3]))

from chromium import Chromium, Page, find_chromium, set_viewport
from echo_hooks import EchoHooks, fake_vision

from stages.server.config import ServerConfig
from stages.server.ws_server import WebServer

CASCADE = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")


def stylize(jpeg: bytes) -> tuple[bytes, dict]:
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    faces = sorted(CASCADE.detectMultiScale(gray, 1.2, 4, minSize=(40, 40)), key=lambda b: -b[2] * b[3])
    side = min(image.shape[:2])
    square = cv2.resize(image[:side, :side], (320, 320))
    portrait = cv2.applyColorMap(cv2.cvtColor(square, cv2.COLOR_BGR2GRAY), cv2.COLORMAP_TWILIGHT_SHIFTED)
    ok, out = cv2.imencode(".jpg", portrait, [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok, "OpenCV could not encode the portrait"
    vision = {"faces": [{"face_id": i, "bbox": [int(v) for v in box], "emotion": "neutral",
                         "emotion_probs": {"neutral": 0.7, "happy": 0.3}, "quality": 0.8, "primary": i == 0}
                        for i, box in enumerate(faces)]}
    if not vision["faces"]:  # Chromium's fake camera shows no face; draw made-up ones
        vision = fake_vision(image.shape[1], image.shape[0])
    return out.tobytes(), vision


MEASURE = """(() => {
  const s = window.mindMirror.snapshot();
  const text = (sel) => [...document.querySelectorAll(sel)].map((e) => e.textContent.trim());
  return {
    painted: s.painted, seconds: s.seconds, fps_meter: s.fps, g2g_ms: s.g2g, split_p50_ms: s.split_p50_ms,
    histogram: s.histogram, links: s.job.links, link_totals: s.job.totals, nodes: s.job.nodes,
    generator: s.generator, style: s.style, faces: s.faces, connection: s.connection,
    revision: text('#revision')[0], camera: text('#camera-size')[0], portrait: text('#portrait-info')[0],
    horizontal_scroll: document.documentElement.scrollWidth > window.innerWidth,
    messages: text('#messages li'),
  };
})()"""

DRIVE_CONTROLS = """new Promise((resolve) => {
  const style = document.querySelector('select[name=style]');
  style.value = style.options[Math.min(2, style.options.length - 1)].value;
  style.dispatchEvent(new Event('change', {bubbles: true}));
  setTimeout(() => { document.querySelector('#presets button:last-child').click(); setTimeout(resolve, 800); }, 400);
})"""


async def drive(port: int, url: str, *, width: int, height: int, warmup_s: float, seconds: float,
                screenshot: Path, full_page: bool, drive_controls: bool) -> dict:
    page = await Page.attach(port)
    try:
        await page.call("Emulation.setDeviceMetricsOverride", **set_viewport(width, height))
        await page.call("Page.navigate", url=url)
        # A real pipeline may take a while to load its models: wait for the first portrait.
        await page.wait_for("window.mindMirror && window.mindMirror.snapshot().painted > 0", timeout_s=120,
                            what="painted portrait")
        await asyncio.sleep(warmup_s)
        await page.evaluate("window.mindMirror.resetMeters()")
        await asyncio.sleep(seconds)
        measured = await page.evaluate(MEASURE)
        if drive_controls:  # only on the echo double: live settings are shared by every session
            await page.evaluate(DRIVE_CONTROLS)
            measured["after_controls"] = await page.evaluate(
                "({revision: document.getElementById('revision').textContent,"
                " style: document.querySelector('select[name=style]').value})")
        if full_page:
            content = await page.evaluate("document.documentElement.scrollHeight")
            await page.call("Emulation.setDeviceMetricsOverride", **set_viewport(width, max(height, content)))
            await asyncio.sleep(0.5)
        await page.screenshot(screenshot)
        return {"page": measured, "console_problems": list(page.problems)}
    finally:
        await page.close()


def face_camera_file(seconds: float = 6.0, fps: int = 20) -> Path:
    """A y4m clip of the fixture face drifting a few pixels (Chromium loops it)."""
    fixture = Path(__file__).parents[2] / "fixtures" / "astronaut_640x480.jpg"
    bgr = cv2.imdecode(np.frombuffer(fixture.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    path = Path(tempfile.mkdtemp()) / "face.y4m"
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W640 H480 F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for i in range(int(seconds * fps)):
            dx = int(12 * np.sin(2 * np.pi * i / (seconds * fps)))
            moved = np.roll(bgr, dx, axis=1)
            f.write(b"FRAME\n" + cv2.cvtColor(moved, cv2.COLOR_BGR2YUV_I420).tobytes())
    return path


def summary(report: dict) -> str:
    page = report["page"]
    g = page["g2g_ms"]
    fps = page["painted"] / page["seconds"] if page["seconds"] > 0 else float("nan")

    def ms(v):
        return "–" if v is None else f"{v:.1f}"

    split = page.get("split_p50_ms") or {}
    parts = ", ".join(f"{name.replace('_', ' ')} {ms(v)}" for name, v in split.items())
    def mbps(v):
        return "–" if v is None else f"{v / 1e6:.3f}"

    links = "; ".join(f"{link['name']} {mbps(link['bytesPerS'])} MB/s" for link in page.get("links", []))
    nodes = ", ".join(f"{n['node'] or 'node not reported'} {n['up']}/{n['total']} up" for n in page.get("nodes", []))
    return (f"glass-to-glass over {g['count']} frames: p50 {ms(g['p50'])} ms, p90 {ms(g['p90'])} ms, "
            f"p99 {ms(g['p99'])} ms (p50 parts, ms: {parts or 'n/a'}); {fps:.1f} fps painted "
            f"({page['painted']} frames in {page['seconds']:.1f} s); "
            f"generator {page['generator']}, style {json.dumps(page['style'])}\n"
            f"links: {links or 'none'}\nranks: {nodes or 'none reported'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured window after the warm-up")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of frames before measuring")
    parser.add_argument("--out", type=Path, default=Path("/tmp/mind_mirror_page.png"), help="screenshot (PNG)")
    parser.add_argument("--full-page", action="store_true", help="screenshot the whole page, not the window")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--chromium", default=find_chromium())
    parser.add_argument("--url", help="open this running pipeline instead of an echo double")
    parser.add_argument("--face-camera", action="store_true", help="fake camera shows the fixture face")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if not args.chromium:
        parser.error("no chromium binary found; install it (apt-get install chromium) or pass --chromium")

    hooks = server = None
    if args.url is None:
        hooks = EchoHooks(transform=stylize)
        server = WebServer(ServerConfig(port=0), hooks)
        hooks.sink = server
        server.start()
    camera = face_camera_file() if args.face_camera else None
    try:
        with Chromium(args.chromium, width=args.width, height=args.height, camera_file=camera) as browser:
            report = asyncio.run(drive(browser.port, args.url or server.url, width=args.width, height=args.height,
                                       warmup_s=args.warmup, seconds=args.seconds, screenshot=args.out,
                                       full_page=args.full_page, drive_controls=args.url is None))
    finally:
        if server is not None:
            server.stop()
            hooks.close()
        if camera is not None:
            camera.unlink(missing_ok=True)
            camera.parent.rmdir()
    print(json.dumps(report, indent=2, ensure_ascii=False))
    print(summary(report))
    print(f"screenshot: {args.out}")


if __name__ == "__main__":
    main()
