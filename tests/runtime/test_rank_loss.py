"""Which lost ranks the job can do without, decided from the plan alone, and what the
server rank then does: mark what is lost for the routers and tell the pages, or fail."""

from dataclasses import dataclass

import pytest
import torch

from comms.message import Message
from core.config import ConfigError
from runtime.availability import AVAILABILITY_OP, StageAvailability
from runtime.config import config_from_dict
from runtime.lifecycle import Lifecycle
from runtime.planner import plan
from runtime.rank_loss import Hosting, RankLoss, Restarts, decide
from stages.base import Payload, Stage
from stages.registry import register_stage

AUDIO = Payload("loss.f32", (torch.float32,))


@dataclass
class NoSettings:
    pass


def kind(name, accepts, emits):
    return register_stage(type(f"Loss_{name}", (Stage,), {
        "kind": name, "Config": NoSettings, "accepts": accepts, "emits": emits,
        "process": lambda self, batch: batch}))


kind("loss_source", None, AUDIO)
kind("loss_filter", AUDIO, AUDIO)
kind("loss_sink", AUDIO, None)


def hosting(stages, world_size):
    config = config_from_dict({"pipeline": {"name": "loss", "stages": stages}})
    return Hosting.of(plan(config.pipeline, world_size), config.pipeline)


def mirror(world_size):
    config = config_from_dict({})  # the default mirror: generator replicas: auto
    return Hosting.of(plan(config.pipeline, world_size), config.pipeline)


def with_fallback():
    """rank 1 src, rank 2 heavy (fallback: light), rank 3 light, rank 0 sink."""
    return hosting([{"name": "src", "kind": "loss_source"},
                    {"name": "heavy", "kind": "loss_filter", "fallback": "light"},
                    {"name": "light", "kind": "loss_filter"},
                    {"name": "sink", "kind": "loss_sink", "placement": "server"}], 4)


# -- the decision ------------------------------------------------------------------

def test_a_replica_with_a_live_twin_degrades():
    loss = decide(mirror(4), 3, "died", frozenset({3}))
    assert loss.degrade and loss.state == "degraded"
    assert loss.message == "rank 3 (generator) died; its 'generator' frames go to rank 2"
    assert loss.replicas == ("generator#1",) and loss.gone_stages == {}


def test_several_twins_are_named_and_the_last_one_cannot_go():
    h = mirror(5)  # generator on ranks 2, 3, 4
    assert decide(h, 2, "stalled", frozenset({2})).message == (
        "rank 2 (generator) stalled; its 'generator' frames go to ranks 3, 4")
    assert decide(h, 3, "died", frozenset({2, 3})).degrade
    last = decide(h, 4, "died", frozenset({2, 3, 4}))
    assert not last.degrade and last.state == "stopping"
    assert last.message == "rank 4 (generator) died and nothing else can serve 'generator'; the job is stopping"


def test_the_only_replica_of_a_stage_without_a_fallback_fails_the_job():
    loss = decide(mirror(3), 1, "died", frozenset({1}))
    assert not loss.degrade
    assert loss.message == "rank 1 (vision) died and nothing else can serve 'vision'; the job is stopping"


@pytest.mark.parametrize("restarts, state, ending", [
    (Restarts(done=0, allowed=3), "restarting", "the job is restarting (torchrun restart 1 of 3)"),
    (Restarts(done=2, allowed=3), "restarting", "the job is restarting (torchrun restart 3 of 3)"),
    (Restarts(done=3, allowed=3), "stopping", "the job is stopping (no torchrun restarts left)"),
    (Restarts(), "stopping", "the job is stopping"),
])
def test_a_failing_loss_says_whether_torchrun_restarts_the_job(restarts, state, ending):
    loss = decide(mirror(3), 2, "died", frozenset({2}), restarts=restarts)
    assert loss.state == state and loss.message.endswith(f"; {ending}")


def test_a_lost_stage_is_served_by_its_fallback():
    loss = decide(with_fallback(), 2, "died", frozenset({2}))
    assert loss.degrade and loss.message == "rank 2 (heavy) died; serving the fallback 'light' instead of 'heavy'"
    assert loss.gone_stages == {"heavy": "rank 2 (heavy) was lost"}  # its frames divert from now on


def test_a_lost_fallback_leaves_its_stage_to_take_every_frame():
    loss = decide(with_fallback(), 3, "failed", frozenset({3}))
    assert loss.degrade
    assert loss.message == "rank 3 (light) failed; 'heavy' takes every frame (its fallback 'light' is gone)"


def test_losing_a_stage_and_then_its_fallback_fails_the_job():
    h = with_fallback()
    assert decide(h, 2, "died", frozenset({2})).degrade
    assert not decide(h, 3, "died", frozenset({2, 3})).degrade


def test_the_source_has_no_replacement():
    assert not decide(with_fallback(), 1, "died", frozenset({1})).degrade


def test_a_rank_hosting_two_stages_degrades_only_if_both_are_covered():
    shared = hosting([{"name": "src", "kind": "loss_source", "ranks": [1]},
                      {"name": "a", "kind": "loss_filter", "ranks": [2, 3], "replicas": 2},
                      {"name": "b", "kind": "loss_filter", "ranks": [2, 3], "replicas": 2},
                      {"name": "sink", "kind": "loss_sink", "placement": "server"}], 4)
    assert decide(shared, 2, "died", frozenset({2})).message == (
        "rank 2 (a+b) died; its 'a' frames go to rank 3; its 'b' frames go to rank 3")
    lonely = hosting([{"name": "src", "kind": "loss_source", "ranks": [1]},
                      {"name": "a", "kind": "loss_filter", "ranks": [2, 3], "replicas": 2},
                      {"name": "b", "kind": "loss_filter", "ranks": [2]},
                      {"name": "sink", "kind": "loss_sink", "placement": "server"}], 4)
    assert "nothing else can serve 'b'" in decide(lonely, 2, "died", frozenset({2})).message


