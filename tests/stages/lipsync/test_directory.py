"""Routing avatars to lip-sync replicas: affinity, placement policies, reports."""

from __future__ import annotations

import pytest
import torch

from stages.lipsync.directory import ModelDirectory
from stages.lipsync.registry import ModelRegistry


def model(avatar, *, resident=True, loading=False, nbytes=1000, requests=1, failed=None, retry_in_s=None):
    """One line of a registry's list(), as ModelRegistry writes it."""
    return {"id": avatar, "bytes": nbytes, "loads": 1, "uses": requests, "requests": requests,
            "last_used_s_ago": 0.5, "resident": resident, "loading": loading, "in_use": 0,
            "failed": failed, "retry_in_s": retry_in_s}


def report(*models, capacity=10_000, used=None):
    used = sum(m["bytes"] for m in models if m["resident"]) if used is None else used
    return {"stats": {"capacity_bytes": capacity, "used_bytes": used,
                      "resident": sum(m["resident"] for m in models)}, "models": list(models)}


def test_an_avatar_sticks_to_its_replica_while_its_load_is_in_flight():
    directory = ModelDirectory(3, placement="round_robin")
    assert [directory.route(a) for a in ("a", "b", "c", "d")] == [0, 1, 2, 0]
    # Until a report shows it, "a" follows its first placement instead of being placed again.
    assert [directory.route("a") for _ in range(5)] == [0] * 5
    # A report taken before the request reached the replica does not contradict it.
    directory.update(0, report(model("d", loading=True)))
    assert directory.route("a") == 0
    directory.update(0, report(model("a", loading=True), model("d")))
    directory.update(0, report(model("a", requests=4), model("d")))
    assert directory.route("a") == 0 and directory.route("e") == 1  # round robin unaffected


def test_a_replica_that_holds_the_avatar_wins_over_placement():
    directory = ModelDirectory(3, placement="round_robin")
    directory.update(2, report(model("x")))  # e.g. loaded there by an explicit load
    assert directory.route("x") == 2
    assert directory.route("y") == 0  # the round robin did not advance for x
    # Held on two replicas too: the one it is assigned to.
    directory.update(1, report(model("x")))
    assert directory.route("x") == 2
    # Held on two replicas, never assigned: the less loaded one, stable afterwards.
    directory = ModelDirectory(2, placement="round_robin")
    directory.update(0, report(model("x"), model("z", nbytes=5000)))
    directory.update(1, report(model("x")))
    assert [directory.route("x") for _ in range(3)] == [1, 1, 1]


def test_a_report_that_shows_an_eviction_lets_the_avatar_be_placed_anew():
    directory = ModelDirectory(2, placement="round_robin")
    assert directory.route("a") == 0
    directory.update(0, report(model("a", requests=3)))
    assert directory.route("a") == 0
    # Evicted on replica 0 (still listed, no longer resident): placed anew, by policy.
    directory.update(0, report(model("a", resident=False, requests=3), model("b")))
    assert "a" not in directory.snapshot()["avatars"]
    assert directory.route("a") == 1


def test_an_assignment_the_replica_saw_requests_for_but_does_not_hold_is_dropped():
    directory = ModelDirectory(2, placement="round_robin")
    directory.update(0, report(model("a", resident=False, requests=2)))  # once there, evicted
    directory.route("b")  # round robin now points at replica 1
    assert directory.route("a") == 1
    directory.update(1, report())  # request not there yet: kept
    assert directory.route("a") == 1
    # Replica 1 saw a request and does not hold it (it could not make room): placed anew.
    directory.update(1, report(model("a", resident=False, requests=1)))
    assert directory.route("a") == 0


def test_an_assignment_never_confirmed_is_dropped_after_some_reports():
    directory = ModelDirectory(2, placement="round_robin", unconfirmed_reports=3)
    assert directory.route("a") == 0
    directory.update(0, report())
    directory.update(0, report())
    assert directory.snapshot()["avatars"]["a"] == {"replicas": [], "state": "assigned", "assigned": 0}
    directory.update(0, report())
    assert "a" not in directory.snapshot()["avatars"]
    assert directory.route("a") == 1


def test_least_loaded_places_by_bytes_then_models_then_credits():
    directory = ModelDirectory(3, placement="least_loaded")
    directory.update(0, report(model("p", nbytes=6000)))
    directory.update(1, report(model("q", nbytes=2000), model("r", nbytes=2000)))
    directory.update(2, report(model("s", nbytes=3000)))
    assert directory.route("new1") == 2  # bytes first: 3000 < 4000 < 6000
    directory.update(2, report(model("s", nbytes=3000), model("new1", nbytes=1000)))
    assert directory.route("new2") == 1  # 4000 each: the fewer models? both 2: the lower index
    directory = ModelDirectory(2, placement="least_loaded")
    directory.update(0, report(model("p", nbytes=3000)))
    directory.update(1, report(model("q", nbytes=1500), model("r", nbytes=1500)))
    assert directory.route("new") == 0  # same bytes: fewer models
    directory = ModelDirectory(3, placement="least_loaded")
    # Nothing reported: models assigned but not yet loaded spread the avatars.
    assert [directory.route(a) for a in ("a", "b", "c")] == [0, 1, 2]
    directory = ModelDirectory(3, placement="least_loaded")
    # Same bytes and models everywhere: the replica with the most free request slots.
    assert directory.route("a", credits=[1, 4, 2]) == 1
    with pytest.raises(ValueError, match="one number per replica"):
        directory.route("b", credits=[1, 2])


