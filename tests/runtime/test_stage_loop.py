"""The stage loop over in-process links: batching, routing, staleness, errors, sources and sinks."""

import logging
import threading
import time

import pytest
import torch

from comms.inprocess import inprocess_link
from comms.message import Kind, Message
from core.settings import RuntimeSettings
from runtime.lifecycle import Lifecycle
from runtime.live_view import LiveView
from runtime.metrics import StageMetrics
from runtime.stage_loop import Router, StageRunner
from stages.base import ANY, SAME, Stage, StageContext


class Doubler(Stage):
    """Test stage: doubles tensor 0; fails on frame id 13; records batch sizes."""

    kind = "doubler"
    Config = dict
    accepts = ANY
    emits = SAME

    def __init__(self, config, context):
        super().__init__(config, context)
        self.batches = []

    def process(self, batch):
        self.batches.append(len(batch))
        if any(m.frame_id == 13 for m in batch):
            raise ValueError("unlucky frame")
        return [m.derive(tensors=[m.tensors[0] * 2]) for m in batch]


def msg(i, session="s", revision=1):
    return Message(kind=Kind.DATA, session=session, frame_id=i, revision=revision,
                   tensors=[torch.tensor([i])])


def link(name, capacity):
    """Both ends of an in-process link."""
    return inprocess_link(name, capacity)


def make_runner(inputs, outputs, *, max_batch=1, wait_ms=0.0, live=None, policy="round_robin", stage_class=Doubler):
    lifecycle = Lifecycle()
    events = []
    live = live or LiveView(1, RuntimeSettings())
    context = StageContext(rank=0, role="test", replica=0, device=torch.device("cpu"),
                           logger=logging.getLogger("test"), runtime=live.get)
    stage = stage_class({}, context)
    runner = StageRunner(name="doubler#0", stage=stage, inputs=inputs,
                         router=Router(outputs, policy, lifecycle.stopping) if outputs else None,
                         max_batch=max_batch, batch_wait_ms=wait_ms, live=live, metrics=StageMetrics("doubler#0"),
                         lifecycle=lifecycle, publish_event=events.append)
    return runner, stage, lifecycle.stopping, events, lifecycle


def drain(channel, n, timeout=5.0):
    return [channel.recv(timeout=timeout) for _ in range(n)]


def test_processes_in_order_and_batches_what_is_queued():
    (src, src_in), (dst_out, dst) = link("in", 16), link("out", 16)
    for i in range(8):
        src.send(msg(i))
    runner, stage, stop, _, _ = make_runner([src_in], [dst_out], max_batch=4)
    runner.start()
    out = drain(dst, 8)
    stop.set()
    assert runner.join(2)
    assert [m.frame_id for m in out] == list(range(8))
    assert [int(m.tensors[0]) for m in out] == [2 * i for i in range(8)]
    assert max(stage.batches) > 1 and sum(stage.batches) == 8


def test_merges_several_inputs_and_ends_when_all_send_end():
    (a, a_in), (b, b_in), (dst_out, dst) = link("a", 8), link("b", 8), link("out", 32)
    for i in range(3):
        a.send(msg(i, "a"))
        b.send(msg(i, "b"))
    a.close()  # senders close (END): queued messages still drain, then the input ends
    b.close()
    runner, _, _, _, _ = make_runner([a_in, b_in], [dst_out])
    runner.start()
    out = drain(dst, 6)
    assert runner.join(2), "the loop should end once every input has ended"
    for session in "ab":
        assert [m.frame_id for m in out if m.session == session] == [0, 1, 2]


def test_stale_frames_are_flushed_after_a_config_change():
    live = LiveView(1, RuntimeSettings())
    live.set(2, RuntimeSettings(strength=0.1))
    (src, src_in), (dst_out, dst) = link("in", 8), link("out", 8)
    src.send(msg(1, revision=1))
    src.send(msg(2, revision=2))
    runner, _, stop, _, _ = make_runner([src_in], [dst_out], live=live)
    runner.start()
    out = drain(dst, 1)
    time.sleep(0.05)
    stop.set()
    runner.join(2)
    assert [m.frame_id for m in out] == [2]
    assert runner.metrics.flushed == 1


