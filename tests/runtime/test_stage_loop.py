"""The stage loop over in-process channels: batching, routing, staleness, errors."""

import logging
import threading
import time

import pytest
import torch

from comms.inprocess import InProcessChannel
from comms.message import Kind, Message
from runtime.live_config import RuntimeSettings
from runtime.live_view import LiveView
from runtime.metrics import StageMetrics
from runtime.stage_loop import Router, StageRunner
from stages.base import Stage, StageContext


class Doubler(Stage):
    """Test stage: doubles tensor 0; fails on frame id 13; records batch sizes."""

    kind = "doubler"
    Config = dict

    def __init__(self, config, context):
        super().__init__(config, context)
        self.batches = []

    def process(self, batch):
        self.batches.append(len(batch))
        if any(m.frame_id == 13 for m in batch):
            raise ValueError("unlucky frame")
        return [m.derive(Kind.FRAME, tensors=[m.tensors[0] * 2]) for m in batch]


def msg(i, session="s", revision=1):
    return Message(kind=Kind.FRAME, session=session, frame_id=i, revision=revision,
                   tensors=[torch.tensor([i])])


def make_runner(inputs, outputs, *, max_batch=1, wait_ms=0.0, live=None, policy="round_robin"):
    stop = threading.Event()
    events = []
    failures = []
    live = live or LiveView(1, RuntimeSettings())
    context = StageContext(rank=0, role="test", replica=0, device=torch.device("cpu"),
                           logger=logging.getLogger("test"), runtime=live.get)
    stage = Doubler({}, context)
    runner = StageRunner(name="doubler#0", stage=stage, inputs=inputs,
                         router=Router(outputs, policy, stop), max_batch=max_batch,
                         batch_wait_ms=wait_ms, live=live, metrics=StageMetrics("doubler#0"),
                         stop=stop, publish_event=events.append, on_failure=failures.append)
    return runner, stage, stop, events, failures


def drain(channel, n, timeout=5.0):
    return [channel.recv(timeout=timeout) for _ in range(n)]


def test_processes_in_order_and_batches_what_is_queued():
    src, dst = InProcessChannel("in", 16), InProcessChannel("out", 16)
    for i in range(8):
        src.send(msg(i))
    runner, stage, stop, _, _ = make_runner([src], [dst], max_batch=4)
    runner.start()
    out = drain(dst, 8)
    stop.set()
    assert runner.join(2)
    assert [m.frame_id for m in out] == list(range(8))
    assert [int(m.tensors[0]) for m in out] == [2 * i for i in range(8)]
    assert max(stage.batches) > 1 and sum(stage.batches) == 8


def test_merges_several_inputs_and_ends_when_all_send_end():
    a, b, dst = InProcessChannel("a", 8), InProcessChannel("b", 8), InProcessChannel("out", 32)
    for i in range(3):
        a.send(msg(i, "a"))
        b.send(msg(i, "b"))
    a.close()  # senders close: queued messages still drain, then the input ends
    b.close()
    runner, _, _, _, _ = make_runner([a, b], [dst])
    runner.start()
    out = drain(dst, 6)
    assert runner.join(2), "the loop should end once every input has ended"
    for session in "ab":
        assert [m.frame_id for m in out if m.session == session] == [0, 1, 2]


def test_stale_frames_are_flushed_after_a_config_change():
    live = LiveView(1, RuntimeSettings())
    live.set(2, RuntimeSettings(strength=0.1))
    src, dst = InProcessChannel("in", 8), InProcessChannel("out", 8)
    src.send(msg(1, revision=1))
    src.send(msg(2, revision=2))
    runner, _, stop, _, _ = make_runner([src], [dst], live=live)
    runner.start()
    out = drain(dst, 1)
    time.sleep(0.05)
    stop.set()
    runner.join(2)
    assert [m.frame_id for m in out] == [2]
    assert runner.metrics.flushed == 1


def test_a_failing_batch_is_reported_and_the_loop_goes_on():
    src, dst = InProcessChannel("in", 8), InProcessChannel("out", 8)
    for i in (12, 13, 14):
        src.send(msg(i))
    runner, _, stop, events, failures = make_runner([src], [dst])
    runner.start()
    out = drain(dst, 2)
    stop.set()
    runner.join(2)
    assert [m.frame_id for m in out] == [12, 14]
    assert events and events[0].meta["code"] == "stage_error" and "unlucky" in events[0].meta["message"]
    assert not failures and runner.metrics.errors == 1


def test_backpressure_blocks_the_loop_until_downstream_takes():
    src, dst = InProcessChannel("in", 16), InProcessChannel("out", 2)
    for i in range(6):
        src.send(msg(i))
    runner, _, stop, _, _ = make_runner([src], [dst])
    runner.start()
    time.sleep(0.3)
    assert dst.credits() == 0 and runner.metrics.frames_in <= 3  # 2 in flight + 1 waiting
    out = drain(dst, 6)
    stop.set()
    runner.join(2)
    assert [m.frame_id for m in out] == list(range(6))


@pytest.mark.parametrize("policy", ["round_robin", "least_loaded", "session"])
def test_router_policies_spread_or_pin(policy):
    stop = threading.Event()
    outs = [InProcessChannel(f"o{i}", 64) for i in range(3)]
    router = Router(outs, policy, stop)
    for i in range(12):
        router.send(msg(i, session=f"s{i % 2}"))
    counts = [64 - c.credits() for c in outs]
    assert sum(counts) == 12
    if policy == "session":
        for channel in outs:  # each session's frames all on one replica
            sessions = set()
            while channel.credits() < 64:
                sessions.add(channel.recv(0).session)
            assert len(sessions) <= 1 or channel is None
    else:
        assert counts == [4, 4, 4]


def test_router_rejects_bad_policy_and_empty_outputs():
    with pytest.raises(ValueError, match="routing policy 'random'"):
        Router([InProcessChannel("o", 1)], "random", threading.Event())
    with pytest.raises(ValueError, match="at least one downstream"):
        Router([], "round_robin", threading.Event())
