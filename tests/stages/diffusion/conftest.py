"""Fixtures for the diffusion tests: tiny model directories, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusion_testutil import build_tiny_autoencoder, build_tiny_model, clip_bpe_path, require_diffusers


def _model_dir(tmp_path_factory, family: str) -> Path:
    require_diffusers()
    clip_bpe_path()
    return build_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), family)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """An SD-Turbo-shaped model: one text encoder, AutoencoderKL, Euler with trailing spacing."""
    return _model_dir(tmp_path_factory, "sd-turbo")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """An SDXL-Turbo-shaped model: two text encoders and added time conditioning."""
    return _model_dir(tmp_path_factory, "sdxl-turbo")


@pytest.fixture(scope="session")
def tiny_lcm_dir(tmp_path_factory) -> Path:
    """An LCM-shaped model: LCM scheduler and a guidance-embedding UNet."""
    return _model_dir(tmp_path_factory, "lcm")


@pytest.fixture(scope="session")
def tiny_autoencoder_dir(tmp_path_factory) -> Path:
    """A tiny AutoencoderTiny (TAESD) directory."""
    require_diffusers()
    return build_tiny_autoencoder(tmp_path_factory.mktemp("tiny-taesd"))
