"""The vision stage: camera frames in, the same frames plus faces and emotions out.

Per frame it converts RGB to gray, runs the Haar detector when the session's tracker
asks for it (every ``detect_every`` frames, or while no face is tracked), advances the
session's face tracks, and crops every tracked face. The emotion network then runs once
over all crops of the micro-batch, whatever session they came from, in chunks of
``emotion_batch_max`` on ``context.device``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from comms.message import Message
from stages.base import Stage, StageContext
from stages.payloads import IMAGE_RGB
from stages.registry import register_stage
from stages.vision.config import VisionConfig
from stages.vision.detector import HaarFaceDetector
from stages.vision.emotion_model import EMOTION_LABELS, MiniXception, load_emotion_model
from stages.vision.face_crops import Box, border_value, crop_face, face_quality, to_network_input
from stages.vision.tracker import FaceTracker


@dataclass(slots=True)
class _Face:
    """One tracked face of one frame, waiting for its emotion."""

    face_id: int
    box: Box
    quality: float


MIN_VISIBLE = 0.5
"""A tracked face predicted to be mostly outside the frame is not reported until a
detection finds it again (or the track expires)."""


@register_stage
class VisionStage(Stage):
    """Face detection, tracking and emotion recognition.

    Takes frames (``IMAGE_RGB``: tensors[0] RGB uint8 HWC on the CPU or a GPU; H x W
    grayscale and 4-channel frames are accepted too). Emits one message per usable
    frame (``IMAGE_RGB``), carrying the same frame tensor and the input's meta plus
    ``meta["faces"]``: a list, largest face first, of ``{"face_id", "bbox": [x, y, w, h]
    (input pixels), "emotion", "emotion_probs": {label: p}, "quality": 0..1}``, and trace
    points ``vision.start`` / ``vision.end``. A message whose tensor cannot be a frame is
    dropped with a warning and a ``Kind.EVENT`` (``meta["code"] = "vision_bad_frame"``)
    to its session.
    """

    kind = "vision"
    Config = VisionConfig
    accepts = IMAGE_RGB
    emits = IMAGE_RGB

    def __init__(self, config: VisionConfig, context: StageContext) -> None:
        super().__init__(config, context)
        self.model: MiniXception | None = None
        self.detector: HaarFaceDetector | None = None
        self.tracker = FaceTracker(
            detect_every=config.detect_every, iou_match=config.iou_match, max_misses=config.max_misses,
            box_smoothing=config.box_smoothing, max_faces=config.max_faces,
            session_idle_s=config.session_idle_s, max_sessions=config.max_sessions)

    def setup(self) -> None:
        cfg = self.config
        self.detector = HaarFaceDetector(detect_width=cfg.detect_width, scale_factor=cfg.scale_factor,
                                         min_neighbors=cfg.min_neighbors, min_face_px=cfg.min_face_px)
        self.model = load_emotion_model(cfg.weights_path, self.context.device)
        with torch.inference_mode():  # first call allocates and picks kernels; keep it off the first frame
            self.model(to_network_input([np.zeros((64, 64), np.uint8)]).to(self.context.device))
        self.log.info("vision ready: weights %s on %s, detect every %d frame(s) at width %d",
                      cfg.weights_path, self.context.device, cfg.detect_every, cfg.detect_width)

    def process(self, batch: list[Message]) -> list[Message]:
        if self.model is None:
            raise RuntimeError("VisionStage.process called before setup() (or after teardown())")
        cfg = self.config
        accepted: list[tuple[Message, torch.Tensor, list[_Face]]] = []
        crops: list[np.ndarray] = []
        for msg in batch:
            msg.stamp("vision.start")
            frame = self._frame_of(msg)
            if frame is None:
                continue
            tensor, rgb = frame
            gray = rgb[..., 0] if rgb.shape[2] == 1 else cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
            height, width = gray.shape
            detections = (self.detector.detect(gray)
                          if self.tracker.needs_detection(msg.session, (width, height)) else None)
            fill = border_value(gray)
            faces = []
            for track in self.tracker.update(msg.session, (width, height), detections):
                if track.visible_fraction(width, height) < MIN_VISIBLE:
                    continue  # predicted off the frame: its crop would be mostly fill
                box = track.int_box(width, height)
                crop = crop_face(gray, box, cfg.emotion_margin, fill)
                quality = face_quality(crop, box, full_size_px=cfg.quality_full_px,
                                       sharpness_ref=cfg.sharpness_ref)
                crops.append(crop)
                faces.append(_Face(face_id=track.face_id, box=box, quality=quality))
            accepted.append((msg, tensor, faces))

        probs = self.classify(crops)
        outputs = []
        row = 0
        for msg, tensor, faces in accepted:
            described = []
            for face in faces:
                p = probs[row]
                row += 1
                described.append({
                    "face_id": face.face_id,
                    "bbox": list(face.box),
                    "emotion": EMOTION_LABELS[int(p.argmax())],
                    "emotion_probs": {label: round(float(v), 4) for label, v in zip(EMOTION_LABELS, p)},
                    "quality": round(face.quality, 3),
                })
            out = msg.derive(tensors=[tensor], meta={**msg.meta, "faces": described})
            outputs.append(out.stamp("vision.end"))
        return outputs

    def classify(self, crops: list[np.ndarray]) -> np.ndarray:
        """Emotion probabilities ``[N, 7]`` for 64x64 uint8 crops, in forward passes of at
        most ``emotion_batch_max`` on the stage's device."""
        if not crops:
            return np.zeros((0, len(EMOTION_LABELS)), np.float32)
        step = self.config.emotion_batch_max
        parts = []
        with torch.inference_mode():
            for start in range(0, len(crops), step):
                x = to_network_input(crops[start:start + step]).to(self.context.device)
                parts.append(self.model(x).float().cpu().numpy())
        return np.concatenate(parts)

    def _frame_of(self, msg: Message) -> tuple[torch.Tensor, np.ndarray] | None:
        """(original tensor, H x W x C uint8 array) or None after reporting why not."""
        if not msg.tensors:
            return self.reject(msg, "vision_bad_frame", "frame message carries no tensor")
        tensor = msg.tensors[0]
        if tensor.dtype != torch.uint8:
            return self.reject(msg, "vision_bad_frame", f"frame dtype must be uint8, got {tensor.dtype}")
        shape = tuple(tensor.shape)
        if tensor.dim() == 2:
            shape = (*shape, 1)
        if len(shape) != 3 or shape[2] not in (1, 3, 4) or shape[0] < 1 or shape[1] < 1:
            return self.reject(msg, "vision_bad_frame",
                               f"frame must be H x W x 1/3/4 with H, W >= 1, got shape {tuple(tensor.shape)}")
        array = np.ascontiguousarray(tensor.detach().cpu().numpy().reshape(shape)[..., :3])
        return tensor, array

    def teardown(self) -> None:
        self.tracker.clear()
        self.model = None
        self.detector = None
