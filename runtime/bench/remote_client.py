"""The benchmark client (``runtime.bench.client``) as a command, for where the benchmark's
own process cannot reach the web server: inside another network namespace.

    ip netns exec NS python -m runtime.bench.remote_client --port 40123 --jpeg frame.jpg \
        --duration 20 --warmup 2 --fps 20

prints the ``ClientResult`` as one JSON object on stdout; ``run_in`` starts it so and reads
it back. ``time.monotonic()`` is the same clock in every process of the machine (network
namespaces do not change it), so the result's window can be matched against samples taken
in the parent, e.g. by ``SysMonitor``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from runtime.bench.client import ClientResult, ClientSettings, run
from runtime.bench.jobs import REPO

DRAIN_MARGIN_S = 30.0
"""Beyond the run's own warm-up, window and drain: connecting, and a loaded machine's delays."""


def command(settings: ClientSettings, jpeg: Path) -> list[str]:
    """The argv that runs ``settings`` in a new Python (``jpeg``: the file of ``settings.jpeg``)."""
    argv = [sys.executable, "-m", "runtime.bench.remote_client", "--port", str(settings.port), "--jpeg", str(jpeg),
            "--duration", repr(settings.duration_s), "--warmup", repr(settings.warmup_s),
            "--window", str(settings.window), "--host", settings.host]
    return argv + (["--fps", repr(settings.fps)] if settings.fps is not None else [])


def run_in(prefix: Sequence[str], settings: ClientSettings, jpeg: Path) -> ClientResult:
    """Run the client under ``prefix`` (e.g. ``Host.command()``'s ``ip netns exec NS``) and
    return its result; ``RuntimeError`` with the client's stderr if it fails or outlives its run."""
    timeout = settings.warmup_s + settings.duration_s + settings.drain_s + DRAIN_MARGIN_S
    with subprocess.Popen([*prefix, *command(settings, jpeg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=REPO) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise RuntimeError(f"benchmark client still running after {timeout:g} s; stderr:\n{err[-2000:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark client exited with {proc.returncode}; stderr:\n{err[-2000:]}")
    return ClientResult(**json.loads(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--jpeg", type=Path, required=True, help="the camera frame every message carries")
    p.add_argument("--duration", type=float, required=True, help="seconds measured")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of input before measuring")
    p.add_argument("--fps", type=float, help="fixed input rate; omitted: as fast as possible")
    p.add_argument("--window", type=int, default=4, help="as fast as possible: frames in flight")
    p.add_argument("--host", default="127.0.0.1")
    args = p.parse_args(argv)
    settings = ClientSettings(port=args.port, jpeg=args.jpeg.read_bytes(), duration_s=args.duration,
                              warmup_s=args.warmup, fps=args.fps, window=args.window, host=args.host)
    sys.stdout.write(json.dumps(dataclasses.asdict(run(settings))) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
