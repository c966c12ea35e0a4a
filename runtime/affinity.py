"""Stage replicas that hold keyed state (an avatar's model), and the server rank's view of them.

Some stages serve many keys but hold only some at a time: a lip-sync replica keeps the
models of the avatars it served lately, within a byte budget. Sending an avatar's frames
to the replica that already holds its model saves a load; that is ``routing: affinity``.
The pieces:

- each replica says what it holds through ``Stage.report()``; its rank's heartbeat
  carries the reports (``collect_reports``) to the server rank;
- the server rank keeps one ``Directory`` per stage reached by affinity (the stage
  kind makes it: ``Stage.directory``), feeds it the reports, and the router of the stage
  before asks it where each key goes (``Affinity.placer``);
- the server rank addresses a replica with a command (``command_message``: load or
  unload a model), broadcast on the control plane; the rank that hosts the replica hands
  it to the stage (``deliver_command``), in-process when the replica is local.

Everything here is plain data and locks; the control plane and the runners are wired up
by ``runtime.assemble``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from comms.message import Kind, Message
from stages.base import Directory, Stage

log = logging.getLogger(__name__)

COMMAND_OP = "command"
LOCAL_REPORT_INTERVAL_S = 0.5
"""How often the server rank re-reads the reports of replicas in its own process."""


EVERY_REPLICA = -1


def command_message(stage: str, replica: int, command: dict[str, Any]) -> Message:
    """The control message that hands ``command`` to replica ``replica`` of ``stage``
    (``EVERY_REPLICA``: to each of them)."""
    return Message(kind=Kind.CONTROL, meta={"op": COMMAND_OP, "stage": stage, "replica": replica,
                                            "command": dict(command)})


def collect_reports(stages: dict[tuple[str, int], Stage]) -> dict[str, dict[str, Any]]:
    """``{stage: {replica (str, JSON keys): report}}`` of the replicas that report anything."""
    reports: dict[str, dict[str, Any]] = {}
    for (name, replica), stage in stages.items():
        try:
            report = stage.report()
        except Exception:  # a report is advisory: never let it stop a heartbeat
            log.exception("stage %s#%d failed to report", name, replica)
            continue
        if report is not None:
            reports.setdefault(name, {})[str(replica)] = report
    return reports


def deliver_command(stages: dict[tuple[str, int], Stage], meta: dict[str, Any]) -> bool:
    """Hand a command message's command to its replica(s) in this process; True if this
    process hosts the one replica it names (so nobody else needs it)."""
    name, replica = str(meta.get("stage")), int(meta.get("replica", EVERY_REPLICA))
    targets = [stage for (n, r), stage in stages.items() if n == name and replica in (r, EVERY_REPLICA)]
    for stage in targets:
        try:
            stage.command(dict(meta.get("command") or {}))
        except Exception:
            log.exception("stage %s#%s failed the command %r", name, replica, meta.get("command"))
    return replica != EVERY_REPLICA and bool(targets)


class Affinity:
    """The server rank's directories, one per stage reached by ``routing: affinity``."""

    def __init__(self, directories: dict[str, Directory], local_stages: Callable[[], dict[tuple[str, int], Stage]],
                 send: Callable[[Message], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.directories = directories
        self._local_stages = local_stages
        """The replicas in this process (their reports are read here, not heartbeats)."""
        self._send = send
        """Broadcasts a control message to the other ranks."""
        self._clock = clock
        self._lock = threading.Lock()
        self._local_read = float("-inf")

    def placer(self, stage: str) -> Callable[[str, list[int]], int]:
        """The router's ``placer`` for messages going to ``stage``."""
        directory = self.directories[stage]

        def place(key: str, credits: list[int]) -> int:
            self._refresh_local()
            return directory.route(key, credits)

        return place

    def on_reports(self, reports: dict[str, dict[str, Any]]) -> None:
        """Reports from a heartbeat (or this process): ``{stage: {replica: report}}``."""
        for stage, by_replica in reports.items():
            directory = self.directories.get(stage)
            if directory is None or not isinstance(by_replica, dict):
                continue
            for replica, report in by_replica.items():
                try:
                    directory.update(int(replica), report)
                except (TypeError, ValueError) as e:  # a malformed report must not stop the heartbeats
                    log.warning("stage %s#%s sent a report the directory cannot read: %s", stage, replica, e)

    def snapshot(self, stage: str) -> dict[str, Any]:
        self._refresh_local(force=True)
        return self.directories[stage].snapshot()

    def command(self, stage: str, key: str, action: str) -> int:
        """Send ``{"action": action, "key": key}``: a load to the replica the directory
        places ``key`` on (returned), anything else (an unload) to every replica, since
        the key may sit on any of them (``EVERY_REPLICA`` returned)."""
        directory = self.directories[stage]
        self._refresh_local(force=True)
        replica = directory.placement_for_load(key) if action == "load" else EVERY_REPLICA
        msg = command_message(stage, replica, {"action": action, "key": key})
        if not deliver_command(self._local_stages(), msg.meta):
            self._send(msg)
        return replica

    def _refresh_local(self, force: bool = False) -> None:
        now = self._clock()
        with self._lock:
            if not force and now - self._local_read < LOCAL_REPORT_INTERVAL_S:
                return
            self._local_read = now
        self.on_reports(collect_reports(self._local_stages()))
