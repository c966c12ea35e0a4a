"""``AudioRateLimit`` with a hand-driven clock: chunks per second, audio ahead of real time."""

from __future__ import annotations

import pytest

from stages.server.audio_rate import AudioRateLimit
from stages.server.protocol import ErrorCode, ProtocolError

CHUNK = 320  # 20 ms at 16 kHz, what the page sends


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limit(clock: Clock, **kwargs) -> AudioRateLimit:
    return AudioRateLimit(clock=clock, **kwargs)


def refused(rate: AudioRateLimit, samples: int) -> str:
    with pytest.raises(ProtocolError) as info:
        rate.admit(samples)
    assert info.value.code == ErrorCode.AUDIO_RATE
    return info.value.message


def test_real_time_pace_is_never_refused():
    clock = Clock()
    rate = limit(clock)
    for _ in range(50 * 60):  # a minute of 20 ms chunks, each on time
        rate.admit(CHUNK)
        clock.now += 0.020
    assert (rate.admitted_chunks, rate.refused_chunks) == (3000, 0)
    assert rate.admitted_samples == 3000 * CHUNK
    assert rate.ahead_s() == pytest.approx(0.0, abs=1e-9)


def test_burst_of_two_seconds_then_refused_until_time_passes():
    clock = Clock()
    rate = limit(clock, max_chunks_per_s=1000, burst_s=2.0)
    for _ in range(100):  # 2.0 s of audio at one instant: exactly the burst
        rate.admit(CHUNK)
    assert rate.ahead_s() == pytest.approx(2.0)
    message = refused(rate, CHUNK)
    assert "faster than real time" in message and "2.02 s ahead" in message and "limit is 2 s" in message
    clock.now += 0.019  # not yet 20 ms of refill
    refused(rate, CHUNK)
    clock.now += 0.001
    rate.admit(CHUNK)   # now exactly one chunk has been earned
    refused(rate, 2)   # (one sample of slack absorbs float rounding of the clock)
    assert rate.refused_chunks == 3 and rate.admitted_chunks == 101


def test_file_streamed_at_twice_real_time_is_refused_after_the_burst():
    clock = Clock()
    rate = limit(clock)
    admitted = 0
    for _ in range(500):  # 10 s of audio sent over 5 s
        try:
            rate.admit(CHUNK)
            admitted += 1
        except ProtocolError:
            pass
        clock.now += 0.010
    # Over 5 s a session may send 5 s of audio plus the 2 s burst, and no more.
    assert admitted * CHUNK / 16000 == pytest.approx(7.0, abs=0.03)


def test_idle_time_does_not_bank_more_than_the_burst():
    clock = Clock()
    rate = limit(clock, max_chunks_per_s=1000)
    rate.admit(CHUNK)
    clock.now += 60.0  # a minute of silence
    for _ in range(100):
        rate.admit(CHUNK)
    refused(rate, CHUNK)


def test_chunk_count_per_second():
    clock = Clock()
    rate = limit(clock, max_chunks_per_s=10, burst_s=60.0)
    for _ in range(10):
        rate.admit(2)
        clock.now += 0.01
    assert "more than 10 audio chunks in one second" in refused(rate, 2)
    clock.now = 1000.0 + 0.999
    refused(rate, 2)  # the first chunk is still inside the window
    clock.now = 1000.0 + 1.0
    rate.admit(2)     # ... and now it has left it
    refused(rate, 2)


def test_refused_chunks_cost_nothing():
    clock = Clock()
    rate = limit(clock, max_chunks_per_s=1000, burst_s=1.0)
    for _ in range(50):
        rate.admit(CHUNK)
    for _ in range(20):
        refused(rate, CHUNK)
    clock.now += 0.1  # 100 ms earns 5 chunks, whatever was refused before
    for _ in range(5):
        rate.admit(CHUNK)
    refused(rate, CHUNK)


def test_bucket_starts_full_at_the_first_chunk_not_at_construction():
    clock = Clock()
    rate = limit(clock, max_chunks_per_s=1000, burst_s=1.0)
    clock.now += 100.0  # the session idled before its first chunk
    rate.admit(16000)
    refused(rate, CHUNK)


@pytest.mark.parametrize("kwargs", [{"max_chunks_per_s": 0}, {"burst_s": 0.0}, {"burst_s": -1.0}])
def test_bad_settings(kwargs):
    with pytest.raises(ValueError):
        AudioRateLimit(**kwargs)
