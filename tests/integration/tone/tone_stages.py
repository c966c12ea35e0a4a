"""A third pipeline's stages, defined outside the project's packages: a tone source, a
gain stage and a sink that checks every chunk it gets and writes what it saw to a file.

Nothing in comms/ or runtime/ knows these kinds: ``tone.yaml`` names this file in
``pipeline.plugins`` and each class registers its kind here.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import torch

from comms.message import Message
from core.config import check, check_range
from stages.base import Payload, Stage
from stages.registry import register_stage

AUDIO = Payload("audio.f32", (torch.float32,))
"""tensors[0]: one chunk of mono float32 samples; meta ``first_sample``: its offset in the stream."""


@dataclass(kw_only=True, slots=True)
class ToneConfig:
    frequency_hz: float = 440.0
    sample_rate: int = 16000
    chunk_ms: float = 20.0
    chunks: int = 50
    """How many chunks the source makes; then it makes nothing more."""

    def __post_init__(self) -> None:
        check_range(self.frequency_hz, "frequency_hz", 1.0, 20000.0)
        check_range(self.sample_rate, "sample_rate", 1000, 192000)
        check_range(self.chunk_ms, "chunk_ms", 1.0, 1000.0)
        check(self.chunks >= 1, "chunks", f"must be >= 1, got {self.chunks}")

    @property
    def samples_per_chunk(self) -> int:
        return round(self.sample_rate * self.chunk_ms / 1000.0)


def tone(config: ToneConfig, first_sample: int, count: int) -> torch.Tensor:
    t = (torch.arange(count, dtype=torch.float64) + first_sample) / config.sample_rate
    return torch.sin(2 * math.pi * config.frequency_hz * t).to(torch.float32)


@register_stage
class ToneSource(Stage):
    """A source: ``chunks`` chunks of a sine tone, one every ``chunk_ms`` (real time)."""

    kind = "tone"
    Config = ToneConfig
    accepts = None
    emits = AUDIO

    def setup(self) -> None:
        self.sent = 0
        self.started = time.monotonic()

    def process(self, batch: list[Message]) -> list[Message]:
        cfg = self.config
        if self.sent >= cfg.chunks:
            time.sleep(0.05)
            return []
        due = self.started + self.sent * cfg.chunk_ms / 1000.0
        time.sleep(max(0.0, due - time.monotonic()))
        n = cfg.samples_per_chunk
        msg = Message(session="tone", frame_id=self.sent, capture_ts=self.sent * cfg.chunk_ms,
                      meta={"first_sample": self.sent * n}, tensors=[tone(cfg, self.sent * n, n)])
        self.sent += 1
        return [msg.stamp("tone")]


@dataclass(kw_only=True, slots=True)
class GainConfig:
    gain: float = 1.0
    broken: bool = False
    """Fail in the constructor, as a stage with a bug would (for the unexpected-error test)."""
    delay_ms: float = 0.0
    """Sleep this long per batch, as a stage too slow for its input would (fallback tests)."""
    unavailable: str | None = None
    """Say this as the reason the stage cannot serve (fallback tests)."""

    def __post_init__(self) -> None:
        check_range(self.gain, "gain", 0.0, 100.0)


@register_stage
class Gain(Stage):
    """Scales every chunk by ``gain``."""

    kind = "gain"
    Config = GainConfig
    accepts = AUDIO
    emits = AUDIO

    def __init__(self, config: GainConfig, context) -> None:
        super().__init__(config, context)
        if config.broken:
            self.table = {}["missing"]

    def process(self, batch: list[Message]) -> list[Message]:
        time.sleep(self.config.delay_ms / 1000.0)
        return [m.derive(tensors=[m.tensors[0] * self.config.gain], meta={**m.meta, "gain_by": self.context.role})
                .stamp("gain") for m in batch]

    def unavailable(self) -> str | None:
        return self.config.unavailable


@dataclass(kw_only=True, slots=True)
class ToneSinkConfig:
    path: str = "tone-sink.jsonl"
    """Where the sink writes one JSON line per chunk."""
    expect_gain: float = 1.0
    """The gain the chunks should arrive with; each line records the worst deviation."""
    tone: ToneConfig = field(default_factory=ToneConfig)
    """The tone the source makes (the sink recomputes it to compare)."""

    def __post_init__(self) -> None:
        check(bool(self.path), "path", "must not be empty")


@register_stage
class ToneSink(Stage):
    """A sink: checks each chunk against the tone it should be and records what it saw."""

    kind = "tone_sink"
    Config = ToneSinkConfig
    accepts = AUDIO
    emits = None

    def setup(self) -> None:
        self.file = open(self.config.path, "a", encoding="utf-8")

    def process(self, batch: list[Message]) -> list[Message]:
        for msg in batch:
            chunk = msg.tensors[0]
            expected = self.config.expect_gain * tone(self.config.tone, msg.meta["first_sample"], chunk.numel())
            self.file.write(json.dumps({
                "frame_id": msg.frame_id, "rank": self.context.rank, "samples": chunk.numel(),
                "dtype": str(chunk.dtype), "max_error": float((chunk - expected).abs().max()),
                "stages": [name for name, _ in msg.trace], "gain_by": msg.meta.get("gain_by")}) + "\n")
            self.file.flush()
        return []

    def teardown(self) -> None:
        file = getattr(self, "file", None)
        if file is not None:
            file.close()
