"""The lip-sync pipeline: the page's audio in, a talking avatar out.

    speech (server rank)   audio chunks -> mel, VAD, loudness -> one message per video frame
    lipsync (GPU ranks)    audio features -> the avatar's mouth (U-Net, or the non-neural
                           mouth for an avatar without a model); many avatars per replica
                           in a byte-bounded registry, reached by affinity routing
    composite (CPU ranks)  the mouth pasted into the avatar's frame (ping-pong), JPEG
    present (server rank)  what the page shows beside the frame

Importing this package registers the four stage kinds.
"""

from stages.lipsync.composite_stage import CompositeStage
from stages.lipsync.lipsync_stage import LipsyncStage
from stages.lipsync.present_stage import PresentStage
from stages.lipsync.speech_stage import SpeechStage

__all__ = ["CompositeStage", "LipsyncStage", "PresentStage", "SpeechStage"]
