"""The render gates: StreamDiffusion's similarity filter and the per-session token bucket."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from diffusion_testutil import random_crops

from stages.diffusion.gating import SimilarityFilter, TokenBucket, skip_probability


def test_skip_probability_rises_from_the_threshold_to_certainty():
    assert skip_probability(0.90, 0.98) == 0.0
    assert skip_probability(0.98, 0.98) == 0.0
    assert skip_probability(0.99, 0.98) == pytest.approx(0.5)
    assert skip_probability(1.0, 0.98) == 1.0
    assert skip_probability(1.0, 0.0) == 0.0  # threshold 0: the filter is off


def test_identical_crops_are_skipped_and_changed_ones_are_not():
    gate = SimilarityFilter(threshold=0.98, max_skips=10, rng=random.Random(0))
    crops = random_crops(2, side=64)
    before = gate.signatures(crops)
    after = gate.signatures(torch.stack([crops[0], crops[1].flip(-1)]))
    same, changed = gate.similarities(after, [before[0], before[1]])
    assert same == pytest.approx(1.0) and changed < 0.9
    assert gate.skip(same, skipped_in_row=0)
    assert not gate.skip(changed, skipped_in_row=0)
    assert not gate.skip(None, skipped_in_row=0)  # nothing rendered yet


def test_signatures_are_small_and_centred():
    signatures = SimilarityFilter.signatures(torch.ones(3, 3, 512, 512))
    assert signatures.shape == (3, 3 * 32 * 32) and torch.all(signatures == 1.0)
    assert SimilarityFilter.similarities(signatures, [None, torch.zeros(5), signatures[2]]) == [None, None,
                                                                                              pytest.approx(1.0)]


def test_a_long_run_of_skips_is_broken():
    gate = SimilarityFilter(threshold=0.98, max_skips=3, rng=random.Random(0))
    skips = 0
    decisions = []
    for _ in range(8):
        skip = gate.skip(1.0, skips)
        skips = skips + 1 if skip else 0
        decisions.append(skip)
    assert decisions == [True, True, True, False, True, True, True, False]


def test_near_threshold_similarity_is_skipped_about_as_often_as_its_probability():
    gate = SimilarityFilter(threshold=0.98, max_skips=1000, rng=random.Random(1))
    skipped = sum(gate.skip(0.995, 0) for _ in range(2000))
    assert 0.70 < skipped / 2000 < 0.80  # probability 0.75


def test_token_bucket_caps_renders_over_a_simulated_clock():
    bucket = TokenBucket.full(rate=5.0, burst=2, now=100.0)
    frames = [100.0 + i / 30.0 for i in range(300)]  # 10 s at 30 FPS
    granted = [t for t in frames if bucket.take(t)]
    assert len(granted) in (51, 52)  # the burst of 2, then 5 per second
    assert granted[:2] == frames[:2]
    gaps = [b - a for a, b in itertools.pairwise(granted[2:])]
    frame = 1 / 30 + 1e-9  # a grant waits for the first frame after its token
    assert 0.2 - frame <= min(gaps) and max(gaps) <= 0.2 + frame


def test_token_bucket_refills_after_a_pause_and_ignores_time_going_back():
    bucket = TokenBucket.full(rate=1.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(-50.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # refilled to the burst, no more


def test_rate_zero_means_no_cap():
    bucket = TokenBucket.full(rate=0.0, burst=1, now=0.0)
    assert all(bucket.take(0.0) for _ in range(100))
