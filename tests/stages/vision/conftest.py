"""Fixtures for the vision stage tests: the astronaut frame and a stage context."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import torch

from core.settings import RuntimeSettings, RuntimeView
from stages.base import StageContext
from vision_testutil import FIXTURES


@pytest.fixture(scope="session")
def astronaut_rgb() -> np.ndarray:
    bgr = cv2.imread(str(FIXTURES / "astronaut_640x480.jpg"), cv2.IMREAD_COLOR)
    assert bgr is not None and bgr.shape == (480, 640, 3)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@pytest.fixture
def context() -> StageContext:
    return StageContext(rank=1, role="vision", replica=0, device=torch.device("cpu"),
                        logger=logging.getLogger("test.vision"),
                        runtime=lambda: RuntimeView(revision=1, settings=RuntimeSettings()))
