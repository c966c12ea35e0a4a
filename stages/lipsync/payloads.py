"""What travels between the lip-sync stages.

    page --AUDIO_PCM--> speech --SPEECH_FRAME--> lipsync --MOUTH_PATCH--> composite --OUTPUT_JPEG--> present

One message per video frame from ``speech`` on: ``frame_id`` is the frame's index i in
its session's audio (samples [640 i, 640 (i + 1)) of what the page sent), ``capture_ts``
the page's clock at the frame's first sample, so latency on the page counts the window's
look-ahead too. Every message keeps the frame's ``meta["lipsync"]``: ``{"avatar",
"speech", "probability", "loudness_db"}``, completed downstream with ``avatar_frame`` and
``generator``.
"""

from __future__ import annotations

import torch

from stages.base import Payload

SPEECH_FRAME = Payload("lipsync.speech", (torch.float32,))
"""tensors[0]: the audio encoder's inputs that became available with this frame, float32
[k, 1, 80, 16] (k >= 1; encoder frames ``meta["encoder_first"]`` .. + k - 1, consecutive
within a session). meta: ``lipsync`` (above) and ``affinity`` = the avatar (routing)."""

MOUTH_PATCH = Payload("lipsync.mouth")
"""tensors[0] (absent for a silent frame): the 320 x 320 mouth region, [3, 320, 320] BGR,
uint8 (0..255) or float16 / float32 (0..1) as ``lipsync.patch_dtype`` says. meta
``lipsync`` adds ``avatar_frame`` (the background frame it belongs to) and ``generator``
('unet', 'mouth-synth', or 'silence')."""

FRAME_SAMPLES = 640
"""Audio samples per video frame: 16 kHz / 25 fps."""