def test_least_loaded_uses_the_share_of_capacity_and_counts_known_sizes_of_assigned_models():
    directory = ModelDirectory(2, placement="least_loaded")
    directory.update(0, report(model("p", nbytes=4000), capacity=8000))  # half full
    directory.update(1, report(model("q", nbytes=6000), capacity=20_000))  # 30 %
    assert directory.route("big") == 1
    # A model replica 0 once held (8000 bytes), now evicted there and placed on replica 1:
    directory.update(0, report(model("p", nbytes=4000), model("huge", resident=False, nbytes=8000), capacity=8000))
    assert directory.route("huge") == 1
    # Replica 1 counts it before its report: 6000 + 8000 of 20000 = 70 % > 50 %.
    assert directory.route("next") == 0


def test_preferred_replicas_and_the_fallback_when_out_of_range():
    directory = ModelDirectory(3, placement="preferred", preferred={"a": 2, "b": 7})
    directory.update(0, report(model("p", nbytes=5000)))
    directory.update(1, report(model("q", nbytes=1000)))
    directory.update(2, report(model("r", nbytes=9000)))
    assert directory.route("a") == 2  # preferred, although the fullest
    assert directory.route("b") == 1  # replica 7 does not exist: least loaded
    assert directory.route("c") == 1  # b (size unknown) counts as a model there, not as bytes
    assert directory.snapshot()["ignored_preferences"] == {"b": 7}


def test_a_recent_failure_keeps_routing_to_the_replica_that_remembers_it():
    directory = ModelDirectory(3, placement="round_robin")
    directory.update(1, report(model("bad", resident=False, nbytes=None, failed="ValueError: keys", retry_in_s=20)))
    assert [directory.route("bad") for _ in range(3)] == [1, 1, 1]
    snap = directory.snapshot()
    assert snap["avatars"]["bad"]["state"] == "failed" and snap["replicas"][1]["failed"] == {"bad": "ValueError: keys"}
    # Once the replica would retry, a new request may be placed anywhere.
    directory.update(1, report(model("bad", resident=False, nbytes=None, failed="ValueError: keys", retry_in_s=0,
                                     requests=2)))
    assert directory.route("bad") == 0


def test_placement_for_load_holders_and_forget():
    directory = ModelDirectory(2, placement="round_robin")
    directory.update(1, report(model("x")))
    assert directory.placement_for_load("x") == 1
    assert directory.placement_for_load("y") == 0 and directory.route("y") == 0
    assert directory.holders("x") == [1] and directory.holders("y") == [0] and directory.holders("z") == []
    directory.forget("y")
    assert directory.holders("y") == [] and directory.route("y") == 1


def test_snapshot_lists_replicas_and_avatars():
    directory = ModelDirectory(2, placement="least_loaded", clock=lambda: 50.0)
    directory.update(0, report(model("a"), model("b", resident=False, loading=True, nbytes=None)))
    directory.route("c")
    snap = directory.snapshot()
    assert snap["placement"] == "least_loaded"
    assert snap["replicas"][0] | {"stats": None} == {
        "replica": 0, "capacity_bytes": 10_000, "used_bytes": 1000, "resident": ["a"], "loading": ["b"],
        "failed": {}, "assigned": [], "reported_s_ago": 0.0, "stats": None}
    assert snap["replicas"][1]["reported_s_ago"] is None and snap["replicas"][1]["assigned"] == ["c"]
    assert snap["avatars"] == {"a": {"replicas": [0], "state": "resident", "assigned": None},
                               "b": {"replicas": [0], "state": "loading", "assigned": None},
                               "c": {"replicas": [], "state": "assigned", "assigned": 1}}


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="placement must be one of round_robin, least_loaded, preferred"):
        ModelDirectory(2, placement="random")
    with pytest.raises(ValueError, match="replicas must be an int >= 1"):
        ModelDirectory(0)
    directory = ModelDirectory(2)
    with pytest.raises(ValueError, match=r"replica must be an index in 0\.\.1, got 2"):
        directory.update(2, report())
    with pytest.raises(TypeError, match="needs a string 'id'"):
        directory.update(0, {"models": [{"bytes": 3}]})


@pytest.mark.parametrize("placement", ["round_robin", "least_loaded"])
def test_fifty_avatars_on_real_registries_are_never_resident_twice(placement):
    """Three replicas with room for ten models each, fifty avatars requested in a skewed
    order, reports after every request: each request finds its model, no avatar is ever
    resident on two replicas, and popular avatars are not reloaded."""
    loads = []

    def loader(key):
        loads.append(key)
        return torch.zeros(1000, dtype=torch.uint8), 1000

    registries = [ModelRegistry(capacity_bytes=10_000, loader=loader) for _ in range(3)]
    directory = ModelDirectory(3, placement=placement)
    popular = [f"hot{i}" for i in range(5)]
    requests = []
    for i in range(50):
        requests += [f"avatar{i:02d}", popular[i % 5], popular[(i + 2) % 5]]
    for avatar in requests:
        replica = directory.route(avatar)
        with registries[replica].use(avatar) as weights:
            assert weights.numel() == 1000
        directory.update(replica, registries[replica].report())
        holders = [r for r, reg in enumerate(registries) if any(m["id"] == avatar and m["resident"]
                                                                 for m in reg.list())]
        assert holders == [replica]
    assert all(loads.count(hot) == 1 for hot in popular)
    assert sum(reg.stats()["resident"] for reg in registries) == 30
    assert all(reg.stats()["used_bytes"] <= 10_000 for reg in registries)
