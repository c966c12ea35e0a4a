"""Headless Chromium driven over the DevTools protocol, for checks of the real page.

``Chromium`` starts the browser in a process group of its own (so stopping it ends its
renderer and GPU processes too, and nothing else) with a throwaway profile and a fake
camera; it learns the DevTools port from the ``DevToolsActivePort`` file, so any number
can run at once. ``Page`` is one DevTools session on its tab, over the ``websockets``
client: calls, ``evaluate``, polling with a deadline, screenshots, the console errors,
uncaught exceptions and browser log errors the page produced, and (after
``watch_network``) the URLs of the WebSockets it opened and the headers of its requests.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Self

from websockets.asyncio.client import ClientConnection, connect

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    """``$MM_CHROMIUM``, else the first Chromium-like binary on PATH."""
    explicit = os.environ.get("MM_CHROMIUM")
    if explicit:
        return shutil.which(explicit) or (explicit if Path(explicit).is_file() else None)
    return next((found for name in NAMES if (found := shutil.which(name))), None)


class Chromium:
    """A headless Chromium; use as a context manager, or ``start()`` then ``stop()``."""

    def __init__(self, binary: str, *, width: int = 1280, height: int = 800, camera_file: Path | None = None,
                 start_timeout_s: float = 30.0, extra_args: tuple[str, ...] = ()) -> None:
        self.binary = binary
        self.extra_args = tuple(extra_args)
        """More command-line switches, e.g. ``--autoplay-policy=no-user-gesture-required``."""
        self.width, self.height = width, height
        self.camera_file = camera_file
        self.start_timeout_s = start_timeout_s
        self.profile = Path(tempfile.mkdtemp(prefix="mm-chromium-"))
        self.process: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self) -> Self:
        camera = [f"--use-file-for-fake-video-capture={self.camera_file}"] if self.camera_file else []
        # The child keeps its own copy of the log's descriptor; ours closes with the block.
        with open(self.profile / "chromium.log", "wb") as log:
            self.process = subprocess.Popen([
                self.binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-extensions", "--mute-audio", "--password-store=basic",
                "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
                # A tab the browser thinks is hidden would stop painting (requestAnimationFrame).
                "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
                "--disable-backgrounding-occluded-windows",
                "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", *camera,
                *self.extra_args,
                f"--window-size={self.width},{self.height}", f"--user-data-dir={self.profile}",
                "--remote-debugging-port=0", "about:blank",
            ], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode}: {self.log_tail()}")
            lines = active.read_text().splitlines() if active.exists() else []
            if lines and lines[0].strip().isdigit():
                self.port = int(lines[0])
                return self
            time.sleep(0.05)
        raise TimeoutError(f"chromium gave no DevTools port in {self.start_timeout_s} s: {self.log_tail()}")

    def stop(self) -> None:
        """End the browser's process group (TERM, then KILL) and remove its profile."""
        process = self.process
        if process is not None and process.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(process.pid, sig)  # the group this object started, by its id
                except ProcessLookupError:
                    break
                try:
                    process.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if process is not None:
            try:  # the group may outlive its leader for a moment; end what is left of it
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return (self.profile / "chromium.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class CdpError(RuntimeError):
    pass


class Page:
    """One DevTools session on the browser's first tab."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._ids = iter(range(1, 1 << 30))
        self._pending: dict[int, asyncio.Future] = {}
        self.problems: list[str] = []
        """Console errors, uncaught exceptions and browser log errors, in order."""
        self.sockets: list[str] = []
        """URLs of the WebSockets the page opened (after ``watch_network``)."""
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        """(method, URL, headers) of every request the page made (after ``watch_network``)."""
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def attach(cls, port: int, timeout_s: float = 10.0) -> Page:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                targets = await asyncio.to_thread(_json_list, port)
                target = next((t for t in targets if t.get("type") == "page"), None)
            except OSError:
                target = None
            if target is not None:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("chromium shows no page target")
            await asyncio.sleep(0.1)
        ws = await connect(target["webSocketDebuggerUrl"], max_size=64 << 20, open_timeout=timeout_s)
        page = cls(ws)
        for domain in ("Runtime", "Log", "Page"):
            await page.call(f"{domain}.enable")
        return page

    async def watch_network(self) -> None:
        """Record WebSockets and requests from now on (``sockets``, ``requests``)."""
        await self.call("Network.enable")

    async def close(self) -> None:
        self._reader.cancel()
        await self._ws.close()

    async def call(self, method: str, timeout_s: float = 20.0, **params: Any) -> dict[str, Any]:
        my_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[my_id] = future
        await self._ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        try:
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._pending.pop(my_id, None)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (awaited if it is a promise)."""
        reply = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in reply:
            details = reply["exceptionDetails"]
            raise CdpError(details.get("exception", {}).get("description") or details.get("text"))
        return reply["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
        """Poll until ``expression`` is truthy; its value. ``what`` names it in the error."""
        deadline = time.monotonic() + timeout_s
        value = None
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(interval_s)
        raise TimeoutError(f"no {what} within {timeout_s} s (last value {value!r}); page problems: {self.problems}")

    async def screenshot(self, path: Path) -> Path:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    async def _read(self) -> None:
        async for raw in self._ws:
            message = json.loads(raw)
            if "id" in message:
                future = self._pending.get(message["id"])
                if future is not None and not future.done():
                    if "error" in message:
                        future.set_exception(CdpError(f"{message['error'].get('message')}"))
                    else:
                        future.set_result(message.get("result", {}))
                continue
            self._on_event(message.get("method"), message.get("params", {}))

    def _on_event(self, method: str | None, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.problems.append(f"console.{params['type']}: {args}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.problems.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
        elif method == "Network.webSocketCreated":
            self.sockets.append(params.get("url", ""))
        elif method == "Network.requestWillBeSent":
            request = params.get("request", {})
            self.requests.append((request.get("method", ""), request.get("url", ""), dict(request.get("headers", {}))))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.problems.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip())


def _json_list(port: int) -> list[dict[str, Any]]:
    """The browser's DevTools targets (a blocking HTTP GET: run it in a thread)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
        return json.load(r)


def set_viewport(width: int, height: int) -> dict[str, Any]:
    """``Emulation.setDeviceMetricsOverride`` parameters for a desktop window of this size."""
    return {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
