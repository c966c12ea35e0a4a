"""Measure recovery several times, for the README's figures (not a test):

    python -m tests.integration.recovery_timing --runs 5 --out /tmp/recovery.jsonl

* **restart**: torchrun --standalone --nproc-per-node 3 --max-restarts 1, a client that
  reconnects like the page; SIGKILL the generator worker; seconds from the kill to the
  page's close (1012), to the restarted rank 0 saying it serves (its log), to the page's
  new session, and to its first frame served again.
* **degraded**: 4 ranks (two generator replicas) without torchrun; SIGKILL the replica
  serving the session; the longest time without an output frame from 1 s before the kill
  to 4 s after it, and, to compare, in the 5 s before the kill.

Each run's figures and the load average before it go to ``--out`` as JSON lines; the
medians are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from tests.integration.reconnecting_client import summary
from tests.integration.test_recovery import measure_degraded, measure_restart

RESTART_KEYS = ("kill_to_close_s", "kill_to_ready_s", "kill_to_session_s", "kill_to_frame_s", "failed_connects")
DEGRADED_KEYS = ("gap_s", "baseline_gap_s", "first_frame_after_s", "frames_after")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--only", choices=("restart", "degraded"))
    p.add_argument("--out", type=Path, default=Path("recovery-timing.jsonl"))
    args = p.parse_args()
    figures: dict[str, dict[str, list[float]]] = {"restart": {}, "degraded": {}}
    for run in range(args.runs):
        for kind, measure, keys in (("restart", measure_restart, RESTART_KEYS),
                                    ("degraded", measure_degraded, DEGRADED_KEYS)):
            if args.only not in (None, kind):
                continue
            load = os.getloadavg()[0]
            with tempfile.TemporaryDirectory(prefix=f"mm-{kind}-") as tmp:
                started = time.monotonic()
                f = measure(Path(tmp))
            record = {"kind": kind, "run": run, "load_1min_before": round(load, 2),
                      "wall_s": round(time.monotonic() - started, 1), **{k: round(f[k], 3) for k in keys}}
            print(json.dumps(record), flush=True)
            with open(args.out, "a", encoding="utf-8") as out:
                out.write(json.dumps(record) + "\n")
            for k in keys:
                figures[kind].setdefault(k, []).append(f[k])
    for kind, by_key in figures.items():
        for key, values in by_key.items():
            print(kind, key, summary(values))


if __name__ == "__main__":
    main()
