"""Per-session face tracks between detections, with stable face ids and bounded memory.

The Haar cascade is the expensive part of the vision stage, so it runs on every
``detect_every``-th frame of a session (sooner while the session has no tracks); in
between, each track's box is carried forward by its recent velocity. A detection frame
matches new boxes to tracks greedily by IoU (highest overlap first), smooths matched
boxes (an exponential moving average, so the Haar box's frame-to-frame jitter does not
shake the portrait), starts tracks for unmatched boxes and drops tracks that went
unmatched for more than ``max_misses`` detections in a row.

One vision rank serves many browser sessions, so the state lives per session and is
forgotten when a session stops sending: sessions idle longer than ``session_idle_s``
are evicted, and at most ``max_sessions`` are kept (least recently seen evicted first),
so memory stays bounded even when sessions vanish without saying goodbye.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from stages.vision.face_crops import Box

VELOCITY_DAMPING = 0.8
"""Per-frame decay of a track's predicted motion, so a lost face does not drift away."""


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two (x, y, w, h) boxes; 0 when either is empty."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


@dataclass(slots=True)
class Track:
    face_id: int
    box: tuple[float, float, float, float]
    """Smoothed (x, y, w, h) in input pixels, kept as floats to avoid rounding drift."""
    velocity: tuple[float, float] = (0.0, 0.0)
    """Centre motion in pixels per frame, estimated from the last two matches."""
    misses: int = 0
    """Detections in a row that did not match this track."""
    frames_since_match: int = 0

    def visible_fraction(self, width: int, height: int) -> float:
        """How much of the box lies inside a ``width`` x ``height`` frame (0..1)."""
        x, y, w, h = self.box
        inside_w = max(0.0, min(x + w, width) - max(x, 0.0))
        inside_h = max(0.0, min(y + h, height) - max(y, 0.0))
        return inside_w * inside_h / (w * h) if w > 0 and h > 0 else 0.0

    def int_box(self, width: int, height: int) -> Box:
        """The box rounded and clipped to a ``width`` x ``height`` frame (at least 1x1)."""
        x, y, w, h = self.box
        x0 = min(max(0, int(round(x))), width - 1)
        y0 = min(max(0, int(round(y))), height - 1)
        x1 = max(min(width, int(round(x + w))), x0 + 1)
        y1 = max(min(height, int(round(y + h))), y0 + 1)
        return x0, y0, x1 - x0, y1 - y0


@dataclass(slots=True)
class SessionTracks:
    frame_size: tuple[int, int]
    """(width, height) the boxes refer to; a change of capture size resets the tracks."""
    tracks: list[Track] = field(default_factory=list)
    frames_since_detect: int = 0
    next_id: int = 1
    last_seen: float = 0.0


class FaceTracker:
    """Decides when to detect and keeps face tracks for each session."""

    def __init__(self, *, detect_every: int, iou_match: float, max_misses: int, box_smoothing: float,
                 max_faces: int, session_idle_s: float, max_sessions: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.detect_every = detect_every
        self.iou_match = iou_match
        self.max_misses = max_misses
        self.box_smoothing = box_smoothing
        self.max_faces = max_faces
        self.session_idle_s = session_idle_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._sessions: OrderedDict[str, SessionTracks] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def sessions(self) -> list[str]:
        return list(self._sessions)

    def forget(self, session: str) -> None:
        self._sessions.pop(session, None)

    def clear(self) -> None:
        self._sessions.clear()

    def needs_detection(self, session: str, frame_size: tuple[int, int]) -> bool:
        """Whether this session's next frame should run the detector."""
        state = self._sessions.get(session)
        return (state is None or state.frame_size != frame_size or not state.tracks
                or state.frames_since_detect >= self.detect_every)

    def update(self, session: str, frame_size: tuple[int, int], detections: list[Box] | None) -> list[Track]:
        """Advance ``session`` by one frame; ``detections`` is None on a tracked frame.

        Returns the session's live tracks, largest first, at most ``max_faces``.
        """
        now = self._clock()
        self._evict_idle(now)
        state = self._sessions.get(session)
        if state is None or state.frame_size != frame_size:
            next_id = 1 if state is None else state.next_id  # ids stay unique within a session
            state = SessionTracks(frame_size=frame_size, next_id=next_id)
        self._sessions[session] = state
        self._sessions.move_to_end(session)
        state.last_seen = now
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)

        if detections is None:
            self._predict(state)
            state.frames_since_detect += 1
        else:
            largest = sorted(detections, key=lambda d: d[2] * d[3], reverse=True)
            self._match(state, largest[: self.max_faces])
            state.frames_since_detect = 1
        state.tracks.sort(key=lambda t: t.box[2] * t.box[3], reverse=True)
        return state.tracks[: self.max_faces]

    def _predict(self, state: SessionTracks) -> None:
        for track in state.tracks:
            vx, vy = track.velocity
            x, y, w, h = track.box
            track.box = (x + vx, y + vy, w, h)
            track.velocity = (vx * VELOCITY_DAMPING, vy * VELOCITY_DAMPING)
            track.frames_since_match += 1

    def _match(self, state: SessionTracks, detections: list[Box]) -> None:
        self._predict(state)  # compare detections with where tracks should be now
        pairs = sorted(((iou(t.box, d), ti, di) for ti, t in enumerate(state.tracks)
                        for di, d in enumerate(detections)), reverse=True)
        matched_tracks: set[int] = set()
        matched_dets: set[int] = set()
        for overlap, ti, di in pairs:
            if overlap < self.iou_match:
                break
            if ti in matched_tracks or di in matched_dets:
                continue
            matched_tracks.add(ti)
            matched_dets.add(di)
            self._absorb(state.tracks[ti], detections[di])

        survivors = []
        for ti, track in enumerate(state.tracks):
            if ti not in matched_tracks:
                track.misses += 1
                if track.misses > self.max_misses:
                    continue
            survivors.append(track)
        for di, det in enumerate(detections):
            if di not in matched_dets:
                survivors.append(Track(face_id=state.next_id, box=tuple(map(float, det))))
                state.next_id += 1
        survivors.sort(key=lambda t: t.box[2] * t.box[3], reverse=True)
        state.tracks = survivors[: self.max_faces]

    def _absorb(self, track: Track, det: Box) -> None:
        """Blend a matched detection into ``track`` (an alpha-beta filter on the centre)."""
        gain = 1.0 - self.box_smoothing
        predicted = track.box
        track.box = tuple(p + gain * (float(d) - p) for p, d in zip(predicted, det))
        # The residual against the prediction corrects the velocity, spread over the
        # frames since the last match; half the box gain keeps the motion estimate calm.
        frames = max(track.frames_since_match, 1)
        rx = (det[0] + det[2] / 2) - (predicted[0] + predicted[2] / 2)
        ry = (det[1] + det[3] / 2) - (predicted[1] + predicted[3] / 2)
        vx, vy = track.velocity
        track.velocity = (vx + 0.5 * gain * rx / frames, vy + 0.5 * gain * ry / frames)
        track.misses = 0
        track.frames_since_match = 0

    def _evict_idle(self, now: float) -> None:
        # Sessions are kept in last-seen order, so the idle ones are at the front.
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if now - oldest.last_seen <= self.session_idle_s:
                break
            self._sessions.popitem(last=False)
