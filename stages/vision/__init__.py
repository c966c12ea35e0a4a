"""Vision stage: MTCNN faces and landmarks, per-session verified tracking and FER-2013 emotions."""

from stages.vision.config import VisionConfig
from stages.vision.emotion_model import EMOTION_LABELS, MiniXception, load_emotion_model
from stages.vision.stage import VisionStage

__all__ = ["EMOTION_LABELS", "MiniXception", "VisionConfig", "VisionStage", "load_emotion_model"]
