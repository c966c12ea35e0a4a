"""How far the vision stage's faces can be trusted: the detection-quality targets.

Run by section 'models' on the CPU. Each fixture is streamed through a real
``VisionStage`` as one session, frame after frame, the way a webcam feeds it: the photo
drifting a few pixels (a slow sine, up to 6 px) under sensor noise (Gaussian, sigma 3
levels), so detection, verification, tracking and the scene-cut check all run as they
do live. A face counts as found when its box overlaps a known face (IoU >= 0.3, the
known boxes moved with the drift); any other box is a false positive.

- astronaut fixture: exactly one face in every frame, no false positive (the shuttle
  model beside her is the classic one);
- six-person group photo: >= 5 of 6 found in every frame, no false positive;
- a cut from the astronaut to the group photo: how many frames a box of the old scene
  (the astronaut's box or face id) survives; the goal is at most 1;
- landmarks on the astronaut (first detection, no drift or noise) against the hand-placed
  reference in ``tests/fixtures/astronaut_landmarks.json``, in % of its inter-ocular distance.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from comms.message import Kind, Message
from runtime.bench.results import Target
from runtime.bench.stage_harness import ASTRONAUT, GROUP, stage_context
from stages.vision import VisionConfig, VisionStage
from stages.vision.tracker import iou

FIXTURES = ASTRONAUT.parent
ASTRONAUT_FACE = (221.0, 83.0, 119.0, 119.0)
"""Where the astronaut's face is (tests/fixtures/README.md)."""
MATCH_IOU = 0.3
LANDMARK_GOAL = 0.05
"""Landmark error allowed, as a fraction of the inter-ocular distance."""


@dataclass(frozen=True, slots=True)
class StreamResult:
    found: list[int]
    """Known faces found, per frame."""
    false_positives: int
    face_ids: set[int]


def webcam_frames(rgb: np.ndarray, count: int, seed: int = 0) -> Iterator[tuple[np.ndarray, tuple[float, float]]]:
    """``count`` frames of a still photo as a webcam gives it, each with its drift (dx, dy)."""
    rng = np.random.default_rng(seed)
    height, width = rgb.shape[:2]
    for i in range(count):
        dx, dy = 6.0 * math.sin(i / 9.0), 4.0 * math.cos(i / 13.0)
        moved = cv2.warpAffine(rgb, np.float32([[1, 0, dx], [0, 1, dy]]), (width, height),
                               borderMode=cv2.BORDER_REPLICATE)
        yield np.clip(moved + rng.normal(0.0, 3.0, moved.shape), 0, 255).astype(np.uint8), (dx, dy)


def stream(stage: VisionStage, rgb: np.ndarray, known: list, count: int, first_id: int = 0) -> StreamResult:
    """Feed ``count`` webcam frames of ``rgb`` (faces at ``known`` boxes) as session 'bench'."""
    found, false_positives, ids = [], 0, set()
    for i, (frame, (dx, dy)) in enumerate(webcam_frames(rgb, count)):
        msg = Message(kind=Kind.DATA, session="bench", frame_id=first_id + i, tensors=[torch.from_numpy(frame)])
        faces = stage.process([msg])[0].meta["faces"]
        moved = [(x + dx, y + dy, w, h) for x, y, w, h in known]
        overlaps = [max(iou(face["bbox"], box) for box in moved) for face in faces]
        found.append(sum(o >= MATCH_IOU for o in overlaps))
        false_positives += sum(o < MATCH_IOU for o in overlaps)
        ids |= {face["face_id"] for face in faces}
    return StreamResult(found=found, false_positives=false_positives, face_ids=ids)


def quality_targets(frames: int) -> tuple[list[Target], dict]:
    """The four detection-quality targets, measured on ``frames`` frames per fixture."""
    astronaut = cv2.cvtColor(cv2.imread(str(ASTRONAUT)), cv2.COLOR_BGR2RGB)
    context = stage_context(torch.device("cpu"), "vision")
    details: dict = {"frames": frames}
    targets = []

    stage = VisionStage(VisionConfig(), context)
    stage.setup()
    alone = stream(stage, astronaut, [ASTRONAUT_FACE], frames)
    details["astronaut"] = {"found_min": min(alone.found), "false_positives": alone.false_positives,
                            "face_ids": len(alone.face_ids)}
    targets.append(Target(
        name=f"astronaut fixture, {frames} webcam-like frames", goal="exactly one face per frame, no false positive",
        measured=(f"faces found per frame {min(alone.found)}..{max(alone.found)}, {alone.false_positives} false "
                  f"positive(s), {len(alone.face_ids)} face id(s)"),
        met=min(alone.found) == max(alone.found) == 1 and alone.false_positives == 0))

    if GROUP.exists():
        group_rgb = cv2.cvtColor(cv2.imread(str(GROUP)), cv2.COLOR_BGR2RGB)
        group_known = [tuple(f["box"]) for f in json.loads((FIXTURES / "group6_faces.json").read_text())["faces"]]
        fresh = VisionStage(VisionConfig(), context)
        fresh.setup()
        group = stream(fresh, group_rgb, group_known, frames)
        details["group"] = {"found_min": min(group.found), "false_positives": group.false_positives}
        targets.append(Target(
            name=f"six-person group photo, {frames} webcam-like frames", goal=">= 5 of 6 found, no false positive",
            measured=(f"found per frame {min(group.found)}..{max(group.found)} of {len(group_known)}, "
                      f"{group.false_positives} false positive(s)"),
            met=min(group.found) >= 5 and group.false_positives == 0))

        # The cut: the astronaut stage (warm, tracking her) now sees the group photo.
        survived = 0
        for i, (frame, _) in enumerate(webcam_frames(group_rgb, 10)):
            msg = Message(kind=Kind.DATA, session="bench", frame_id=frames + i, tensors=[torch.from_numpy(frame)])
            faces = stage.process([msg])[0].meta["faces"]
            stale = [f for f in faces if f["face_id"] in alone.face_ids or iou(f["bbox"], ASTRONAUT_FACE) > 0.5]
            if not stale:
                break
            survived += 1
        details["cut_frames_survived"] = survived
        targets.append(Target(name="scene cut: astronaut -> group photo", goal="no old box survives > 1 frame",
                              measured=f"old boxes survived {survived} frame(s) of the new scene", met=survived <= 1))

    reference = json.loads((FIXTURES / "astronaut_landmarks.json").read_text())
    fresh = VisionStage(VisionConfig(), context)
    fresh.setup()
    (face,) = fresh.process([Message(kind=Kind.DATA, session="ref", tensors=[torch.from_numpy(astronaut)])])[0] \
        .meta["faces"]
    points = np.array(reference["points"])
    ocular = float(np.linalg.norm(points[1] - points[0]))
    errors = np.linalg.norm(np.array(face["landmarks"]) - points, axis=1) / ocular
    details["landmark_error_pct"] = dict(zip(reference["order"], (round(100 * e, 1) for e in errors)))
    targets.append(Target(
        name="astronaut landmarks vs hand-placed reference", goal=f"each within {LANDMARK_GOAL:.0%} of the "
        "inter-ocular distance",
        measured=", ".join(f"{name.replace('_', ' ')} {100 * e:.1f}%" for name, e in zip(reference["order"], errors)),
        met=bool((errors <= LANDMARK_GOAL).all())))
    return targets, details
