"""Per-session face tracks that are re-confirmed on every frame, with stable face ids.

A full detection (MTCNN's whole cascade) is the expensive step, so it runs on every
``detect_every``-th frame of a session, or sooner when anything is uncertain. On the
frames in between the tracker does not *assume* the faces are still there: it asks the
detector's last network to verify each track's predicted box (``MTCNN.verify``), which
either returns the refined box and landmarks or says the face is gone. So:

* a reported face was seen in *this* frame, by a detection or a verification; a track
  whose verification fails is hidden at once and forces a full detection on the next
  frame; after ``max_misses`` failures in a row it is dropped for good (the id is kept
  meanwhile, so a face that blinks out for a frame comes back under the same id);
* a scene cut (``scene_cut.is_cut``) drops every track of the session and forces a
  detection, so no box of the old scene is reported on the new one;
* emotions are smoothed per track (an EMA of the class probabilities), so the label the
  page shows is the face's mood over the last frames, not one frame's guess, and a new
  track never inherits another face's history.

One vision rank serves many browser sessions, so the state lives per session and is
forgotten when a session stops sending: sessions idle longer than ``session_idle_s``
are evicted, and at most ``max_sessions`` are kept (least recently seen evicted first).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from stages.vision.face_crops import Box
from stages.vision.scene_cut import is_cut

FloatBox = tuple[float, float, float, float]
"""(x, y, w, h) in input pixels, floats (no rounding drift between frames)."""

VELOCITY_DAMPING = 0.8
"""Per-frame decay of a track's predicted motion, so an unconfirmed face does not drift."""


class Observation(Protocol):
    """What a detection or a verification reports for one face (``FaceDetection``)."""

    box: FloatBox
    score: float
    landmarks: tuple[tuple[float, float], ...]


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x, y, w, h) boxes; 0 when either is empty."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


@dataclass(slots=True)
class Track:
    face_id: int
    box: FloatBox
    landmarks: tuple[tuple[float, float], ...] = ()
    score: float = 0.0
    """Detector confidence of the last confirmation."""
    velocity: tuple[float, float] = (0.0, 0.0)
    """Centre motion in pixels per frame, from the last confirmations."""
    misses: int = 0
    """Frames in a row this track was not confirmed; 0 = seen in the current frame."""
    emotion: np.ndarray | None = None
    """Smoothed emotion probabilities (None until the first reading)."""

    @property
    def confirmed(self) -> bool:
        """Seen in the current frame (only confirmed tracks are reported)."""
        return self.misses == 0

    def int_box(self, width: int, height: int) -> Box:
        """The box rounded and clipped to a ``width`` x ``height`` frame (at least 1x1)."""
        x, y, w, h = self.box
        x0 = min(max(0, int(round(x))), width - 1)
        y0 = min(max(0, int(round(y))), height - 1)
        x1 = max(min(width, int(round(x + w))), x0 + 1)
        y1 = max(min(height, int(round(y + h))), y0 + 1)
        return x0, y0, x1 - x0, y1 - y0

    def observe_emotion(self, probs: np.ndarray, keep: float) -> np.ndarray:
        """Blend one reading into the smoothed probabilities (``keep`` of the old ones)."""
        probs = np.asarray(probs, dtype=np.float64)
        self.emotion = probs.copy() if self.emotion is None else keep * self.emotion + (1.0 - keep) * probs
        return self.emotion


@dataclass(frozen=True, slots=True)
class Step:
    """What a frame needs: a full detection, or verifying ``boxes`` (in track order)."""

    detect: bool
    boxes: list[FloatBox]
    cut: bool
    """The frame started a new scene: every track of the session was dropped."""


@dataclass(slots=True)
class SessionTracks:
    frame_size: tuple[int, int]
    """(width, height) the boxes refer to; a change of capture size resets the tracks."""
    tracks: list[Track] = field(default_factory=list)
    frames_since_detect: int = 0
    next_id: int = 1
    last_seen: float = 0.0
    thumbnail: np.ndarray | None = None
    """The last frame's scene-cut thumbnail (``scene_cut.thumbnail``)."""
    pending: bool = False
    """A frame was begun and not yet finished (its detection or verification is out)."""


