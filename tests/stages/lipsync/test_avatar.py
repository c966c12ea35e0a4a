"""Avatar folders: ping-pong order, ids that can never become paths, and clear errors for broken files."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from stages.lipsync.avatar import (
    AVATAR_ID,
    AvatarStore,
    BadAvatar,
    Manifest,
    UnknownAvatar,
    pingpong,
)

WIDTH, HEIGHT = 64, 48


def frame_colour(index: int) -> tuple[int, int, int]:
    """A distinct flat RGB colour per frame (JPEG keeps flat colours within a level or two)."""
    return (200, (index * 40) % 256, 30)


def write_avatar(root: Path, avatar: str, frames: int = 4, **manifest_fields) -> Path:
    """A small valid avatar folder written by hand (independent of prepare.py)."""
    folder = root / avatar
    (folder / "frames").mkdir(parents=True)
    for k in range(frames):
        rgb = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
        rgb[:] = frame_colour(k)
        cv2.imwrite(str(folder / "frames" / f"{k:06d}.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
    manifest = Manifest(id=avatar, frame_count=frames, width=WIDTH, height=HEIGHT, **manifest_fields)
    (folder / "manifest.json").write_text(manifest.to_json())
    (folder / "crop_rects.json").write_text(json.dumps([[10 + k % 2, 4, 42 + k % 2, 36] for k in range(frames)]))
    return folder


@pytest.fixture
def store(tmp_path: Path) -> AvatarStore:
    write_avatar(tmp_path, "anna")
    write_avatar(tmp_path, "bob_2", frames=1)
    return AvatarStore(tmp_path)


def test_pingpong_plays_forward_then_back() -> None:
    assert [pingpong(i, 4) for i in range(13)] == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0]
    assert [pingpong(i, 2) for i in range(5)] == [0, 1, 0, 1, 0]
    assert [pingpong(i, 1) for i in range(3)] == [0, 0, 0]
    n = 7
    sequence = [pingpong(i, n) for i in range(200)]
    assert all(abs(a - b) == 1 for a, b in itertools.pairwise(sequence))  # never a jump cut
    with pytest.raises(ValueError, match="n >= 1"):
        pingpong(0, 0)
    with pytest.raises(ValueError, match=">= 0"):
        pingpong(-1, 3)


def test_ids_lists_only_avatar_folders(store: AvatarStore, tmp_path: Path) -> None:
    (tmp_path / ".build-anna-x1").mkdir()           # a build in progress
    (tmp_path / "Upper").mkdir()                    # not an allowed id
    (tmp_path / "empty").mkdir()                    # no manifest
    (tmp_path / "notes.txt").write_text("x")
    assert store.ids() == ["anna", "bob_2"]
    assert AvatarStore(tmp_path / "missing").ids() == []


@pytest.mark.parametrize("bad", ["..", ".", "../anna", "/etc", "anna/..", "a/b", "", "Anna", "anna ", "-x", "_x",
                                 "x" * 65, "anna\x00", "c:", "anna.json", "%2e%2e"])
def test_ids_never_become_paths(store: AvatarStore, bad: str) -> None:
    assert not AVATAR_ID.fullmatch(bad)
    with pytest.raises(UnknownAvatar, match="not allowed"):
        store.folder(bad)
    with pytest.raises(UnknownAvatar):
        store.manifest(bad)


def test_non_string_ids_and_absolute_paths_are_rejected(store: AvatarStore, tmp_path: Path) -> None:
    for bad in (None, 3, ["anna"], str(tmp_path / "anna"), Path("anna")):
        with pytest.raises(UnknownAvatar):
            store.folder(bad)  # type: ignore[arg-type]


def test_unknown_id_is_a_lookup_error(store: AvatarStore) -> None:
    with pytest.raises(LookupError, match="unknown avatar 'carol'"):
        store.manifest("carol")


def test_symlinks_must_stay_inside_the_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    write_avatar(outside, "evil")
    write_avatar(root, "anna")
    os.symlink(outside / "evil", root / "evil")
    os.symlink(root / "anna", root / "alias")
    store = AvatarStore(root)
    with pytest.raises(UnknownAvatar, match="links outside"):
        store.folder("evil")
    assert store.folder("alias") == root / "alias"  # a link that stays inside the root is followed
    assert "evil" not in store.ids()


def test_manifest_and_rects_are_read_and_validated(store: AvatarStore) -> None:
    manifest = store.manifest("anna")
    assert (manifest.id, manifest.fps, manifest.frame_count, manifest.width, manifest.height) == ("anna", 25, 4, 64, 48)
    assert manifest.model is None and manifest.audio_mode == "ave"
    rects = store.crop_rects("anna")
    assert rects.dtype == np.int32 and rects.shape == (4, 4)
    assert rects.tolist()[1] == [11, 4, 43, 36]
    assert not rects.flags.writeable


def test_read_frame_is_rgb(store: AvatarStore) -> None:
    frame = store.read_frame("anna", 2)
    assert frame.shape == (HEIGHT, WIDTH, 3) and frame.dtype == np.uint8
    assert np.abs(frame.reshape(-1, 3).mean(0) - frame_colour(2)).max() < 3  # R first
    with pytest.raises(IndexError, match="outside 0..3"):
        store.read_frame("anna", 4)
    with pytest.raises(IndexError):
        store.read_frame("anna", -1)


def rewrite_manifest(folder: Path, **changes) -> None:
    data = json.loads((folder / "manifest.json").read_text())
    data.update(changes)
    (folder / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize("changes, message", [
    ({"frame_count": 0}, "frame_count must be an integer in 1.."),
    ({"frame_count": "4"}, "frame_count must be an integer"),
    ({"width": 64.0}, "width must be an integer"),
    ({"fps": 30}, "fps must be an integer in 25..25"),
    ({"audio_mode": "hubert"}, "audio_mode must be one of"),
    ({"source": "webcam"}, "source must be one of"),
    ({"model": "../x.pth"}, "model must be null or a file name"),
    ({"model": "unet.pth"}, "unet.pth: missing"),
    ({"id": "bob_2"}, "does not match the folder name"),
    ({"extra": 1}, "unknown fields \\['extra'\\]"),
    ({"mouth": [1, 2]}, "mouth must be null or"),
])
def test_broken_manifest_names_file_and_field(tmp_path: Path, changes: dict, message: str) -> None:
    folder = write_avatar(tmp_path, "anna")
    rewrite_manifest(folder, **changes)
    with pytest.raises(BadAvatar, match=message) as info:
        AvatarStore(tmp_path).manifest("anna")
    assert str(folder / "manifest.json") in str(info.value) or "unet.pth" in str(info.value)


def test_unreadable_or_missing_manifest(tmp_path: Path) -> None:
    folder = write_avatar(tmp_path, "anna")
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(BadAvatar, match=f"{folder / 'manifest.json'}: not readable JSON"):
        AvatarStore(tmp_path).manifest("anna")
    (folder / "manifest.json").unlink()
    with pytest.raises(BadAvatar, match="manifest.json: missing"):
        AvatarStore(tmp_path).manifest("anna")
    (folder / "manifest.json").write_text('{"id": "anna"}')
    with pytest.raises(BadAvatar, match="missing fields \\['frame_count', 'height', 'width'\\]"):
        AvatarStore(tmp_path).manifest("anna")


def test_missing_frames_name_the_file(tmp_path: Path) -> None:
    folder = write_avatar(tmp_path, "anna")
    (folder / "frames" / "000003.jpg").unlink()
    with pytest.raises(BadAvatar, match="000003.jpg: missing .*says 4 frames"):
        AvatarStore(tmp_path).manifest("anna")
    write_avatar(tmp_path, "bob")
    (tmp_path / "bob" / "frames" / "000001.jpg").unlink()  # a middle frame: found when read
    store = AvatarStore(tmp_path)
    store.manifest("bob")
    with pytest.raises(BadAvatar, match="000001.jpg: missing"):
        store.read_frame("bob", 1)
    (tmp_path / "bob" / "frames" / "000002.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(BadAvatar, match="000002.jpg: not a readable image"):
        store.read_frame("bob", 2)


def test_frame_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    folder = write_avatar(tmp_path, "anna")
    cv2.imwrite(str(folder / "frames" / "000001.jpg"), np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(BadAvatar, match="000001.jpg: 10x10, but the manifest says 64x48"):
        AvatarStore(tmp_path).read_frame("anna", 1)


@pytest.mark.parametrize("rects, message", [
    ([[0, 0, 8, 8]] * 3, "expected a list of 4"),
    ([[0, 0, 8, 8]] * 3 + [[0, 0, 8, 9]], "entry 3 \\[0, 0, 8, 9\\] is not a square"),
    ([[0, 0, 8, 8]] * 3 + [[60, 0, 68, 8]], "entry 3 .* inside the 64x48 frame"),
    ([[0, 0, 8, 8]] * 3 + [[0, 0, 8.0, 8]], "entry 3 must be four integers"),
    ({"rects": []}, "expected a list of 4"),
])
def test_broken_crop_rects_name_the_file(tmp_path: Path, rects: object, message: str) -> None:
    folder = write_avatar(tmp_path, "anna")
    (folder / "crop_rects.json").write_text(json.dumps(rects))
    with pytest.raises(BadAvatar, match=message) as info:
        AvatarStore(tmp_path).crop_rects("anna")
    assert str(folder / "crop_rects.json") in str(info.value)


def test_cache_follows_a_rewritten_manifest(store: AvatarStore, tmp_path: Path) -> None:
    assert store.manifest("anna").source == "photo"
    rewrite_manifest(tmp_path / "anna", source="video", frame_count=3)
    os.utime(tmp_path / "anna" / "manifest.json", ns=(1, 1))  # a distinct mtime even on coarse clocks
    assert store.manifest("anna").source == "video"


def test_model_files_are_resolved_inside_the_folder(tmp_path: Path) -> None:
    folder = write_avatar(tmp_path, "anna", model="unet.pth")
    (folder / "unet.pth").write_bytes(b"weights")
    store = AvatarStore(tmp_path)
    assert store.model_file("anna") == folder / "unet.pth"
    assert store.model_file("anna", "audio_encoder") is None
