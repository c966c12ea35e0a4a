"""Per-session face tracks: confirmed every frame, dropped when the face is gone, reset by
scene cuts, emotions smoothed per face (synthetic sequences, no networks)."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import pytest
from vision_testutil import FIXTURES

from stages.vision.scene_cut import cut_score, is_cut, thumbnail
from stages.vision.tracker import FaceTracker, Track, iou

SIZE = (640, 480)


@dataclass(frozen=True)
class Seen:
    """A detector observation: what ``MTCNN.detect``/``verify`` report per face."""

    box: tuple[float, float, float, float]
    score: float = 0.99
    landmarks: tuple[tuple[float, float], ...] = ()


def seen(x: float, y: float, side: float = 80.0) -> Seen:
    eyes = ((x + 0.3 * side, y + 0.4 * side), (x + 0.7 * side, y + 0.4 * side))
    nose, mouth = (x + side / 2, y + 0.6 * side), ((x + 0.35 * side, y + 0.8 * side), (x + 0.65 * side, y + 0.8 * side))
    return Seen(box=(x, y, side, side), landmarks=(*eyes, nose, *mouth))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def tracker(clock=None, **overrides) -> FaceTracker:
    params = dict(detect_every=3, iou_match=0.3, max_misses=2, box_smoothing=0.0, emotion_smoothing=0.5,
                  cut_threshold=0.1, max_faces=4, session_idle_s=30.0, max_sessions=8) | overrides
    return FaceTracker(clock=clock or FakeClock(), **params)


def run(t: FaceTracker, faces: list[Seen], session: str = "s", thumb=None) -> tuple[bool, list[Track]]:
    """One frame in which ``faces`` are really there: a detector that finds exactly them,
    and a verifier that confirms a box only where one of them overlaps it."""
    step = t.begin(session, SIZE, thumb)
    if step.detect:
        return True, t.finish(session, faces, detected=True)
    results = [max((f for f in faces if iou(box, f.box) > 0.3), key=lambda f: iou(box, f.box), default=None)
               for box in step.boxes]
    return False, t.finish(session, results, detected=False)


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (20, 20, 5, 5)) == 0.0
    assert abs(iou((0, 0, 10, 10), (5, 0, 10, 10)) - 1 / 3) < 1e-9
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_detects_every_n_frames_and_verifies_in_between():
    t = tracker()
    assert run(t, [])[0]  # nothing tracked: keep detecting
    assert run(t, [])[0]
    schedule = [run(t, [seen(100, 100)])[0] for _ in range(7)]
    assert schedule == [True, False, False, True, False, False, True]
    assert t.begin("s", (320, 240)).detect  # capture size changed


def test_ids_stay_stable_while_a_face_moves():
    t = tracker()
    ids = set()
    for step in range(12):
        _, tracks = run(t, [seen(100 + 4 * step, 100)])
        assert len(tracks) == 1
        ids.add(tracks[0].face_id)
    assert ids == {1}
    assert abs(tracks[0].box[0] - (100 + 4 * 11)) < 1e-6  # no smoothing: exactly the observation
    assert tracks[0].landmarks[0] == pytest.approx((100 + 44 + 24, 132))


def test_a_face_that_is_gone_is_hidden_at_once_and_dropped_after_max_misses():
    t = tracker(max_misses=1)
    run(t, [seen(100, 100)])
    detected, tracks = run(t, [])  # a verification frame: the face is gone
    assert not detected and tracks == []  # never reported unconfirmed, not even once
    detected, tracks = run(t, [seen(102, 100)])  # the miss forces a detection; it comes back
    assert detected and [tr.face_id for tr in tracks] == [1]
    run(t, [])
    run(t, [])  # two misses in a row > max_misses: dropped
    _, tracks = run(t, [seen(100, 100)])
    assert [tr.face_id for tr in tracks] == [2]


def test_a_false_track_cannot_outlive_one_verification():
    """A detection on a lamp: the next frame's verification says no face, so it is never
    reported again, whatever max_misses says."""
    t = tracker(max_misses=30)
    lamp = seen(500, 50, 60)
    _, tracks = run(t, [lamp, seen(100, 100)])
    assert [tr.face_id for tr in tracks] == [1, 2]  # largest first: the face, then the lamp
    for _ in range(10):
        _, tracks = run(t, [seen(100, 100)])
        assert [tr.face_id for tr in tracks] == [1]


def test_scene_cut_drops_every_track_on_its_first_frame():
    astronaut = cv2.imread(str(FIXTURES / "astronaut_640x480.jpg"), cv2.IMREAD_GRAYSCALE)
    other = np.ascontiguousarray(astronaut[::-1, ::-1])  # a different picture, same statistics
    t = tracker(detect_every=10)
    run(t, [seen(220, 80, 120)], thumb=thumbnail(astronaut))
    run(t, [seen(220, 80, 120)], thumb=thumbnail(astronaut))
    # The new scene has a face somewhere else; the old box overlaps nothing there.
    step = t.begin("s", SIZE, thumbnail(other))
    assert step.cut and step.detect
    tracks = t.finish("s", [seen(300, 300, 90)], detected=True)
    assert [tr.box[:2] for tr in tracks] == [(300.0, 300.0)]
    assert tracks[0].face_id == 2  # a new face, not the old one moved


def test_cut_scores_separate_motion_from_cuts():
    astronaut = cv2.imread(str(FIXTURES / "astronaut_640x480.jpg"), cv2.IMREAD_GRAYSCALE)
    base = thumbnail(astronaut)
    shift = np.float32([[1, 0, 30], [0, 1, 8]])
    moved = thumbnail(cv2.warpAffine(astronaut, shift, (640, 480), borderMode=cv2.BORDER_REPLICATE))
    zoomed = thumbnail(cv2.resize(astronaut[24:456, 32:608], (640, 480)))  # stepping closer
    brighter = thumbnail(cv2.convertScaleAbs(astronaut, alpha=1.0, beta=40))  # lights on
    flipped = thumbnail(np.ascontiguousarray(astronaut[::-1, ::-1]))
    noise = np.random.default_rng(0).normal(0, 6, astronaut.shape)
    noisy = thumbnail(np.clip(astronaut + noise, 0, 255).astype(np.uint8))  # sensor noise
    for calm in (moved, zoomed, brighter, noisy):
        assert cut_score(base, calm) < 0.07 and not is_cut(base, calm, 0.1)
    assert cut_score(base, flipped) > 0.15 and is_cut(base, flipped, 0.1)
    assert cut_score(None, base) == 0.0


def test_emotions_are_smoothed_per_face():
    track = Track(face_id=1, box=(0, 0, 10, 10))
    happy, sad = np.eye(7)[3], np.eye(7)[4]
    assert track.observe_emotion(happy, 0.5).tolist() == happy.tolist()  # first reading as is
    smoothed = track.observe_emotion(sad, 0.5)
    assert smoothed[3] == pytest.approx(0.5) and smoothed[4] == pytest.approx(0.5)
    other = Track(face_id=2, box=(0, 0, 10, 10))
    assert other.observe_emotion(sad, 0.5).tolist() == sad.tolist()  # a new face has no history


def test_max_faces_keeps_the_largest():
    t = tracker(max_faces=2)
    _, tracks = run(t, [seen(0, 0, 90), seen(200, 0, 50), seen(400, 0, 70)])
    assert [tr.box[2] for tr in tracks] == [90.0, 70.0]


def test_sessions_are_independent():
    t = tracker()
    _, a = run(t, [seen(100, 100)], "a")
    _, b = run(t, [seen(300, 200, 60), seen(10, 10, 50)], "b")
    assert [tr.face_id for tr in a] == [1]
    assert [tr.face_id for tr in b] == [1, 2]
    _, a = run(t, [seen(100, 100)], "a")
    assert a[0].box[0] == 100.0


def test_finish_without_begin_or_after_eviction_reports_nothing():
    clock = FakeClock()
    t = tracker(clock, session_idle_s=5.0)
    assert t.finish("never", [seen(1, 1)], detected=True) == []
    t.begin("a", SIZE)
    clock.now = 10.0
    t.begin("b", SIZE)  # evicts idle "a" while its detection is out
    assert t.finish("a", [seen(1, 1)], detected=True) == []


def test_verification_results_must_match_the_boxes():
    t = tracker()
    run(t, [seen(100, 100)])
    step = t.begin("s", SIZE)
    assert not step.detect and len(step.boxes) == 1
    with pytest.raises(ValueError, match="2 verification results for 1 tracks"):
        t.finish("s", [None, None], detected=False)


def test_idle_sessions_are_forgotten():
    clock = FakeClock()
    t = tracker(clock, session_idle_s=30.0)
    run(t, [seen(100, 100)], "old")
    clock.now = 20.0
    run(t, [seen(100, 100)], "new")
    clock.now = 31.0
    run(t, [seen(100, 100)], "new")
    assert t.sessions() == ["new"]


def test_session_count_is_bounded():
    t = tracker(max_sessions=3)
    for i in range(10):
        run(t, [seen(100, 100)], f"s{i}")
    assert t.sessions() == ["s7", "s8", "s9"]


def test_boxes_are_clipped_to_the_frame():
    track = Track(face_id=1, box=(90.0, 70.0, 40.0, 40.0))
    assert track.int_box(100, 80) == (90, 70, 10, 10)
    track.box = (500.0, 500.0, 10.0, 10.0)
    x, y, w, h = track.int_box(100, 80)
    assert 0 <= x < 100 and 0 <= y < 80 and w >= 1 and h >= 1