def test_a_failing_batch_is_reported_and_the_loop_goes_on():
    (src, src_in), (dst_out, dst) = link("in", 8), link("out", 8)
    for i in (12, 13, 14):
        src.send(msg(i))
    runner, _, stop, events, lifecycle = make_runner([src_in], [dst_out])
    runner.start()
    out = drain(dst, 2)
    stop.set()
    runner.join(2)
    assert [m.frame_id for m in out] == [12, 14]
    assert events and events[0].meta["code"] == "stage_error" and "unlucky" in events[0].meta["message"]
    assert lifecycle.failure is None and runner.metrics.errors == 1


def test_backpressure_blocks_the_loop_until_downstream_takes():
    (src, src_in), (dst_out, dst) = link("in", 16), link("out", 2)
    for i in range(6):
        src.send(msg(i))
    runner, _, stop, _, _ = make_runner([src_in], [dst_out])
    runner.start()
    time.sleep(0.3)
    assert dst_out.credits() == 0 and runner.metrics.frames_in <= 3  # 2 in flight + 1 waiting
    out = drain(dst, 6)
    stop.set()
    runner.join(2)
    assert [m.frame_id for m in out] == list(range(6))


@pytest.mark.parametrize("policy", ["round_robin", "least_loaded", "session"])
def test_router_policies_spread_or_pin(policy):
    stop = threading.Event()
    links = [link(f"o{i}", 64) for i in range(3)]
    router = Router([writer for writer, _ in links], policy, stop)
    for i in range(12):
        router.send(msg(i, session=f"s{i % 2}"))
    counts = [64 - writer.credits() for writer, _ in links]
    assert sum(counts) == 12
    if policy == "session":
        for writer, reader in links:  # each session's frames all on one replica
            sessions = set()
            while writer.credits() < 64:
                sessions.add(reader.recv(0).session)
            assert len(sessions) <= 1
        assert sorted(counts) == [0, 6, 6]
    else:
        assert counts == [4, 4, 4]


def test_router_rejects_bad_policy_and_empty_outputs():
    with pytest.raises(ValueError, match="routing policy 'random'; allowed: round_robin, least_loaded, session, affinity"):
        Router([link("o", 1)[0]], "random", threading.Event())
    with pytest.raises(ValueError, match="at least one downstream"):
        Router([], "round_robin", threading.Event())


class Counter(Stage):
    """Test source: emits frames 0..4 with a short pause each, then nothing."""

    kind = "counter"
    Config = dict
    accepts = None
    emits = SAME

    def __init__(self, config, context):
        super().__init__(config, context)
        self.calls = 0

    def process(self, batch):
        assert batch == []
        self.calls += 1
        if self.calls > 5:
            return []
        time.sleep(0.005)
        return [msg(self.calls - 1)]


class Collector(Stage):
    """Test sink: keeps what it gets, emits nothing (one stray output to be dropped)."""

    kind = "collector"
    Config = dict
    accepts = ANY
    emits = None

    def __init__(self, config, context):
        super().__init__(config, context)
        self.got = []

    def process(self, batch):
        self.got += [m.frame_id for m in batch]
        return batch[:1] if self.got == [0] else []


def test_a_source_is_called_again_and_again_and_its_outputs_routed():
    out, reader = link("out", 16)
    runner, stage, stop, _, _ = make_runner([], [out], stage_class=Counter, live=LiveView(3, RuntimeSettings()))
    runner.start()
    received = drain(reader, 5)
    got = [m.frame_id for m in received]
    assert {m.revision for m in received} == {3}, "a source's outputs carry the live revision they were made under"
    time.sleep(0.2)  # it keeps being called, produces nothing more, and does not spin
    stop.set()
    assert runner.join(2)
    assert got == [0, 1, 2, 3, 4]
    assert 6 <= stage.calls <= 0.2 / 0.01 + 10
    assert runner.metrics.frames_out == 5 and runner.metrics.frames_in == 0


def test_a_sink_takes_its_inputs_and_routes_nothing(caplog):
    src, src_in = link("in", 8)
    for i in range(3):
        src.send(msg(i))
    src.close()
    runner, stage, _, events, lifecycle = make_runner([src_in], [], stage_class=Collector)
    with caplog.at_level(logging.WARNING):
        runner.start()
        assert runner.join(2), "the sink ends when its input ends"
    assert stage.got == [0, 1, 2] and lifecycle.failure is None
    assert "is a sink (emits nothing) but returned a message" in caplog.text
