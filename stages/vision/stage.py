"""The vision stage: camera frames in, the same frames plus faces, landmarks and emotions out.

Per micro-batch it asks each session's tracker what the frame needs (``FaceTracker.begin``:
a scene-cut check, then a full MTCNN detection or a verification of the tracked faces),
runs all full detections of the batch in one ``MTCNN.detect`` call and all verifications
in one ``MTCNN.verify`` call, hands the results back to the trackers, crops every
confirmed face and runs the emotion network once over all crops of the batch, in chunks
of ``emotion_batch_max`` on ``context.device``. The emotion a face reports is smoothed
over its track's recent frames.

Two frames of one session in the same micro-batch depend on each other (the second is
tracked from the first), so a batch is processed in waves, each holding at most one
frame per session; with one frame per session, the usual case, that is one wave.
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
from stages.vision.emotion_model import EMOTION_LABELS, MiniXception, load_emotion_model
from stages.vision.face_crops import Box, border_value, crop_face, face_quality, to_network_input
from stages.vision.mtcnn import MTCNN
from stages.vision.scene_cut import thumbnail
from stages.vision.tracker import FaceTracker, Track


@dataclass(slots=True)
class _Frame:
    """One usable frame of the batch and, once tracked, its confirmed faces."""

    msg: Message
    tensor: torch.Tensor
    rgb: np.ndarray
    gray: np.ndarray
    faces: list["_Face"]


@dataclass(slots=True)
class _Face:
    """One confirmed face of one frame, as it was in that frame, waiting for its emotion."""

    track: Track
    box: Box
    landmarks: tuple[tuple[float, float], ...]
    score: float
    quality: float


@register_stage
class VisionStage(Stage):
    """Face detection with landmarks, tracking and emotion recognition.

    Takes frames (``IMAGE_RGB``: tensors[0] RGB uint8 HWC on the CPU or a GPU; H x W
    grayscale and 4-channel frames are accepted too). Emits one message per usable
    frame (``IMAGE_RGB``), carrying the same frame tensor and the input's meta plus
    ``meta["faces"]``: a list, largest face first, of the faces confirmed in this frame:
    ``{"face_id", "bbox": [x, y, w, h], "landmarks": [[x, y] x 5] (eyes, nose, mouth
    corners; input pixels), "score": detector confidence, "emotion", "emotion_probs":
    {label: p} (smoothed per face), "quality": 0..1}``, and trace points ``vision.start``
    / ``vision.end``. A message whose tensor cannot be a frame is dropped with a warning
    and a ``Kind.EVENT`` (``meta["code"] = "vision_bad_frame"``) to its session.
    """

    kind = "vision"
    Config = VisionConfig
    accepts = IMAGE_RGB
    emits = IMAGE_RGB

    def __init__(self, config: VisionConfig, context: StageContext) -> None:
        super().__init__(config, context)
        self.model: MiniXception | None = None
        self.detector: MTCNN | None = None
        self.tracker = FaceTracker(
            detect_every=config.detect_every, iou_match=config.iou_match, max_misses=config.max_misses,
            box_smoothing=config.box_smoothing, emotion_smoothing=config.emotion_smoothing,
            cut_threshold=config.cut_threshold, max_faces=config.max_faces,
            session_idle_s=config.session_idle_s, max_sessions=config.max_sessions)

    def setup(self) -> None:
        cfg = self.config
        self.detector = MTCNN(cfg.detector_path, self.context.device, min_face_px=cfg.min_face_px,
                              thresholds=(0.6, 0.7, cfg.face_threshold))
        self.model = load_emotion_model(cfg.weights_path, self.context.device)
        with torch.inference_mode():  # first calls allocate and pick kernels; keep them off the first frame
            self.model(to_network_input([np.zeros((64, 64), np.uint8)]).to(self.context.device))
        self.detector.detect([np.zeros((120, 160, 3), np.uint8)])
        self.log.info("vision ready: MTCNN + emotion %s on %s, full detection every %d frame(s), faces >= %d px",
                      cfg.weights_path.name, self.context.device, cfg.detect_every, cfg.min_face_px)

    def process(self, batch: list[Message]) -> list[Message]:
        if self.model is None or self.detector is None:
            raise RuntimeError("VisionStage.process called before setup() (or after teardown())")
        frames = []
        for msg in batch:
            msg.stamp("vision.start")
            usable = self._frame_of(msg)
            if usable is not None:
                frames.append(usable)
        for wave in _waves(frames):
            self._track(wave)

        faces = [face for f in frames for face in f.faces]
        fill = {id(f): border_value(f.gray) for f in frames}
        crops = [crop_face(f.gray, face.box, self.config.emotion_margin, fill[id(f)])
                 for f in frames for face in f.faces]
        for face, crop in zip(faces, crops):
            face.quality = face_quality(crop, face.box, full_size_px=self.config.quality_full_px,
                                        sharpness_ref=self.config.sharpness_ref)
        probs = self.classify(crops)
        outputs = []
        row = 0
        for f in frames:
            described = []
            for face in f.faces:
                # In batch order, so two frames of one session smooth in capture order.
                smoothed = face.track.observe_emotion(probs[row], self.config.emotion_smoothing)
                row += 1
                described.append({
                    "face_id": face.track.face_id,
                    "bbox": list(face.box),
                    "landmarks": [[round(x, 1), round(y, 1)] for x, y in face.landmarks],
                    "score": round(face.score, 4),
                    "emotion": EMOTION_LABELS[int(smoothed.argmax())],
                    "emotion_probs": {label: round(float(v), 4) for label, v in zip(EMOTION_LABELS, smoothed)},
                    "quality": round(face.quality, 3),
                })
            out = f.msg.derive(tensors=[f.tensor], meta={**f.msg.meta, "faces": described})
            outputs.append(out.stamp("vision.end"))
        return outputs

    def _track(self, wave: list[_Frame]) -> None:
        """Detect or verify the faces of frames from distinct sessions, batched."""
        steps = []
        for f in wave:
            height, width = f.gray.shape
            steps.append(self.tracker.begin(f.msg.session, (width, height), thumbnail(f.gray)))
        to_detect = [f for f, step in zip(wave, steps) if step.detect]
        to_verify = [(f, step) for f, step in zip(wave, steps) if not step.detect]
        detected = self.detector.detect([f.rgb for f in to_detect]) if to_detect else []
        verified = (self.detector.verify([f.rgb for f, _ in to_verify], [step.boxes for _, step in to_verify])
                    if to_verify else [])
        results = [(f, found, True) for f, found in zip(to_detect, detected)]
        results += [(f, found, False) for (f, _), found in zip(to_verify, verified)]
        for f, found, full in results:
            height, width = f.gray.shape
            tracks = self.tracker.finish(f.msg.session, found, detected=full)
            f.faces = [_Face(track=t, box=t.int_box(width, height), landmarks=t.landmarks, score=t.score,
                             quality=0.0) for t in tracks]

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

    def _frame_of(self, msg: Message) -> _Frame | None:
        """The frame as RGB and gray uint8 arrays, or None after reporting why not."""
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
        array = tensor.detach().cpu().numpy().reshape(shape)
        if shape[2] == 1:
            gray = np.ascontiguousarray(array[..., 0])
            rgb = np.repeat(array, 3, axis=2)
        else:
            rgb = np.ascontiguousarray(array[..., :3])
            gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        return _Frame(msg=msg, tensor=tensor, rgb=rgb, gray=gray, faces=[])

    def teardown(self) -> None:
        self.tracker.clear()
        self.model = None
        self.detector = None


def _waves(frames: list[_Frame]) -> list[list[_Frame]]:
    """Split a batch into waves holding at most one frame per session, in order."""
    waves: list[list[_Frame]] = []
    seen: dict[str, int] = {}
    for f in frames:
        index = seen.get(f.msg.session, 0)
        seen[f.msg.session] = index + 1
        if index == len(waves):
            waves.append([])
        waves[index].append(f)
    return waves
