"""When a session's frame is worth a render: the similarity filter and the token bucket.

A diffusion render costs a UNet call; most webcam frames of a sitter barely differ
from the last one rendered. Two gates decide, per session, whether a frame is rendered
or the previous portrait is shown again:

* ``SimilarityFilter`` — StreamDiffusion's stochastic similarity filter. The cosine
  similarity ``s`` of the frame's crop to the last crop rendered for the session gives
  a skip probability ``max(0, 1 - (1 - s) / (1 - threshold))``: 0 at the threshold,
  rising to 1 for an identical crop. Being random rather than a hard cut, a slowly
  drifting scene still refreshes now and then instead of freezing until it crosses a
  line; after ``max_skips`` skips in a row a frame is rendered anyway. Crops are
  compared as small thumbnails mapped to -1..1 (the autoencoder's range): cheap to keep
  per session, and centred values make the cosine sensitive to what actually changed.
* ``TokenBucket`` — caps the renders one session may use per second (``rate``), with
  ``burst`` renders back to back; a frame finding the bucket empty shows the previous
  portrait. It keeps one fast-moving session from taking the GPU from the others. It
  runs on the stage's clock, not on capture timestamps a client could fake.

The stage always renders when a session's prompt changed (a new emotion must show).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SIGNATURE_SIDE = 32
"""Side of the thumbnail a crop is compared by."""


def skip_probability(similarity: float, threshold: float) -> float:
    """Probability of skipping a frame whose crop has cosine ``similarity`` to the last
    rendered one; 0 with the filter off (``threshold`` 0) or at or below the threshold."""
    if threshold <= 0.0:
        return 0.0
    if threshold >= 1.0:
        return 1.0 if similarity >= 1.0 else 0.0
    return min(1.0, max(0.0, 1.0 - (1.0 - similarity) / (1.0 - threshold)))


class SimilarityFilter:
    """Decides similarity skips; per-session state (signature, skips in a row) is the caller's."""

    def __init__(self, threshold: float, max_skips: int, rng: random.Random) -> None:
        self.threshold = threshold
        self.max_skips = max_skips
        self.rng = rng

    @staticmethod
    def signatures(crops: torch.Tensor) -> torch.Tensor:
        """[B, N] comparable signatures of [B, 3, S, S] crops in 0..1 (on their device)."""
        thumbnails = F.adaptive_avg_pool2d(crops.float(), SIGNATURE_SIDE) if crops.shape[-1] > SIGNATURE_SIDE \
            else crops.float()
        return thumbnails.mul(2.0).sub_(1.0).flatten(1)

    @staticmethod
    def similarities(current: torch.Tensor, previous: list[torch.Tensor | None]) -> list[float | None]:
        """Cosine similarity of each row of ``current`` to its previous signature (None
        where there is none, or it has another size), with one device sync for the batch."""
        comparable = [i for i, p in enumerate(previous) if p is not None and p.shape == current[i].shape]
        found: list[float | None] = [None] * len(previous)
        if comparable:
            before = torch.stack([previous[i] for i in comparable])
            values = F.cosine_similarity(current[comparable], before, dim=1).tolist()
            for i, value in zip(comparable, values):
                found[i] = value
        return found

    def skip(self, similarity: float | None, skipped_in_row: int) -> bool:
        """Whether to show the previous portrait instead of rendering this frame."""
        if similarity is None or skipped_in_row >= self.max_skips:
            return False
        probability = skip_probability(similarity, self.threshold)
        # An identical crop (probability 1) is always skipped, without drawing a number.
        return probability >= 1.0 or self.rng.random() < probability


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``rate`` 0 means no cap. Starts full."""

    rate: float
    burst: int
    tokens: float
    clock: float

    @classmethod
    def full(cls, rate: float, burst: int, now: float) -> TokenBucket:
        return cls(rate=rate, burst=burst, tokens=float(burst), clock=now)

    def take(self, now: float) -> bool:
        """Spend one token at time ``now`` (seconds, monotonic) if there is one."""
        if self.rate <= 0.0:
            return True
        self.tokens = min(float(self.burst), self.tokens + max(0.0, now - self.clock) * self.rate)
        self.clock = max(self.clock, now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
