"""Control plane over in-process links: config fan-out, heartbeats, stall, loss, guarded threads."""

import time

from comms.inprocess import inprocess_link
from comms.message import Kind, Message
from core.settings import RuntimeSettings
from runtime.control import ControlClient, ControlConfig, ControlHub, config_message, stop_message
from runtime.lifecycle import Lifecycle
from runtime.live_view import LiveView

FAST = ControlConfig(heartbeat_s=0.05, liveness_timeout_s=0.3, shutdown_timeout_s=2)


class Job:
    """The server rank's hub and one client per other rank, each with its own Lifecycle,
    wired with in-process links."""

    def __init__(self, ranks=(1, 2), on_snapshot=None):
        self.life = {r: Lifecycle() for r in (0, *ranks)}
        self.ctl = {r: inprocess_link(f"control:0->{r}", 8) for r in ranks}  # (hub's writer, client's reader)
        self.status = {r: inprocess_link(f"status:{r}->0", 8) for r in ranks}  # (client's writer, hub's reader)
        self.snapshots, self.events = {}, []
        self.views = {r: LiveView(1, RuntimeSettings()) for r in ranks}
        self.hub = ControlHub(config=FAST, ctl={r: w for r, (w, _) in self.ctl.items()},
                              status={r: rd for r, (_, rd) in self.status.items()},
                              roles={0: "server", **{r: f"worker{r}" for r in ranks}}, lifecycle=self.life[0],
                              on_snapshot=on_snapshot or self.snapshots.__setitem__, on_event=self.events.append)
        self.clients = {
            r: ControlClient(config=FAST, ctl=self.ctl[r][1], status=self.status[r][0], live=self.views[r],
                             snapshot=lambda r=r: {"rank": r}, lifecycle=self.life[r], server="rank 0 (server)")
            for r in ranks}

    def failure(self, rank):
        return self.life[rank].failure

    def start(self, hub=True):
        if hub:
            self.hub.start()
        for c in self.clients.values():
            c.start()
            c.report_ready()

    def shutdown(self):
        for life in self.life.values():
            life.request_stop("test over")


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
    job.hub.broadcast(stop_message("the page's owner stopped it", failed=False))
    assert wait_for(lambda: all(job.life[r].stopping.is_set() for r in (1, 2)))
    assert [job.life[r].reason for r in (1, 2)] == ["the page's owner stopped it"] * 2
    assert job.failure(1) is None and job.failure(2) is None
    job.shutdown()


def test_a_failed_job_ends_every_rank_non_zero_without_repeating_the_reason():
    job = Job()
    job.start()
    job.hub.broadcast(stop_message("failure: rank 2 (worker2) died: out of memory", failed=True))
    assert wait_for(lambda: job.failure(1) and job.failure(2))
    assert job.failure(1) == "stopped by rank 0 (server) after a failure (its log says why)"
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
    job.life[2].stopping.set()  # rank 2 stops sending heartbeats but keeps its links open
    assert wait_for(lambda: job.failure(0))
    assert job.failure(0).startswith("rank 2 (worker2) stalled: no heartbeat for")
    job.shutdown()


def test_a_closed_status_link_means_the_rank_is_gone():
    job = Job(ranks=(1,))
    job.start()
    assert job.hub.all_reported.wait(2)
    job.life[1].stopping.set()
    job.status[1][0].close()
    assert wait_for(lambda: job.failure(0))
    assert job.failure(0) == "rank 1 (worker1) closed its control link unexpectedly"
    job.shutdown()


def test_a_worker_notices_rank_0_going_away():
    job = Job(ranks=(1,))
    job.start()
    job.ctl[1][0].close()
    assert wait_for(lambda: job.failure(1))
    assert job.failure(1).startswith("lost the control link from rank 0 (server): ")
    job.shutdown()


def test_a_rank_that_leaves_says_why_clean_or_failed():
    job = Job()
    job.start()
    assert job.hub.all_reported.wait(2)
    job.clients[1].leave("SIGTERM", failed=False)
    assert wait_for(lambda: job.life[0].stopping.is_set())
    assert job.life[0].reason == "rank 1 (worker1) stopped: SIGTERM" and job.failure(0) is None
    job.shutdown()
    job = Job()
    job.start()
    assert job.hub.all_reported.wait(2)
    job.clients[2].leave("stage generator#0 failed: out of memory", failed=True)
    assert wait_for(lambda: job.failure(0))
    assert job.failure(0) == "rank 2 (worker2) failed: stage generator#0 failed: out of memory"
    job.shutdown()


def test_a_worker_notices_rank_0_no_longer_taking_status():
    job = Job(ranks=(1,))
    job.start(hub=False)  # rank 0 frozen: nothing reads the status link
    assert wait_for(lambda: job.failure(1), timeout=5)
    assert job.failure(1).startswith("rank 0 (server) stalled: it took no status message for")
    job.shutdown()


def test_a_malformed_control_message_fails_the_rank_visibly():
    job = Job(ranks=(1,))
    job.start()
    job.ctl[1][0].send(Message(kind=Kind.CONTROL, meta={"op": "config", "revision": 2}))  # no settings
    assert wait_for(lambda: job.failure(1))
    assert job.failure(1).startswith("control plane thread control failed: KeyError('settings')")
    job.shutdown()


def test_a_hub_callback_that_raises_fails_the_job_instead_of_looking_stalled():
    def broken(rank, snapshot):
        raise ValueError("aggregator bug")

    job = Job(ranks=(1,), on_snapshot=broken)
    job.start()
    assert wait_for(lambda: job.failure(0))
    assert job.failure(0) == "control plane thread status-1 failed: ValueError('aggregator bug')"
    job.shutdown()
