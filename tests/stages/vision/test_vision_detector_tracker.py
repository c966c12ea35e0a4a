"""Haar detection on a downscaled frame, and per-session face tracks."""

from __future__ import annotations

import cv2
import numpy as np

from stages.vision.detector import HaarFaceDetector
from stages.vision.tracker import FaceTracker, iou
from vision_testutil import ASTRONAUT_FACE, box_iou


def detector(**overrides) -> HaarFaceDetector:
    params = dict(detect_width=320, scale_factor=1.1, min_neighbors=5, min_face_px=48) | overrides
    return HaarFaceDetector(**params)


def test_finds_astronaut_face(astronaut_rgb):
    gray = cv2.cvtColor(astronaut_rgb, cv2.COLOR_RGB2GRAY)
    for width in (160, 320, 640):
        boxes = detector(detect_width=width).detect(gray)
        assert len(boxes) == 1, width
        assert box_iou(boxes[0], ASTRONAUT_FACE) > 0.5, (width, boxes)


def test_blank_and_tiny_frames_have_no_faces():
    d = detector()
    for shape in ((480, 640), (1, 1), (10, 300), (23, 23)):
        assert d.detect(np.full(shape, 200, np.uint8)) == []


def test_min_face_px_filters_small_faces(astronaut_rgb):
    gray = cv2.cvtColor(astronaut_rgb, cv2.COLOR_RGB2GRAY)
    assert detector(min_face_px=200).detect(gray) == []


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def tracker(clock=None, **overrides) -> FaceTracker:
    params = dict(detect_every=3, iou_match=0.3, max_misses=2, box_smoothing=0.5, max_faces=4,
                  session_idle_s=30.0, max_sessions=8) | overrides
    return FaceTracker(clock=clock or FakeClock(), **params)


SIZE = (640, 480)


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (20, 20, 5, 5)) == 0.0
    assert abs(iou((0, 0, 10, 10), (5, 0, 10, 10)) - 1 / 3) < 1e-9
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_detection_schedule():
    t = tracker()
    assert t.needs_detection("s", SIZE)  # unknown session
    t.update("s", SIZE, [])
    assert t.needs_detection("s", SIZE)  # no tracks: keep looking
    t.update("s", SIZE, [(100, 100, 80, 80)])
    schedule = []
    for _ in range(6):
        detect = t.needs_detection("s", SIZE)
        schedule.append(detect)
        t.update("s", SIZE, [(100, 100, 80, 80)] if detect else None)
    assert schedule == [False, False, True, False, False, True]
    assert t.needs_detection("s", (320, 240))  # capture size changed


def test_ids_stay_stable_while_a_face_moves():
    t = tracker()
    ids = set()
    for step in range(12):
        box = (100 + 4 * step, 100, 80, 80)
        detect = t.needs_detection("s", SIZE)
        tracks = t.update("s", SIZE, [box] if detect else None)
        assert len(tracks) == 1
        ids.add(tracks[0].face_id)
    assert ids == {1}
    # The prediction follows the motion: the track is near the last position, not the first.
    assert abs(tracks[0].box[0] - (100 + 4 * 11)) < 12


def test_new_face_gets_new_id_and_lost_face_is_dropped():
    t = tracker(max_misses=1)
    t.update("s", SIZE, [(100, 100, 80, 80)])
    tracks = t.update("s", SIZE, [(100, 100, 80, 80), (400, 100, 60, 60)])
    assert sorted(tr.face_id for tr in tracks) == [1, 2]
    assert [tr.face_id for tr in t.update("s", SIZE, [(400, 100, 60, 60)])] == [1, 2]  # one miss kept
    assert [tr.face_id for tr in t.update("s", SIZE, [(400, 100, 60, 60)])] == [2]  # second miss drops it
    assert [tr.face_id for tr in t.update("s", SIZE, [(100, 100, 80, 80), (400, 100, 60, 60)])] == [3, 2]


def test_max_faces_keeps_the_largest():
    t = tracker(max_faces=2)
    tracks = t.update("s", SIZE, [(0, 0, 90, 90), (200, 0, 50, 50), (400, 0, 70, 70)])
    assert [tr.box[2] for tr in tracks] == [90.0, 70.0]


def test_sessions_are_independent():
    t = tracker()
    a = t.update("a", SIZE, [(100, 100, 80, 80)])
    b = t.update("b", SIZE, [(300, 200, 60, 60), (10, 10, 50, 50)])
    assert [tr.face_id for tr in a] == [1]
    assert [tr.face_id for tr in b] == [1, 2]
    assert t.update("a", SIZE, None)[0].box[0] == 100.0


def test_idle_sessions_are_forgotten():
    clock = FakeClock()
    t = tracker(clock, session_idle_s=30.0)
    t.update("old", SIZE, [(100, 100, 80, 80)])
    clock.now = 20.0
    t.update("new", SIZE, [(100, 100, 80, 80)])
    clock.now = 31.0
    t.update("new", SIZE, None)
    assert t.sessions() == ["new"]


def test_session_count_is_bounded():
    t = tracker(max_sessions=3)
    for i in range(10):
        t.update(f"s{i}", SIZE, [(100, 100, 80, 80)])
    assert t.sessions() == ["s7", "s8", "s9"]


def test_boxes_are_clipped_to_the_frame():
    t = tracker()
    track = t.update("s", (100, 80), [(90, 70, 40, 40)])[0]
    assert track.int_box(100, 80) == (90, 70, 10, 10)
    track.box = (500.0, 500.0, 10.0, 10.0)
    x, y, w, h = track.int_box(100, 80)
    assert 0 <= x < 100 and 0 <= y < 80 and w >= 1 and h >= 1


def test_visible_fraction_of_a_track():
    from stages.vision.tracker import Track

    assert Track(face_id=1, box=(10.0, 10.0, 20.0, 20.0)).visible_fraction(100, 100) == 1.0
    assert Track(face_id=1, box=(90.0, 10.0, 20.0, 20.0)).visible_fraction(100, 100) == 0.5
    assert Track(face_id=1, box=(120.0, 10.0, 20.0, 20.0)).visible_fraction(100, 100) == 0.0
