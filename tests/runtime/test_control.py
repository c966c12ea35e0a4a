"""Control plane over in-process links: config fan-out, heartbeats, stall, loss (and who
decides about it), dismissal, guarded threads."""

import time

from comms.inprocess import inprocess_link
from comms.message import Kind, Message
from core.settings import RuntimeSettings
from runtime.control import ControlClient, ControlConfig, ControlHub, config_message, dismiss_message, stop_message
from runtime.lifecycle import Lifecycle
from runtime.live_view import LiveView

FAST = ControlConfig(heartbeat_s=0.05, liveness_timeout_s=0.3, shutdown_timeout_s=2)


class Job:
    """The server rank's hub and one client per other rank, each with its own Lifecycle,
    wired with in-process links."""

    def __init__(self, ranks=(1, 2), on_snapshot=None, on_lost=None):
        self.life = {r: Lifecycle() for r in (0, *ranks)}
        self.ctl = {r: inprocess_link(f"control:0->{r}", 8) for r in ranks}  # (hub's writer, client's reader)
        self.status = {r: inprocess_link(f"status:{r}->0", 8) for r in ranks}  # (client's writer, hub's reader)
        self.snapshots, self.events = {}, []
        self.views = {r: LiveView(1, RuntimeSettings()) for r in ranks}
        self.hub = ControlHub(config=FAST, ctl={r: w for r, (w, _) in self.ctl.items()},
                              status={r: rd for r, (_, rd) in self.status.items()},
                              roles={0: "server", **{r: f"worker{r}" for r in ranks}}, lifecycle=self.life[0],
                              on_snapshot=on_snapshot or self.snapshots.__setitem__, on_event=self.events.append,
                              on_lost=on_lost)
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


# -- a lost rank: handed to on_lost once it was ready ----------------------------

def test_a_lost_rank_goes_to_on_lost_with_its_cause_and_the_job_runs_on():
    lost = []
    job = Job(on_lost=lambda *loss: lost.append(loss))
    job.start()
    assert job.hub.all_reported.wait(2)
    job.life[1].stopping.set()
    job.status[1][0].close()  # as a dead rank's broken link would end it
    assert wait_for(lambda: lost)
    assert lost == [(1, "died", "rank 1 (worker1) closed its control link unexpectedly")]
    assert job.failure(0) is None and not job.life[0].stopping.is_set()
    job.hub.broadcast(config_message(3, RuntimeSettings(style="ink")))  # the others still get config
    assert wait_for(lambda: job.views[2].get().revision == 3)
    assert job.hub.liveness()[1][0] is False
    job.shutdown()


def test_a_rank_that_leaves_after_a_failure_is_lost_too_but_a_clean_leave_stops_the_job():
    lost = []
    job = Job(on_lost=lambda *loss: lost.append(loss))
    job.start()
    assert job.hub.all_reported.wait(2)
    job.clients[2].leave("stage generator#1 failed: out of memory", failed=True)
    assert wait_for(lambda: lost)
    assert lost == [(2, "failed", "rank 2 (worker2) failed: stage generator#1 failed: out of memory")]
    job.clients[1].leave("SIGTERM", failed=False)
    assert wait_for(lambda: job.life[0].stopping.is_set())
    assert job.life[0].reason == "rank 1 (worker1) stopped: SIGTERM" and len(lost) == 1
    job.shutdown()


def test_a_rank_lost_before_it_was_ready_fails_the_job_whatever_on_lost_would_say():
    lost = []
    job = Job(ranks=(1,), on_lost=lambda *loss: lost.append(loss))
    job.hub.start()
    job.clients[1].start()  # listening, but no heartbeat yet: still setting up
    job.clients[1].leave("stage vision#0 failed: no weights", failed=True)
    assert wait_for(lambda: job.failure(0))
    assert job.failure(0) == "rank 1 (worker1) failed: stage vision#0 failed: no weights" and lost == []
    job.shutdown()


def test_a_stalled_rank_is_lost_dismissed_and_no_longer_heard():
    """Rank 2 here is driven by hand: a heartbeat, then silence (a stall), then a late one."""
    lost = []
    life = Lifecycle()
    ctl_out, ctl_in = inprocess_link("control:0->2", 8)
    status_out, status_in = inprocess_link("status:2->0", 8)
    snapshots = {}
    hub = ControlHub(config=FAST, ctl={2: ctl_out}, status={2: status_in}, roles={0: "server", 2: "worker2"},
                     lifecycle=life, on_snapshot=snapshots.__setitem__, on_event=lambda msg: None,
                     on_lost=lambda *loss: lost.append(loss))
    hub.start()
    status_out.send(Message(kind=Kind.STATUS, meta={"op": "heartbeat", "snapshot": {"n": 1}}))
    assert hub.all_reported.wait(2)
    assert wait_for(lambda: lost)
    assert lost[0][:2] == (2, "stalled") and lost[0][2].startswith("rank 2 (worker2) stalled: no heartbeat for")
    dismissal = ctl_in.recv(timeout=2)
    assert dismissal.meta == {**dismiss_message(lost[0][2]).meta}
    assert dismissal.meta["dismissed"] is True and dismissal.meta["failed"] is True
    status_out.send(Message(kind=Kind.STATUS, meta={"op": "heartbeat", "snapshot": {"n": 2}}))  # it woke up
    time.sleep(0.2)
    assert snapshots == {2: {"n": 1}} and len(lost) == 1 and life.failure is None
    life.request_stop("test over")


def test_a_dismissed_rank_fails_with_the_reason():
    job = Job(ranks=(1,))
    job.start()
    job.ctl[1][0].send(dismiss_message("rank 1 (worker1) stalled: no heartbeat for 5.2 s"))
    assert wait_for(lambda: job.failure(1))
    assert job.failure(1) == ("rank 0 (server) went on without this rank: "
                              "rank 1 (worker1) stalled: no heartbeat for 5.2 s")
    job.shutdown()


def test_availability_with_lost_replicas_reaches_the_workers():
    job = Job(ranks=(1,))
    got = []
    job.clients[1].on_availability = lambda unavailable, lost: got.append((unavailable, lost))
    job.start()
    job.hub.broadcast(Message(kind=Kind.CONTROL, meta={"op": "availability", "unavailable": {"heavy": "lost"},
                                                       "lost": ["heavy#0"]}))
    assert wait_for(lambda: got) and got == [({"heavy": "lost"}, ["heavy#0"])]
    job.shutdown()
