"""The present stage: the lip-sync pipeline's last step on the server rank.

The composited JPEG is ready for the page already; this stage only writes what the
page shows beside it into ``meta["vision"]`` (the avatar, which generator made the mouth,
whether the frame is speech), so the server forwards bytes and JSON and knows nothing of
lip-sync.
"""

from __future__ import annotations

from comms.message import Message
from stages.base import SAME, Stage
from stages.lipsync.config import PresentConfig
from stages.registry import register_stage
from stages.server.hooks import OUTPUT_JPEG

PAGE_FIELDS = ("avatar", "generator", "speech", "probability", "loudness_db", "avatar_frame")


@register_stage
class PresentStage(Stage):
    """Takes the composited frames (``OUTPUT_JPEG``); emits them unchanged with
    ``meta["vision"] = {"frame_id", "faces": [], "lipsync": {...}}`` for the page."""

    kind = "present"
    Config = PresentConfig
    accepts = OUTPUT_JPEG
    emits = SAME

    def process(self, batch: list[Message]) -> list[Message]:
        for msg in batch:
            lipsync = msg.meta.get("lipsync") or {}
            msg.meta["vision"] = {"frame_id": msg.frame_id, "faces": [],
                                  "lipsync": {key: lipsync.get(key) for key in PAGE_FIELDS}}
            msg.stamp("present")
        return batch