def test_the_fail_policy_fails_even_what_could_degrade():
    loss = decide(mirror(4), 3, "died", frozenset({3}), policy="fail", restarts=Restarts(allowed=1))
    assert not loss.degrade and loss.state == "restarting"
    assert loss.message == ("rank 3 (generator) died and control.on_rank_loss is 'fail'; "
                            "the job is restarting (torchrun restart 1 of 1)")


def test_bad_policies_and_causes_are_refused():
    with pytest.raises(ValueError, match="on_rank_loss 'retry'; allowed: degrade, fail"):
        decide(mirror(4), 3, "died", frozenset({3}), policy="retry")
    with pytest.raises(ValueError, match="cause 'vanished'; allowed: died, stalled, failed"):
        decide(mirror(4), 3, "vanished", frozenset({3}))


def test_the_config_field_names_its_choices():
    assert config_from_dict({}).control.on_rank_loss == "degrade"
    assert config_from_dict({"control": {"on_rank_loss": "fail"}}).control.on_rank_loss == "fail"
    with pytest.raises(ConfigError, match=r"control\.on_rank_loss: got 'retry'; allowed: 'degrade', 'fail'"):
        config_from_dict({"control": {"on_rank_loss": "retry"}})


def test_torchruns_environment_says_how_many_restarts_and_whether_they_can_work():
    env = {"TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    restarts = Restarts.from_environment(env)
    assert (restarts.done, restarts.allowed, restarts.left) == (1, 3, 2)
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in restarts.problem()
    assert Restarts.from_environment({**env, "TORCHELASTIC_USE_AGENT_STORE": "False"}).problem() is None
    assert Restarts.from_environment({}) == Restarts() and Restarts().problem() is None
    assert Restarts.from_environment({"TORCHELASTIC_MAX_RESTARTS": "x"}).allowed == 0


# -- acting on it ------------------------------------------------------------------

class Recorder:
    def __init__(self, lifecycle):
        self.lifecycle = lifecycle
        self.events = []

    def broadcast(self, msg: Message):
        self.events.append(("broadcast", dict(msg.meta)))

    def announce(self, state, message, lost):
        self.events.append(("announce", state, message, lost, self.lifecycle.failure))


def responder(h, policy="degrade"):
    lifecycle, availability = Lifecycle(), StageAvailability()
    rec = Recorder(lifecycle)
    loss = RankLoss(hosting=h, policy=policy, restarts=Restarts(), availability=availability,
                    broadcast=rec.broadcast, announce=rec.announce, lifecycle=lifecycle)
    return loss, rec, availability, lifecycle


def test_a_degrading_loss_marks_the_replica_for_every_router_and_tells_the_pages():
    loss, rec, availability, lifecycle = responder(mirror(4))
    availability.merge_rank(3, {"generator": "warming up"})  # what rank 3 said no longer counts
    loss(3, "died", "rank 3 (generator) died: link 'status:3->0': connection reset")
    message = "rank 3 (generator) died; its 'generator' frames go to rank 2"
    assert rec.events == [
        ("broadcast", {"op": AVAILABILITY_OP, "unavailable": {}, "lost": ["generator#1"]}),
        ("announce", "degraded", message, [{"rank": 3, "role": "generator", "cause": "died"}], None)]
    assert availability.is_lost("generator#1") and not availability.is_lost("generator#0")
    assert lifecycle.failure is None and not lifecycle.stopping.is_set() and lifecycle.losses == [message]


def test_a_lost_stage_is_marked_unavailable_so_its_frames_divert():
    loss, rec, availability, _ = responder(with_fallback())
    loss(2, "stalled", "rank 2 (heavy) stalled: no heartbeat for 5.1 s")
    assert availability.reason("heavy") == "rank 2 (heavy) was lost"
    assert rec.events[0] == ("broadcast", {"op": AVAILABILITY_OP, "unavailable": {"heavy": "rank 2 (heavy) was lost"},
                                           "lost": ["heavy#0"]})


def test_a_failing_loss_tells_the_pages_first_then_fails_with_the_full_reason():
    loss, rec, availability, lifecycle = responder(mirror(3))
    loss(2, "died", "rank 2 (generator) died: link 'status:2->0': connection reset")
    (event,) = rec.events
    assert event[:2] == ("announce", "stopping") and event[4] is None  # told before the job failed
    assert lifecycle.failure == "rank 2 (generator) died: link 'status:2->0': connection reset"
    assert availability.lost() == frozenset() and lifecycle.losses == []


def test_a_second_loss_counts_the_first():
    loss, rec, _, lifecycle = responder(mirror(4))
    loss(3, "died", "rank 3 died")
    loss(2, "stalled", "rank 2 stalled")
    assert rec.events[-1][1] == "stopping"
    assert rec.events[-1][3] == [{"rank": 3, "role": "generator", "cause": "died"},
                                 {"rank": 2, "role": "generator", "cause": "stalled"}]
    assert lifecycle.failure == "rank 2 stalled"
