"""Routing around lost replicas: a link that breaks under a send, or a replica the hub
declared lost, is never used again; its messages go to the other replicas or the
stage's fallback, and a message with nowhere to go is counted and logged. Also the
reading side: an inbound link from a dead rank ends that input only."""

import logging
import threading
import time

import pytest
import torch

from comms.errors import ChannelClosed, PeerFailure
from comms.inprocess import inprocess_link
from comms.message import Kind, Message
from core.settings import RuntimeSettings
from runtime.availability import StageAvailability
from runtime.lifecycle import Lifecycle
from runtime.live_view import LiveView
from runtime.metrics import StageMetrics
from runtime.stage_loop import Fallback, Router, StageRunner
from stages.base import SAME, Stage, StageContext


class Breakable:
    """An in-process link's writer whose peer can be made to vanish: then every send raises
    what a broken cross-rank link raises (``PeerFailure``), or ``ChannelClosed``."""

    def __init__(self, name, capacity=64):
        self.writer, self.reader = inprocess_link(name, capacity)
        self.name = name
        self.broken: type[Exception] | None = None
        self.sends = 0

    def send(self, msg, timeout=None):
        self.sends += 1
        if self.broken is not None:
            raise self.broken(f"link {self.name!r}: rank 3 closed the connection without CLOSED (died?)")
        self.writer.send(msg, timeout=timeout)

    def credits(self):
        return self.writer.credits()  # the break shows only when a send tries the link

    def got(self):
        out = []
        while True:
            try:
                out.append(self.reader.recv(0))
            except Exception:
                return out


def msg(i, session="s"):
    return Message(kind=Kind.DATA, session=session, frame_id=i, revision=1)


@pytest.mark.parametrize("error", [PeerFailure, ChannelClosed])
@pytest.mark.parametrize("policy", ["round_robin", "least_loaded", "session"])
def test_a_message_whose_link_breaks_goes_to_another_replica(policy, error):
    a, b = Breakable("x->g#0"), Breakable("x->g#1")
    router = Router([a, b], policy, threading.Event(), name="x#0")
    for i in range(4):
        assert router.send(msg(i, session=f"s{i}"))
    assert len(a.got()) + len(b.got()) == 4
    b.broken, b.sends = error, 0
    for i in range(4, 10):
        assert router.send(msg(i, session=f"s{i}"))
    assert [m.frame_id for m in a.got()] == list(range(4, 10))  # none lost, all to the live one
    assert b.sends <= 1  # tried once at most, then never again
    assert router.usable([a, b]) == [a] and not router.dropped


def test_a_replica_the_hub_declared_lost_is_skipped_without_a_send():
    # A stalled rank's link does not break: it just never returns a credit. Session
    # routing would wait on it forever; once the hub says so, the session moves.
    a, stalled = Breakable("x->g#0"), Breakable("x->g#1", capacity=1)
    lost = set()
    router = Router([a, stalled], "session", threading.Event(), gone=lambda name: name in lost)
    session = next(s for s in (f"s{i}" for i in range(50)) if router._choose(router.outlets, router.outlets,
                                                                             msg(0, s)) is stalled)
    assert router.send(msg(0, session))  # takes the stalled replica's only credit
    done = threading.Event()
    threading.Thread(target=lambda: (router.send(msg(1, session)), done.set()), daemon=True).start()
    assert not done.wait(0.3)  # waits for a credit that never comes...
    lost.add("x->g#1")
    assert done.wait(1.0)  # ...until the hub says the replica is lost
    assert [m.frame_id for m in a.got()] == [1]


def test_losing_a_replica_moves_only_its_own_sessions():
    outlets = [Breakable(f"x->g#{i}") for i in range(3)]
    router = Router(outlets, "session", threading.Event())
    sessions = [f"s{i}" for i in range(30)]
    before = {s: router._choose(outlets, outlets, msg(0, s)) for s in sessions}
    outlets[1].broken = PeerFailure
    router.send(msg(0, next(s for s in sessions if before[s] is outlets[1])))  # finds out
    usable = router.usable(outlets)
    after = {s: router._choose(outlets, usable, msg(0, s)) for s in sessions}
    assert all(after[s] is before[s] for s in sessions if before[s] is not outlets[1])
    assert all(after[s] is not outlets[1] for s in sessions)


