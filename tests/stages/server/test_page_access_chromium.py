"""How the pages get in, in headless Chromium: a plain-http address, and the server's token.

- **Not a secure page.** Browsers give the camera and microphone only to https pages and
  localhost; the pages used to fail with "Cannot read properties of undefined (reading
  'getUserMedia')" anywhere else. Here the server listens on this host's own non-loopback
  address and Chromium opens it there, as a browser on another machine would (where the
  host has no such address, a made-up host name that Chromium resolves to 127.0.0.1:
  still not localhost, so still not secure). Each page must say what is wrong and what
  to do (localhost, or ``--tls-cert/--tls-key``), raise no exception, and keep working
  otherwise: the mirror stays live, the lip-sync page still takes WAV files.
- **Token.** Opened as ``/lipsync?token=...`` on a server that wants the token, the page
  passes it on the WebSocket URL, as ``Authorization: Bearer`` on its fetches, and on the
  link to the other page; opened without it, it says that the server needs one.

Skipped only when no Chromium binary is found (CI installs the ``chromium`` package).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import pytest
from chromium import Chromium, Page, find_chromium, set_viewport

from stages.server.config import ServerConfig

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary found (apt-get install chromium)")

WIDTH, HEIGHT = 1280, 800
STAND_IN_HOST = "mindmirror.test"
"""Where the host has no non-loopback address: a name Chromium maps to 127.0.0.1."""
TOKEN = "page-test-token-0123456789"
SERVER_TAKES_TOKENS = "token" in {f.name for f in dataclasses.fields(ServerConfig)}


def outward_address() -> str | None:
    """This host's IPv4 address on its default route, if it has one besides loopback.
    (Connecting a UDP socket only picks a route: nothing is sent.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: never answered, only routed
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def banner_facts(snapshot: str) -> str:
    return f"""(() => {{
      const banner = document.getElementById('media-problem');
      return {{
        secure: window.isSecureContext, hasMediaDevices: !!navigator.mediaDevices,
        hidden: banner.hidden, title: banner.querySelector('b')?.textContent ?? '',
        text: banner.textContent, codes: [...banner.querySelectorAll('code')].map((c) => c.textContent),
        snapshot: {snapshot},
        errors: [...document.querySelectorAll('#messages li.error')].map((li) => li.dataset.text),
      }};
    }})()"""


async def look_insecure(origin: str, port: int) -> dict:
    page = await Page.attach(port)
    try:
        await page.call("Emulation.setDeviceMetricsOverride", **set_viewport(WIDTH, HEIGHT))
        await page.call("Page.navigate", url=f"{origin}/")
        await page.wait_for("!!window.mindMirror && window.mindMirror.snapshot().connection === 'live'", 10,
                            "the mirror page live")
        mirror = await page.evaluate(banner_facts("window.mindMirror.snapshot()"))
        await page.call("Page.navigate", url=f"{origin}/lipsync")
        await page.wait_for("!!window.mindMirrorLipSync && window.mindMirrorLipSync.snapshot().connection === 'live'",
                            10, "the lip-sync page live")
        lipsync = await page.evaluate(banner_facts("window.mindMirrorLipSync.snapshot()"))
        lipsync["mic"] = await page.evaluate("document.getElementById('mic').disabled")
        lipsync["fileInput"] = await page.evaluate("!document.getElementById('file').disabled")
        return {"mirror": mirror, "lipsync": lipsync, "problems": list(page.problems)}
    finally:
        await page.close()


@pytest.mark.timeout(60)
def test_pages_on_a_plain_http_address_say_how_to_get_camera_and_microphone(start_server):
    address = outward_address()
    server = start_server(host=address or "127.0.0.1")
    host = address or STAND_IN_HOST
    origin = f"http://{host}:{server.port}"
    flags = () if address else (f"--host-resolver-rules=MAP {STAND_IN_HOST} 127.0.0.1",)
    with Chromium(CHROMIUM, width=WIDTH, height=HEIGHT, extra_args=flags) as browser:
        got = asyncio.run(look_insecure(origin, browser.port))

    # No exception from a missing navigator.mediaDevices, on either page.
    assert got["problems"] == [], got["problems"]
    for name, device in (("mirror", "camera"), ("lipsync", "microphone")):
        facts = got[name]
        assert facts["secure"] is False and facts["hasMediaDevices"] is False  # the real thing, not a stand-in
        assert not facts["hidden"], name
        assert facts["title"] == f"No {device} on this address: it is not a secure page"
        path = "/" if name == "mirror" else "/lipsync"
        # What to do: the page on localhost (tunnelled from afar), or the server on HTTPS.
        assert f"http://localhost:{server.port}{path}" in facts["codes"], facts["codes"]
        assert f"ssh -L {server.port}:localhost:{server.port} <server>" in facts["codes"]
        assert "--tls-cert cert.pem --tls-key key.pem" in facts["codes"]
        assert f"https://{host}:{server.port}{path}" in facts["codes"]
        assert "README" in facts["text"]
        assert facts["snapshot"]["connection"] == "live"  # everything else still works

    mirror, lipsync = got["mirror"], got["lipsync"]
    assert mirror["snapshot"]["camera"] == "unavailable" and mirror["errors"] == [mirror["title"]]
    assert lipsync["mic"] is True and lipsync["fileInput"] is True  # no microphone, but WAV files still go
    assert lipsync["snapshot"]["microphone"] == "unavailable"
    assert lipsync["snapshot"]["source"].endswith("A WAV file still works.")


async def click(page: Page, selector: str) -> None:
    box = await page.evaluate(f"""(() => {{ const r = document.querySelector('{selector}').getBoundingClientRect();
        return {{x: r.x + r.width / 2, y: r.y + r.height / 2}}; }})()""")
    for kind in ("mousePressed", "mouseReleased"):
        await page.call("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left", clickCount=1)


async def look_with_token(url: str, port: int) -> dict:
    page = await Page.attach(port)
    try:
        await page.call("Emulation.setDeviceMetricsOverride", **set_viewport(WIDTH, HEIGHT))
        await page.watch_network()
        await page.call("Page.navigate", url=f"{url}lipsync?token={TOKEN}")
        await page.wait_for("!!window.mindMirrorLipSync && window.mindMirrorLipSync.snapshot().connection === 'live'",
                            10, "the page live with its token")
        await page.wait_for("!!document.querySelector('#models tbody tr:nth-child(2) button')", 5, "the models table")
        await click(page, "#models tbody tr:nth-child(2) button")  # load robot: a POST the token guards
        await page.wait_for("document.querySelector('#models tbody tr:nth-child(2)').cells[1].textContent"
                            " === 'resident'", 5, "robot's model loaded")
        with_token = {"sockets": list(page.sockets), "requests": list(page.requests),
                      "nav": await page.evaluate("document.querySelector('a.nav').getAttribute('href')"),
                      "errors": await page.evaluate(
                          "[...document.querySelectorAll('#messages li.error')].map((li) => li.textContent)"),
                      "problems": list(page.problems)}
        await page.call("Page.navigate", url=f"{url}lipsync")
        await page.wait_for("[...document.querySelectorAll('#messages li.error')]"
                            ".some((li) => li.textContent.includes('needs a token'))", 10, "the refusal explained")
        without = await page.evaluate("({pill: document.getElementById('connection').textContent,"
                                      " nav: document.querySelector('a.nav').getAttribute('href')})")
        return {"with": with_token, "without": without}
    finally:
        await page.close()


@pytest.mark.timeout(60)
@pytest.mark.skipif(not SERVER_TAKES_TOKENS, reason="this server has no server.token")
def test_page_passes_its_token_on_and_says_when_it_has_none(start_lipsync_server, lipsync_hooks):
    server = start_lipsync_server(token=TOKEN)
    with Chromium(CHROMIUM, width=WIDTH, height=HEIGHT) as browser:
        got = asyncio.run(look_with_token(server.url, browser.port))

    live = got["with"]
    assert live["problems"] == [] and live["errors"] == []
    assert live["sockets"] == [f"ws://127.0.0.1:{server.port}/ws?token={TOKEN}"]
    fetched = [(method, path, {k.lower(): v for k, v in headers.items()}.get("authorization"))
               for method, url, headers in live["requests"]
               if (path := url.split(str(server.port), 1)[1]).startswith(("/models?", "/models/")) or path == "/models"]
    assert fetched and all(auth == f"Bearer {TOKEN}" for _, _, auth in fetched), fetched
    assert ("POST", "/models/robot/load", f"Bearer {TOKEN}") in fetched
    assert "robot" in lipsync_hooks.loaded
    assert live["nav"] == f"./?token={TOKEN}"  # the mirror page gets the token too

    # Without it: refused, and the page says why instead of only "server unreachable".
    assert got["without"]["pill"] != "live" and got["without"]["nav"] == "./"
