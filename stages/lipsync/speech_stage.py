"""The speech stage: the page's audio chunks in, one message per video frame out.

It runs on the server rank, next to the web server, because it is cheap (a mel step and
a VAD call per 20 ms chunk) and because every later stage wants whole video frames, not
network-sized chunks. Per session it keeps

- the streaming Wav2Lip mel and the encoder windows cut from it (``mel``,
  ``audio_windows``): the same features the whole file would give;
- silero VAD and loudness per video frame (``speech_activity``);
- where each chunk began on the page's clock, so frame i is stamped with the page time
  of its first sample and the page can measure latency against what it played.

Frame i goes out once the encoder window the U-Net needs farthest ahead for it
(``LOOKAHEAD_FEATURES``) is complete: that is the pipeline's look-ahead
(``audio_windows.lookahead_seconds``, ~0.45 s). It carries the encoder inputs that became
available since the previous frame, so the lip-sync replica keeps a running history
instead of receiving 16 windows per frame.

Where a chunk belongs is ``meta["first_sample"]``, its first sample's position in the
session's stream as the server accepted it (and as the page numbers what it plays). A
chunk that starts past the samples received follows a loss (the entrance queue dropped
audio after a stall): the gap is filled with silence so frame i still shows the page's
samples [640 i, 640 (i + 1)); one that starts before is a repeat and is dropped.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from comms.message import Message
from stages.base import Stage
from stages.lipsync.audio_windows import LOOKAHEAD_FEATURES, StreamingEncoderInputs
from stages.lipsync.config import SpeechConfig
from stages.lipsync.mel import SAMPLE_RATE, StreamingMel
from stages.lipsync.payloads import FRAME_SAMPLES, SPEECH_FRAME
from stages.lipsync.speech_activity import FrameActivity, SpeechActivity
from stages.registry import register_stage
from stages.server.hooks import AUDIO_PCM
from stages.session_states import SessionStates

MAX_GAP_SAMPLES = 60 * SAMPLE_RATE
"""Silence filled in for lost chunks at most (60 s, far more than the entrance queue can
lose): a bound, so a message claiming an absurd position cannot make the stage allocate
hours of audio."""


@dataclass(kw_only=True)
class _SessionAudio:
    mel: StreamingMel = field(default_factory=StreamingMel)
    inputs: StreamingEncoderInputs = field(default_factory=StreamingEncoderInputs)
    activity: SpeechActivity
    samples: int = 0
    """Samples received so far (the position of the next chunk's first sample)."""
    anchors: deque[tuple[int, float]] = field(default_factory=deque)
    """(first sample, page ms) of recent chunks: frame times are read off them."""
    pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    """Encoder inputs not yet sent, oldest first."""
    activities: dict[int, FrameActivity] = field(default_factory=dict)
    next_frame: int = 0


@register_stage
class SpeechStage(Stage):
    """Takes the page's audio chunks (``AUDIO_PCM``: int16 samples, meta ``avatar``);
    emits one ``SPEECH_FRAME`` per video frame, in order per session. A chunk that is
    not int16 mono samples is dropped and reported (``bad_audio``)."""

    kind = "speech"
    Config = SpeechConfig
    accepts = AUDIO_PCM
    emits = SPEECH_FRAME

    def setup(self) -> None:
        config: SpeechConfig = self.config
        self.sessions: SessionStates[_SessionAudio] = SessionStates(
            lambda now: _SessionAudio(activity=SpeechActivity(threshold=config.vad_threshold,
                                                              hangover_s=config.hangover_s)),
            max_sessions=config.max_sessions, idle_s=config.idle_s, log=self.log, what="audio state")
        # Load silero once now, not on the first session's first chunk.
        SpeechActivity(threshold=config.vad_threshold, hangover_s=config.hangover_s)

    def process(self, batch: list[Message]) -> list[Message]:
        now = time.monotonic()
        outputs: list[Message] = []
        for msg in batch:
            started = time.time()
            samples = self._samples(msg)
            if samples is None:
                continue
            state = self.sessions.get(msg.session, now)
            if not self._in_order(state, msg, samples):
                continue
            state.anchors.append((state.samples, msg.capture_ts))
            state.samples += samples.numel()
            audio = samples.to(torch.float32) / 32768.0
            for activity in state.activity.push(audio):
                state.activities[activity.index] = activity
            state.pending += state.inputs.push(state.mel.push(audio))
            outputs += self._ready_frames(msg, state, started)
        self.sessions.evict_idle(now)
        return outputs

    def _samples(self, msg: Message) -> torch.Tensor | None:
        samples = msg.tensors[0] if msg.tensors else None
        if samples is None or samples.dtype != torch.int16 or samples.dim() != 1 or samples.numel() == 0:
            got = "nothing" if samples is None else f"{tuple(samples.shape)} {samples.dtype}"
            return self.reject(msg, "bad_audio", f"an audio chunk must hold int16 mono samples, got {got}")
        return samples.cpu()

    def _in_order(self, state: _SessionAudio, msg: Message, samples: torch.Tensor) -> bool:
        """Drop a repeated chunk; fill a lost one with silence. True if ``msg`` goes on."""
        first = msg.meta.get("first_sample", state.samples)
        if not isinstance(first, int) or first < state.samples:
            self.log.debug("session %s: chunk %d starts at sample %r, before %d: a repeat, dropped",
                           msg.session, msg.frame_id, first, state.samples)
            return False
        if first > state.samples:
            lost = min(first - state.samples, MAX_GAP_SAMPLES)
            self.log.info("session %s: %d samples lost before chunk %d; silence in their place",
                          msg.session, first - state.samples, msg.frame_id)
            silence = torch.zeros(lost)
            for activity in state.activity.push(silence):
                state.activities[activity.index] = activity
            state.pending += state.inputs.push(state.mel.push(silence))
            state.samples += lost
        return True

    def _ready_frames(self, msg: Message, state: _SessionAudio, started: float) -> list[Message]:
        """Every frame whose farthest encoder input has arrived (and whose activity is known)."""
        outputs = []
        while state.pending and state.pending[-1][0] >= state.next_frame + LOOKAHEAD_FEATURES \
                and state.next_frame in state.activities:
            frame = state.next_frame
            needed = [(j, x) for j, x in state.pending if j <= frame + LOOKAHEAD_FEATURES]
            state.pending = state.pending[len(needed):]
            activity = state.activities.pop(frame)
            avatar = msg.meta.get("avatar")
            lipsync = {"avatar": avatar, "speech": activity.speech, "probability": round(activity.probability, 3),
                       "loudness_db": round(activity.loudness_db, 1)}
            out = msg.derive(tensors=[torch.stack([x.reshape(1, 80, 16) for _, x in needed])],
                             meta={"lipsync": lipsync, "affinity": avatar, "encoder_first": needed[0][0]})
            out.frame_id = frame
            out.capture_ts = self._frame_time(state, frame)
            outputs.append(out.stamp("speech.start", started).stamp("speech.end"))
            state.next_frame += 1
        return outputs

    @staticmethod
    def _frame_time(state: _SessionAudio, frame: int) -> float:
        """Page clock (ms) at frame ``frame``'s first sample, read off the chunk holding it."""
        first = frame * FRAME_SAMPLES
        while len(state.anchors) > 1 and state.anchors[1][0] <= first:
            state.anchors.popleft()  # frames only move forward: older anchors are done
        start, page_ms = state.anchors[0]
        return page_ms + (first - start) * 1000.0 / SAMPLE_RATE
