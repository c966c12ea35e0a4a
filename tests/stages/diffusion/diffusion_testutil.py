"""Helpers shared by the diffusion tests (a unique module name, not conftest, so it cannot
clash with other test folders' helpers on sys.path): tiny diffusers model directories,
stage contexts, crops.

The tiny models are built by ``runtime.bench.diffusion_models`` (shared with the
benchmark's section 'diffusion'): diffusers' own tiny test architectures with random
weights, saved the way a downloaded model is laid out, so the code under test loads them
through the same ``from_pretrained(..., local_files_only=True)`` path users take. The
tests want the real CLIP tokenizer, from the BPE vocabulary open-clip-torch ships.
Nothing is downloaded.

``conftest`` builds each directory once per test session; tests that need diffusers
skip cleanly when diffusers, transformers or open-clip-torch are not installed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from comms.message import Message
from core.settings import RuntimeSettings, RuntimeView
from runtime.bench.diffusion_models import build_tiny_autoencoder, build_tiny_model, clip_bpe_file
from stages.base import StageContext

__all__ = ["build_tiny_autoencoder", "build_tiny_model", "clip_bpe_path", "make_context", "random_crops",
           "require_diffusers"]


def require_diffusers() -> None:
    """Skip the calling test unless diffusers and transformers are importable."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")


def clip_bpe_path() -> Path:
    """The CLIP BPE file inside open-clip-torch; skips the calling test without it (the
    tests tokenize with the real CLIP tokenizer)."""
    path = clip_bpe_file()
    if path is None:
        pytest.skip("open-clip-torch is not installed (it ships the CLIP tokenizer vocabulary)")
    return path


def make_context(events: list[Message] | None = None, settings: RuntimeSettings | None = None) -> StageContext:
    """A CPU stage context whose published events land in ``events``."""
    view = RuntimeView(revision=1, settings=settings or RuntimeSettings())
    return StageContext(rank=2, role="diffusion", replica=0, device=torch.device("cpu"),
                        logger=logging.getLogger("test.diffusion"), runtime=lambda: view,
                        publish_event=(events.append if events is not None else lambda msg: None))


def random_crops(batch: int, side: int = 32, seed: int = 0) -> torch.Tensor:
    """[batch, 3, side, side] float crops in 0..1, reproducible."""
    return torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))
