"""The page's codec (static/wire.js) against the same golden bytes as protocol.py.

Runs only where Node.js is installed; CI without it skips this file.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from test_server_protocol import GOLDEN_AUDIO, GOLDEN_CAMERA, GOLDEN_OUTPUT

from stages.server.http_routes import STATIC_DIR

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js not installed")


def run_module(tmp_path, body: str) -> list[str]:
    # Node treats a bare .js file as CommonJS; a copy named .mjs loads as the ES module it is.
    (tmp_path / "wire.mjs").write_bytes((STATIC_DIR / "wire.js").read_bytes())
    (tmp_path / "audio_pcm.mjs").write_bytes((STATIC_DIR / "audio_pcm.js").read_bytes())
    script = tmp_path / "check.mjs"
    script.write_text('import { Kind, encodeFrame, decodeFrame, message } from "./wire.mjs";\n'
                      'import { pcm16Bytes } from "./audio_pcm.mjs";\n' + body)
    result = subprocess.run([NODE, str(script)], capture_output=True, text=True, timeout=30, check=True)
    return result.stdout.splitlines()


def test_wire_js_encodes_golden_bytes(tmp_path):
    out = run_module(tmp_path, """
        const frame = encodeFrame(Kind.CAMERA_FRAME, 0x01020304, 1.5, new Uint8Array([0xff, 0xd8]));
        console.log(Buffer.from(frame).toString("hex"));
        const sliced = new Uint8Array([9, 0xff, 0xd8, 9]).subarray(1, 3);  // a view, not a whole buffer
        console.log(Buffer.from(encodeFrame(1, 0x01020304, 1.5, sliced)).toString("hex"));
        console.log(message("preset.apply", { name: "calm" }));
    """)
    assert out == [GOLDEN_CAMERA.hex(), GOLDEN_CAMERA.hex(), '{"type":"preset.apply","payload":{"name":"calm"}}']


def test_wire_js_decodes_golden_bytes(tmp_path):
    out = run_module(tmp_path, f"""
        const bytes = Uint8Array.from(Buffer.from("{GOLDEN_OUTPUT.hex()}", "hex"));
        const f = decodeFrame(bytes.buffer);
        console.log(JSON.stringify({{ kind: f.kind, frameId: f.frameId, clientTs: f.clientTs,
                                      payload: Buffer.from(f.payload).toString() }}));
        for (const bad of ["4d4d4632" + "00".repeat(16), "4d4d4631"]) {{
          try {{ decodeFrame(Uint8Array.from(Buffer.from(bad, "hex")).buffer); console.log("accepted"); }}
          catch (e) {{ console.log("refused"); }}
        }}
    """)
    assert json.loads(out[0]) == {"kind": 3, "frameId": 7, "clientTs": 1700000000123.25, "payload": "jpeg"}
    assert out[1:] == ["refused", "refused"]


def test_wire_js_encodes_an_audio_chunk_as_the_server_reads_it(tmp_path):
    out = run_module(tmp_path, """
        const pcm = Int16Array.from([1, -2]);
        console.log(Buffer.from(encodeFrame(Kind.AUDIO_CHUNK, 5, 1.5, pcm16Bytes(pcm))).toString("hex"));
        console.log(JSON.stringify(Kind));
    """)
    assert out[0] == GOLDEN_AUDIO.hex()
    assert json.loads(out[1]) == {"CAMERA_FRAME": 1, "AUDIO_CHUNK": 2, "OUTPUT_FRAME": 3}
