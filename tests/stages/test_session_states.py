"""Per-session state: made on first sight, bounded by count and by idle time."""

import logging

from stages.session_states import SessionStates


def states(**kw):
    made = []

    def make(now):
        made.append(now)
        return {"born": now}

    return SessionStates(make, log=logging.getLogger("test"), **({"max_sessions": 3, "idle_s": 10.0} | kw)), made


def test_a_session_keeps_its_state():
    s, made = states()
    first = s.get("a", 0.0)
    assert s.get("a", 1.0) is first and made == [0.0] and len(s) == 1


def test_the_least_recently_seen_goes_first_beyond_the_bound():
    s, _ = states(max_sessions=2)
    s.get("a", 0.0)
    s.get("b", 1.0)
    s.get("a", 2.0)  # a is now the most recent
    s.get("c", 3.0)
    assert s.get("a", 4.0)["born"] == 0.0  # kept
    assert s.get("b", 5.0)["born"] == 5.0  # was dropped: made afresh


def test_idle_sessions_are_evicted():
    s, _ = states(idle_s=10.0)
    s.get("old", 0.0)
    s.get("new", 8.0)
    s.evict_idle(12.0)
    assert len(s) == 1 and s.get("new", 12.0)["born"] == 8.0
    s.clear()
    assert len(s) == 0