def fallback_router(availability=None):
    heavy, light = Breakable("x->heavy#0", 2), Breakable("x->light#0")
    availability = availability or StageAvailability()
    metrics = StageMetrics("x#0")
    router = Router([heavy], "round_robin", threading.Event(),
                    Fallback(outlets=[light], stage="heavy", wait_s=0.0, availability=availability), metrics)
    return router, heavy, light, metrics


def test_a_stage_whose_only_replica_is_lost_diverts_to_its_fallback():
    router, heavy, light, metrics = fallback_router()
    assert router.send(msg(0))
    heavy.broken = PeerFailure
    for i in range(1, 5):
        assert router.send(msg(i))
    assert [m.frame_id for m in heavy.got()] == [0] and [m.frame_id for m in light.got()] == [1, 2, 3, 4]
    assert metrics.snapshot()["diverted"]["unavailable"] == 4 and not router.dropped


def test_with_every_fallback_replica_lost_the_stage_takes_every_frame_however_slow():
    router, heavy, light, metrics = fallback_router()
    light.broken = PeerFailure
    assert router.send(msg(0)) and router.send(msg(1))  # heavy's two credits
    taker = threading.Timer(0.2, heavy.reader.recv, kwargs={"timeout": 1})
    taker.start()
    started = time.monotonic()
    assert router.send(msg(2))  # saturated, nowhere to divert: waits for heavy
    assert time.monotonic() - started >= 0.15
    assert metrics.snapshot()["diverted"] == {"saturated": 0, "unavailable": 0}
    taker.join()


def test_a_message_with_nowhere_to_go_is_dropped_counted_and_logged(caplog):
    a = Breakable("x->g#0")
    router = Router([a], "round_robin", threading.Event(), name="vision#0")
    a.broken = PeerFailure
    with caplog.at_level(logging.WARNING, logger="runtime.router"):
        for i in range(3):
            assert router.send(msg(i)) is True  # the runner goes on with its next batch
    (reason, count), = router.dropped.items()
    assert count == 3 and reason.startswith("no live replica to send to (link 'x->g#0': rank 3 closed")
    dropped = [r.getMessage() for r in caplog.records if "dropped frame" in r.getMessage()]
    assert dropped and dropped[0].startswith("vision#0 dropped frame 0 of session s: no live replica")
    assert any("link x->g#0 is lost" in r.getMessage() for r in caplog.records)


def test_a_stopping_job_neither_reroutes_nor_counts():
    stop = threading.Event()
    a, b = Breakable("x->g#0"), Breakable("x->g#1")
    router = Router([a, b], "round_robin", stop)
    stop.set()
    a.broken = b.broken = ChannelClosed
    assert router.send(msg(0)) is False and not router.dropped and router.usable([a, b]) == [a, b]


# -- the reading side ----------------------------------------------------------------

class Dead:
    """An inbound link from a rank that died: it raises what a broken link raises."""

    name = "g#1->display#0"

    def recv(self, timeout=None):
        raise PeerFailure("link 'g#1->display#0': rank 3 closed the connection without END (died?)")


class Keep(Stage):
    kind = "keep_loss_test"
    Config = dict
    accepts = SAME
    emits = None

    def __init__(self, config, context):
        super().__init__(config, context)
        self.got = []

    def process(self, batch):
        self.got += [m.frame_id for m in batch]
        return []


def test_an_input_from_a_dead_rank_ends_that_input_only():
    live, live_in = inprocess_link("g#0->display#0", 8)
    life = Lifecycle()
    stage = Keep({}, StageContext(rank=0, role="server", replica=0, device=torch.device("cpu"),
                                  logger=logging.getLogger("test"), runtime=lambda: None))
    runner = StageRunner(name="display#0", stage=stage, inputs=[Dead(), live_in], router=None, max_batch=4,
                         batch_wait_ms=1, live=LiveView(1, RuntimeSettings()), metrics=StageMetrics("display#0"),
                         lifecycle=life, publish_event=lambda m: None)
    runner.start()
    for i in range(5):
        live.send(msg(i))
    deadline = time.monotonic() + 3
    while len(stage.got) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stage.got == [0, 1, 2, 3, 4] and [i.name for i in runner.inputs] == ["g#0->display#0"]
    assert life.failure is None and not life.stopping.is_set()
    life.request_stop("test over")
    assert runner.join(2)
