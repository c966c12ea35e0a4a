"""Building avatars: from a photo (idle sway), from a video, atomically; the default avatar; the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from launch.prepare_avatar import main as prepare_main
from stages.lipsync import prepare
from stages.lipsync.avatar import AvatarStore
from stages.lipsync.crop import CROP_SIZE
from stages.lipsync.prepare import (
    DEFAULT_AVATAR,
    build_avatar,
    ensure_default_avatar,
    sway_matrices,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
PHOTO = FIXTURES / "astronaut_640x480.jpg"
MARKS = np.asarray(json.loads((FIXTURES / "astronaut_landmarks.json").read_text())["points"])


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_photo_becomes_an_idle_sway(tmp_path: Path) -> None:
    manifest = build_avatar(image=PHOTO, avatar="eileen", root=tmp_path, seconds=0.4)
    assert (manifest.id, manifest.frame_count, manifest.width, manifest.height) == ("eileen", 10, 640, 480)
    assert (manifest.source, manifest.fps, manifest.model, manifest.audio_encoder) == ("photo", 25, None, None)
    assert leftovers(tmp_path) == ["eileen"]
    store = AvatarStore(tmp_path)
    assert store.manifest("eileen") == manifest
    rects = store.crop_rects("eileen")
    frames = [store.read_frame("eileen", k).astype(float) for k in range(10)]
    photo = cv2.cvtColor(cv2.imread(str(PHOTO)), cv2.COLOR_BGR2RGB).astype(float)
    for (x1, y1, x2, y2) in rects:  # every crop holds her mouth and nose, as the hand-placed landmarks say
        assert x2 - x1 == y2 - y1 and x1 < MARKS[3, 0] and MARKS[4, 0] < x2 and y1 < MARKS[2, 1] < MARKS[4, 1] < y2
    # Alive: the head moves a little between frames; the background does not move at all.
    face = np.s_[110:200, 240:320]
    assert np.abs(frames[0][face] - frames[5][face]).mean() > 1.0
    assert np.abs(frames[0][face] - photo[face]).mean() < 12
    corner = np.s_[0:60, 0:60]
    assert np.abs(frames[0][corner] - frames[5][corner]).max() <= 3  # only JPEG noise
    _cx, cy, width, lip = manifest.mouth
    assert 0 < cy < lip < CROP_SIZE and 100 < width < 200


def test_sway_is_at_rest_at_both_ends() -> None:
    """Played ping-pong, the motion turns round at the first and last frame: no jerk there."""
    matrices = np.stack(sway_matrices(100, MARKS))
    speed = np.abs(np.diff(matrices, axis=0)).sum(axis=(1, 2))
    assert speed[0] < 0.05 * speed.max() and speed[-1] < 0.05 * speed.max()
    shift = np.abs(matrices[:, :, 2] - matrices[0, :, 2]).max()
    assert 0.3 < shift < 5  # a few pixels at most


def test_video_is_resampled_to_25_fps(tmp_path: Path) -> None:
    clip = tmp_path / "clip.avi"
    photo = cv2.imread(str(PHOTO))
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 50, (640, 480))
    assert writer.isOpened()
    for k in range(24):  # 0.48 s at 50 fps; frames 6 and 7 without a face
        frame = cv2.warpAffine(photo, np.float32([[1, 0, k * 0.5], [0, 1, 0]]), (640, 480),
                               borderMode=cv2.BORDER_REPLICATE)
        writer.write(np.zeros_like(frame) if k in (6, 7) else frame)
    writer.release()
    root = tmp_path / "avatars"
    manifest = build_avatar(video=clip, avatar="clip", root=root, seconds=None, max_side=320)
    assert (manifest.source, manifest.frame_count, manifest.width, manifest.height) == ("video", 12, 320, 240)
    store = AvatarStore(root)
    assert store.read_frame("clip", 3).max() < 30  # source frame 6: every other frame of the 50 fps clip
    rects = store.crop_rects("clip")
    assert len(rects) == 12 and np.abs(np.diff(rects[:, 0])).max() <= 2  # no face: interpolated, no jump
    limited = build_avatar(video=clip, avatar="short", root=root, seconds=0.2, max_side=320)
    assert limited.frame_count == 5


def test_model_files_are_copied_and_named(tmp_path: Path) -> None:
    model, encoder = tmp_path / "195.pth", tmp_path / "ave.pth"
    model.write_bytes(b"unet weights")
    encoder.write_bytes(b"encoder weights")
    root = tmp_path / "avatars"
    manifest = build_avatar(image=PHOTO, avatar="eileen", root=root, seconds=0.04, model=model, audio_encoder=encoder)
    assert (manifest.model, manifest.audio_encoder) == ("unet.pth", "audio_encoder.pth")
    assert (root / "eileen" / "unet.pth").read_bytes() == b"unet weights"
    assert AvatarStore(root).model_file("eileen", "audio_encoder").read_bytes() == b"encoder weights"
    with pytest.raises(FileNotFoundError, match="model file not found: .*nope.pth"):
        build_avatar(image=PHOTO, avatar="other", root=root, model=tmp_path / "nope.pth")


def test_bad_input_leaves_nothing_behind(tmp_path: Path) -> None:
    blank = tmp_path / "wall.png"
    cv2.imwrite(str(blank), np.full((240, 320, 3), 128, np.uint8))
    root = tmp_path / "avatars"
    with pytest.raises(ValueError, match="wall.png: no face found"):
        build_avatar(image=blank, avatar="wall", root=root)
    with pytest.raises(ValueError, match="avatar id must match"):
        build_avatar(image=PHOTO, avatar="../evil", root=root)
    with pytest.raises(ValueError, match="exactly one of image or video"):
        build_avatar(image=PHOTO, video=PHOTO, avatar="x", root=root)
    with pytest.raises(FileNotFoundError, match="image not found"):
        build_avatar(image=tmp_path / "none.jpg", avatar="x", root=root)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a video")
    with pytest.raises(ValueError, match="notes.txt: not a readable video"):
        build_avatar(video=notes, avatar="x", root=root)
    with pytest.raises(ValueError, match="wall.png: no face in any of the 1 frames"):
        build_avatar(video=blank, avatar="x", root=root)  # OpenCV reads a picture as a one-frame clip
    with pytest.raises(ValueError, match="seconds must be"):
        build_avatar(image=PHOTO, avatar="x", root=root, seconds=0)
    assert leftovers(root) == []


def test_a_crash_mid_build_leaves_no_avatar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = prepare.write_frame

    def failing_write(folder: Path, index: int, frame: np.ndarray) -> None:
        if index == 3:
            raise OSError("disk full")
        real_write(folder, index, frame)

    monkeypatch.setattr(prepare, "write_frame", failing_write)
    with pytest.raises(OSError, match="disk full"):
        build_avatar(image=PHOTO, avatar="eileen", root=tmp_path, seconds=0.4)
    assert leftovers(tmp_path) == []
    assert AvatarStore(tmp_path).ids() == []


def test_existing_avatars_are_only_replaced_on_request(tmp_path: Path) -> None:
    build_avatar(image=PHOTO, avatar="eileen", root=tmp_path, seconds=0.08)
    with pytest.raises(FileExistsError, match="already exists"):
        build_avatar(image=PHOTO, avatar="eileen", root=tmp_path, seconds=0.04)
    manifest = build_avatar(image=PHOTO, avatar="eileen", root=tmp_path, seconds=0.04, replace=True)
    assert manifest.frame_count == 1 == AvatarStore(tmp_path).manifest("eileen").frame_count
    assert leftovers(tmp_path) == ["eileen"]


def test_default_avatar_is_built_once(tmp_path: Path) -> None:
    root = tmp_path / "avatars"
    manifest = ensure_default_avatar(root)
    assert (manifest.id, manifest.frame_count, manifest.source) == (DEFAULT_AVATAR, 100, "photo")
    stamp = (root / DEFAULT_AVATAR / "manifest.json").stat().st_mtime_ns
    assert ensure_default_avatar(root) == manifest
    assert (root / DEFAULT_AVATAR / "manifest.json").stat().st_mtime_ns == stamp  # not rebuilt
    assert AvatarStore(root).ids() == [DEFAULT_AVATAR]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "avatars"
    caplog.set_level("INFO")
    assert prepare_main(["--image", str(PHOTO), "--id", "eileen", "--root", str(root), "--seconds", "0.2"]) == 0
    assert "built avatar 'eileen'" in caplog.text and "5 frames 640x480" in caplog.text
    assert prepare_main(["--image", str(PHOTO), "--id", "eileen", "--root", str(root)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "already exists" in error
    assert prepare_main(["--image", str(tmp_path / "none.jpg"), "--id", "x", "--root", str(root)]) == 2
    assert "image not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        prepare_main(["--image", str(PHOTO), "--id", "../x", "--root", str(root)])
    assert info.value.code == 2
    assert leftovers(root) == ["eileen"]
