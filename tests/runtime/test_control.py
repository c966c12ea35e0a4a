"""Control plane over in-process channels: config fan-out, heartbeats, stall and loss."""

import threading
import time

from comms.inprocess import InProcessChannel
from comms.message import Kind, Message
from runtime.control import ControlClient, ControlConfig, ControlHub, config_message
from runtime.live_config import RuntimeSettings
from runtime.live_view import LiveView

FAST = ControlConfig(heartbeat_s=0.05, liveness_timeout_s=0.3, shutdown_timeout_s=2)


class Job:
    """Rank 0's hub and one client per other rank, wired with in-process links."""

    def __init__(self, ranks=(1, 2)):
        self.stop = {r: threading.Event() for r in (0, *ranks)}
        self.ctl = {r: InProcessChannel(f"ctl:0->{r}", 8) for r in ranks}
        self.status = {r: InProcessChannel(f"status:{r}->0", 8) for r in ranks}
        self.failures = {r: [] for r in (0, *ranks)}
        self.snapshots, self.events, self.stopped = {}, [], {}
        self.hub_stops = []
        self.views = {r: LiveView(1, RuntimeSettings()) for r in ranks}
        self.hub = ControlHub(config=FAST, ctl=self.ctl, status=self.status,
                              roles={0: "server", **{r: f"worker{r}" for r in ranks}},
                              on_snapshot=self.snapshots.__setitem__, on_event=self.events.append,
                              on_stop=self.hub_stops.append, on_failure=self.failures[0].append,
                              stopping=self.stop[0])
        self.clients = {
            r: ControlClient(config=FAST, ctl=self.ctl[r], status=self.status[r], live=self.views[r],
                             snapshot=lambda r=r: {"rank": r}, on_stop=lambda why, r=r: self._stopped(r, why),
                             on_failure=self.failures[r].append, stopping=self.stop[r])
            for r in ranks}

    def _stopped(self, rank, why):
        self.stopped[rank] = why
        self.stop[rank].set()

    def start(self, hub=True):
        if hub:
            self.hub.start()
        for c in self.clients.values():
            c.start()

    def shutdown(self):
        for e in self.stop.values():
            e.set()


def wait_for(predicate, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_heartbeats_mark_ranks_ready_and_carry_snapshots():
    job = Job()
    job.start()
    assert job.hub.all_reported.wait(2)
    assert wait_for(lambda: job.snapshots.get(2) == {"rank": 2})
    assert all(alive for alive, _ in job.hub.liveness().values())
    job.shutdown()


def test_config_reaches_every_rank_and_stop_is_obeyed():
    job = Job()
    job.start()
    job.hub.broadcast(config_message(5, RuntimeSettings(style="ink")))
    assert wait_for(lambda: all(v.get().revision == 5 for v in job.views.values()))
    assert job.views[1].get().settings.style == "ink"
    job.hub.broadcast(Message(kind=Kind.CONTROL, meta={"op": "stop", "reason": "test over"}))
    assert wait_for(lambda: job.stopped == {1: "test over", 2: "test over"})
    job.shutdown()


def test_events_from_a_rank_reach_rank_0():
    job = Job()
    job.start()
    job.clients[1].publish_event(Message(kind=Kind.EVENT, session="s1", meta={"code": "bad_jpeg"}))
    assert wait_for(lambda: job.events and job.events[0].session == "s1")
    job.shutdown()


def test_a_stalled_rank_is_reported_by_name():
    job = Job()
    job.start()
    assert job.hub.all_reported.wait(2)
    job.stop[2].set()  # rank 2 stops sending heartbeats but keeps its links open
    assert wait_for(lambda: job.failures[0])
    assert job.failures[0][0].startswith("rank 2 (worker2) stalled: no heartbeat for")
    job.shutdown()


def test_a_closed_status_link_means_the_rank_is_gone():
    job = Job(ranks=(1,))
    job.start()
    assert job.hub.all_reported.wait(2)
    job.stop[1].set()
    job.status[1].close()
    assert wait_for(lambda: job.failures[0])
    assert "rank 1 (worker1)" in job.failures[0][0]
    job.shutdown()


def test_a_worker_notices_rank_0_going_away():
    job = Job(ranks=(1,))
    job.start()
    job.ctl[1].close()
    assert wait_for(lambda: job.failures[1])
    assert "control link from rank 0" in job.failures[1][0]
    job.shutdown()


def test_a_rank_that_leaves_says_why_clean_or_failed():
    job = Job()
    job.start()
    assert job.hub.all_reported.wait(2)
    job.clients[1].leave("SIGTERM", failed=False)
    assert wait_for(lambda: job.hub_stops == ["rank 1 (worker1) stopped: SIGTERM"])
    assert not job.failures[0]
    job.clients[2].leave("stage generator#0 failed: out of memory", failed=True)
    assert wait_for(lambda: job.failures[0])
    assert job.failures[0][0] == "rank 2 (worker2) failed: stage generator#0 failed: out of memory"
    job.shutdown()


def test_a_worker_notices_rank_0_no_longer_taking_status():
    job = Job(ranks=(1,))
    job.start(hub=False)  # rank 0 frozen: nothing reads the status link
    assert wait_for(lambda: job.failures[1], timeout=5)
    assert job.failures[1][0].startswith("rank 0 stalled: it took no status message for")
    job.shutdown()


def test_a_malformed_control_message_fails_the_rank_visibly():
    job = Job(ranks=(1,))
    job.start()
    job.ctl[1].send(Message(kind=Kind.CONTROL, meta={"op": "config", "revision": 2}))  # no settings
    assert wait_for(lambda: job.failures[1])
    assert "control plane failed" in job.failures[1][0]
    job.shutdown()
