"""Manual check of the page in headless Chromium with a fake camera (not part of CI).

Starts a ``WebServer`` on an echoing runtime double that makes a visible "portrait"
(OpenCV colour map) and finds faces with OpenCV's Haar cascade, opens the page in
headless Chromium with Chromium's fake camera, lets it run, then prints the page's own
meters and any console errors and saves a screenshot::

    python tests/stages/server/browser_check.py --seconds 8 --out /tmp/mirror.png

With ``--url`` it opens a running pipeline instead (no double), and ``--face-camera``
feeds Chromium's fake camera the astronaut fixture (a real face, gently moving), so the
real vision and generator stages have something to see::

    torchrun --standalone --nproc-per-node 3 launch/mirror.py &
    python tests/stages/server/browser_check.py --url http://127.0.0.1:8765/ --face-camera

Needs a ``chromium`` binary (``apt-get install chromium``); talks to it over the
DevTools protocol with the ``websockets`` client.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[3]))

from echo_hooks import EchoHooks, fake_vision  # noqa: E402

from stages.server.config import ServerConfig  # noqa: E402
from stages.server.ws_server import WebServer  # noqa: E402

CASCADE = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")


def stylize(jpeg: bytes) -> tuple[bytes, dict]:
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    faces = CASCADE.detectMultiScale(gray, 1.2, 4, minSize=(40, 40))
    side = min(image.shape[:2])
    square = cv2.resize(image[:side, :side], (320, 320))
    portrait = cv2.applyColorMap(cv2.cvtColor(square, cv2.COLOR_BGR2GRAY), cv2.COLORMAP_TWILIGHT_SHIFTED)
    ok, out = cv2.imencode(".jpg", portrait, [cv2.IMWRITE_JPEG_QUALITY, 80])
    vision = {"faces": [{"face_id": i, "bbox": [int(v) for v in box], "emotion": "neutral",
                         "emotion_probs": {"neutral": 0.7, "happy": 0.3}, "quality": 0.8}
                        for i, box in enumerate(faces)]}
    if not vision["faces"]:  # Chromium's fake camera shows no face; draw a made-up one
        vision = fake_vision(image.shape[1], image.shape[0])
    return out.tobytes(), vision


async def drive(port: int, seconds: float, screenshot: Path) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
        page = next(t for t in json.load(r) if t["type"] == "page")
    problems: list[str] = []
    async with connect(page["webSocketDebuggerUrl"], max_size=64 << 20) as cdp:
        ids = iter(range(1, 1 << 30))

        async def call(method: str, **params) -> dict:
            my_id = next(ids)
            await cdp.send(json.dumps({"id": my_id, "method": method, "params": params}))
            while True:
                reply = json.loads(await cdp.recv())
                if reply.get("id") == my_id:
                    return reply.get("result", {})
                if reply.get("method") == "Runtime.exceptionThrown":
                    problems.append(reply["params"]["exceptionDetails"].get("text", "exception"))
                if reply.get("method") == "Runtime.consoleAPICalled" and reply["params"]["type"] in ("error", "warn"):
                    problems.append(" ".join(str(a.get("value", a.get("description"))) for a in reply["params"]["args"]))

        await call("Runtime.enable")
        await call("Emulation.setDeviceMetricsOverride", width=1400, height=860, deviceScaleFactor=1, mobile=False)
        await call("Page.reload")
        await asyncio.sleep(seconds)
        # Drive the controls as a user would: a style change, then a preset.
        await call("Runtime.evaluate", expression="""{
            const style = document.querySelector('select[name=style]');
            style.value = 'noir';
            style.dispatchEvent(new Event('change', {bubbles: true}));
            setTimeout(() => document.querySelector('#presets button:last-child').click(), 300);
        }""")
        await asyncio.sleep(1.0)
        result = await call("Runtime.evaluate", returnByValue=True, expression="""({
            revision: document.getElementById('revision').textContent,
            style: document.querySelector('select[name=style]').value,
            strength: document.querySelector('input[name=strength]').value,
            connection: document.getElementById('connection').textContent,
            fps: document.getElementById('fps').textContent,
            p50: document.getElementById('latency-p50').textContent,
            p95: document.getElementById('latency-p95').textContent,
            portrait: document.getElementById('portrait-info').textContent,
            camera: document.getElementById('camera-size').textContent,
            messages: [...document.querySelectorAll('#messages li')].map(li => li.textContent),
        })""")
        shot = await call("Page.captureScreenshot", format="png")
        screenshot.write_bytes(base64.b64decode(shot["data"]))
    return {"page": result["result"]["value"], "console_problems": problems}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/mind_mirror_page.png"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--url", help="open this running pipeline instead of an echo double")
    parser.add_argument("--face-camera", action="store_true", help="fake camera shows the fixture face")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    hooks = server = None
    if args.url is None:
        hooks = EchoHooks(transform=stylize)
        server = WebServer(ServerConfig(port=0), hooks)
        hooks.sink = server
        server.start()
    camera = [f"--use-file-for-fake-video-capture={face_camera_file()}"] if args.face_camera else []
    profile = tempfile.mkdtemp()
    browser = subprocess.Popen([
        args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", *camera,
        f"--user-data-dir={profile}", "--remote-debugging-port=9333", "--window-size=1400,860",
        args.url or server.url,
    ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen("http://127.0.0.1:9333/json/version", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        report = asyncio.run(drive(9333, args.seconds, args.out))
    finally:
        browser.terminate()
        browser.wait(10)
        if server is not None:
            server.stop()
            hooks.close()
    print(json.dumps(report, indent=2))
    print(f"screenshot: {args.out}")


if __name__ == "__main__":
    main()
