"""Affinity routing: an avatar's frames meet the replica that holds its model.

A real ``ModelDirectory`` (the lip-sync stage's) behind ``runtime.affinity.Affinity``,
fed reports the way heartbeats carry them, and a real ``Router`` over in-process links.
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from comms.inprocess import inprocess_link
from comms.message import Message
from runtime.affinity import EVERY_REPLICA, Affinity, collect_reports, command_message, deliver_command
from runtime.stage_loop import Router
from stages.base import ANY, SAME, Stage, StageContext
from stages.lipsync.directory import ModelDirectory


class Holder(Stage):
    """A keyed stage as the runtime sees one: reports what it holds, takes commands."""

    kind = "holder"
    Config = dict
    accepts = ANY
    emits = SAME

    def __init__(self, holds: list[str], broken: bool = False) -> None:
        super().__init__({}, StageContext(rank=0, role="t", replica=0, device=torch.device("cpu"),
                                          logger=logging.getLogger("test.holder"), runtime=lambda: None))
        self.holds, self.broken, self.commands = list(holds), broken, []

    def process(self, batch):
        return batch

    def report(self):
        if self.broken:
            raise RuntimeError("cannot report")
        return {"stats": {"capacity_bytes": 1000, "used_bytes": 100 * len(self.holds)},
                "models": [{"id": key, "resident": True, "bytes": 100} for key in self.holds]}

    def command(self, command):
        self.commands.append(command)


def frame(avatar: str | None, session: str = "s") -> Message:
    return Message(session=session, meta={} if avatar is None else {"affinity": avatar}, tensors=[torch.zeros(1)])


def test_router_sends_each_key_to_the_replica_holding_it():
    stages = {("lipsync", 0): Holder(["anna"]), ("lipsync", 1): Holder(["bob", "cleo"])}
    affinity = Affinity({"lipsync": ModelDirectory(2)}, local_stages=lambda: stages, send=lambda msg: None)
    links = [inprocess_link(f"l{i}", 16) for i in range(2)]
    router = Router([w for w, _ in links], "affinity", threading.Event(), placer=affinity.placer("lipsync"))
    for avatar in ["bob", "anna", "cleo", "anna", "bob"]:
        assert router.send(frame(avatar))
    got = [[r.recv(0).meta["affinity"] for _ in range(16 - w.credits())] for w, r in links]
    assert got == [["anna", "anna"], ["bob", "cleo", "bob"]]


def test_a_new_key_is_placed_once_and_then_sticks():
    affinity = Affinity({"lipsync": ModelDirectory(3, placement="round_robin")}, local_stages=dict,
                        send=lambda msg: None)
    place = affinity.placer("lipsync")
    first = place("dora", [4, 4, 4])
    assert all(place("dora", [4, 4, 4]) == first for _ in range(5))
    assert place("emil", [4, 4, 4]) != first  # round robin: the next key goes elsewhere


def test_router_without_a_placer_refuses_affinity_and_keyless_frames_pin_by_session():
    with pytest.raises(ValueError, match="needs a placer"):
        Router([inprocess_link("l", 1)[0]], "affinity", threading.Event())
    links = [inprocess_link(f"l{i}", 16) for i in range(3)]
    router = Router([w for w, _ in links], "affinity", threading.Event(), placer=lambda key, credits: 0)
    for _ in range(4):
        router.send(frame(None, session="same"))
    assert sorted(16 - w.credits() for w, _ in links) == [0, 0, 4]


def test_reports_from_heartbeats_reach_the_directory():
    directory = ModelDirectory(2)
    affinity = Affinity({"lipsync": directory}, local_stages=dict, send=lambda msg: None)
    remote = {("lipsync", 1): Holder(["fay"]), ("other", 0): Holder(["x"]), ("lipsync", 0): Holder([], broken=True)}
    reports = collect_reports(remote)  # the broken one is skipped, not fatal
    assert set(reports) == {"lipsync", "other"} and set(reports["lipsync"]) == {"1"}
    affinity.on_reports(reports)
    affinity.on_reports({"lipsync": {"0": {"models": [{"id": 7}]}}})  # malformed: logged, ignored
    assert affinity.snapshot("lipsync")["avatars"]["fay"]["replicas"] == [1]
    assert directory.route("fay") == 1


def test_commands_go_to_the_local_replica_or_out_on_the_control_plane():
    local = {("lipsync", 0): Holder([])}
    sent: list[Message] = []
    affinity = Affinity({"lipsync": ModelDirectory(2, placement="preferred", preferred={"gus": 1, "hal": 0})},
                        local_stages=lambda: local, send=sent.append)
    assert affinity.command("lipsync", "hal", "load") == 0
    assert local["lipsync", 0].commands == [{"action": "load", "key": "hal"}] and not sent
    assert affinity.command("lipsync", "gus", "load") == 1  # replica 1 lives on another rank
    assert sent[-1].meta == {"op": "command", "stage": "lipsync", "replica": 1,
                             "command": {"action": "load", "key": "gus"}}
    assert affinity.command("lipsync", "gus", "unload") == EVERY_REPLICA
    assert sent[-1].meta["replica"] == EVERY_REPLICA and local["lipsync", 0].commands[-1]["action"] == "unload"


def test_deliver_command_reaches_only_the_named_replica():
    stages = {("lipsync", 0): Holder([]), ("lipsync", 1): Holder([])}
    assert deliver_command(stages, command_message("lipsync", 1, {"action": "load", "key": "k"}).meta)
    assert [len(stages["lipsync", r].commands) for r in (0, 1)] == [0, 1]
    assert not deliver_command(stages, command_message("lipsync", 5, {"action": "load"}).meta)
    assert not deliver_command(stages, command_message("lipsync", EVERY_REPLICA, {"action": "unload"}).meta)
    assert [len(stages["lipsync", r].commands) for r in (0, 1)] == [1, 2]
