"""Vision and generator on a CUDA device: same outputs as on the CPU. Skipped without CUDA."""

import logging
from pathlib import Path

import cv2
import pytest
import torch

from comms.message import Kind, Message
from core.settings import RuntimeSettings, RuntimeView
from stages.base import StageContext
from stages.generator.stage import GeneratorConfig, GeneratorStage
from stages.vision.config import VisionConfig
from stages.vision.stage import VisionStage

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "astronaut_640x480.jpg"


def context(device: str) -> StageContext:
    return StageContext(rank=1, role="test", replica=0, device=torch.device(device),
                        logger=logging.getLogger("test.cuda"),
                        runtime=lambda: RuntimeView(revision=1, settings=RuntimeSettings()))


def frame_message() -> Message:
    rgb = cv2.cvtColor(cv2.imread(str(FIXTURE)), cv2.COLOR_BGR2RGB)
    return Message(kind=Kind.DATA, session="s", frame_id=1, tensors=[torch.from_numpy(rgb)])


def test_vision_and_generator_on_cuda_match_cpu():
    results = {}
    for device in ("cpu", "cuda:0"):
        vision = VisionStage(VisionConfig(), context(device))
        generator = GeneratorStage(GeneratorConfig(), context(device))
        vision.setup()
        generator.setup()
        (analyzed,) = vision.process([frame_message()])
        (portrait,) = generator.process([analyzed])
        results[device] = (analyzed.meta["faces"], portrait.tensors[0].cpu())
    cpu_faces, cpu_img = results["cpu"]
    gpu_faces, gpu_img = results["cuda:0"]
    assert [f["emotion"] for f in gpu_faces] == [f["emotion"] for f in cpu_faces]
    for a, b in zip(cpu_faces, gpu_faces):
        assert all(abs(a["emotion_probs"][k] - b["emotion_probs"][k]) < 1e-3 for k in a["emotion_probs"])
    assert gpu_img.shape == cpu_img.shape
    assert (gpu_img.float() - cpu_img.float()).abs().mean() < 2.0  # float rounding only