class FaceTracker:
    """Decides, per frame of a session, between a full detection and a verification,
    and keeps that session's face tracks.

    A frame is ``begin``-ed (which says what to run) and then ``finish``-ed with what ran.
    """

    def __init__(self, *, detect_every: int, iou_match: float, max_misses: int, box_smoothing: float,
                 emotion_smoothing: float, cut_threshold: float, max_faces: int, session_idle_s: float,
                 max_sessions: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.detect_every = detect_every
        self.cut_threshold = cut_threshold
        self.iou_match = iou_match
        self.max_misses = max_misses
        self.box_smoothing = box_smoothing
        self.emotion_smoothing = emotion_smoothing
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

    def begin(self, session: str, frame_size: tuple[int, int], thumbnail: np.ndarray | None = None) -> Step:
        """Start a frame of ``session``: what to run on it. ``thumbnail`` (``scene_cut.thumbnail``
        of the frame) lets a scene cut drop every track before anything else happens."""
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
        cut = False
        if thumbnail is not None:
            cut = bool(state.tracks) and is_cut(state.thumbnail, thumbnail, self.cut_threshold)
            state.thumbnail = thumbnail
        if cut:
            state.tracks = []
        state.pending = True
        self._predict(state)
        if (not state.tracks or state.frames_since_detect >= self.detect_every
                or any(not t.confirmed for t in state.tracks)):
            return Step(detect=True, boxes=[], cut=cut)
        return Step(detect=False, boxes=[t.box for t in state.tracks], cut=cut)

    def finish(self, session: str, observations: Sequence[Observation | None], *, detected: bool) -> list[Track]:
        """End the frame begun for ``session`` with what the detector said.

        ``detected``: ``observations`` are a full detection's faces (any order); else they
        are the verification results, one per box of the ``Step`` (None: not a face).
        Returns the faces to report: confirmed tracks, largest first, at most ``max_faces``.
        """
        state = self._sessions.get(session)
        if state is None or not state.pending:
            return []  # evicted (or never begun) while its detection ran: nothing to report
        state.pending = False
        if detected:
            self._match(state, [o for o in observations if o is not None])
            state.frames_since_detect = 1
        else:
            if len(observations) != len(state.tracks):
                raise ValueError(f"{len(observations)} verification results for {len(state.tracks)} tracks")
            for track, seen in zip(state.tracks, observations):
                if seen is None:
                    track.misses += 1
                else:
                    self._absorb(track, seen)
            state.frames_since_detect += 1
        state.tracks = [t for t in state.tracks if t.misses <= self.max_misses]
        state.tracks.sort(key=lambda t: t.box[2] * t.box[3], reverse=True)
        return [t for t in state.tracks if t.confirmed][: self.max_faces]

    def _predict(self, state: SessionTracks) -> None:
        for track in state.tracks:
            vx, vy = track.velocity
            x, y, w, h = track.box
            track.box = (x + vx, y + vy, w, h)
            track.landmarks = tuple((px + vx, py + vy) for px, py in track.landmarks)
            track.velocity = (vx * VELOCITY_DAMPING, vy * VELOCITY_DAMPING)

    def _match(self, state: SessionTracks, found: list[Observation]) -> None:
        """Greedy IoU matching of a full detection against the (predicted) tracks."""
        found = sorted(found, key=lambda o: o.box[2] * o.box[3], reverse=True)[: self.max_faces]
        pairs = sorted(((iou(t.box, o.box), ti, oi) for ti, t in enumerate(state.tracks)
                        for oi, o in enumerate(found)), reverse=True)
        matched_tracks: set[int] = set()
        matched_found: set[int] = set()
        for overlap, ti, oi in pairs:
            if overlap < self.iou_match:
                break
            if ti in matched_tracks or oi in matched_found:
                continue
            matched_tracks.add(ti)
            matched_found.add(oi)
            self._absorb(state.tracks[ti], found[oi])
        for ti, track in enumerate(state.tracks):
            if ti not in matched_tracks:
                track.misses += 1
        for oi, seen in enumerate(found):
            if oi not in matched_found:
                state.tracks.append(Track(face_id=state.next_id, box=tuple(map(float, seen.box)),
                                          landmarks=tuple(seen.landmarks), score=float(seen.score)))
                state.next_id += 1

    def _absorb(self, track: Track, seen: Observation) -> None:
        """Blend a confirmation into ``track``: an alpha-beta filter on the box centre.

        The landmarks are not smoothed: they come with the box of the same network pass,
        and smoothing only one of the two would let them slide apart."""
        gain = 1.0 - self.box_smoothing
        predicted = track.box
        box = tuple(map(float, seen.box))
        track.box = tuple(p + gain * (s - p) for p, s in zip(predicted, box))
        shift = (track.box[0] - box[0] + (track.box[2] - box[2]) / 2,
                 track.box[1] - box[1] + (track.box[3] - box[3]) / 2)
        track.landmarks = tuple((x + shift[0], y + shift[1]) for x, y in seen.landmarks)
        # The residual against the prediction corrects the velocity; half the box gain
        # keeps the motion estimate calm.
        rx = (box[0] + box[2] / 2) - (predicted[0] + predicted[2] / 2)
        ry = (box[1] + box[3] / 2) - (predicted[1] + predicted[3] / 2)
        vx, vy = track.velocity
        track.velocity = (vx + 0.5 * gain * rx, vy + 0.5 * gain * ry)
        track.score = float(seen.score)
        track.misses = 0

    def _evict_idle(self, now: float) -> None:
        # Sessions are kept in last-seen order, so the idle ones are at the front.
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if now - oldest.last_seen <= self.session_idle_s:
                break
            self._sessions.popitem(last=False)
