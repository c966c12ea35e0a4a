"""Avatars on disk: the folder layout, the manifest, and the only way to find one by id.

An avatar is a folder directly under the avatar root::

    <root>/<id>/manifest.json      Manifest below (fps, size, frame count, model files)
    <root>/<id>/crop_rects.json    [[x1, y1, x2, y2], ...]: one square crop per frame
    <root>/<id>/frames/000000.jpg  the frames, RGB when read, played ping-pong
    <root>/<id>/unet.pth, audio_encoder.pth   optional model files named by the manifest

Ids come from clients (``avatar.select``), so nothing a client sends ever becomes a path
by itself: an id must fully match ``AVATAR_ID`` (no dots, slashes or upper case: '..',
'/x' and 'C:' cannot match) and name a folder that exists directly under the root; a
symlink there is followed only if it stays inside the root. File names inside the folder
are fixed here or checked against ``FILE_NAME``. Everything read from disk is validated
and every error names the file and the field.

``AvatarStore`` caches manifests and rectangles keyed by the files' modification time
and size, so the per-frame ``read_frame`` does not re-parse JSON and a rebuilt avatar is
picked up.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import cv2
import numpy as np

AVATAR_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
"""Allowed avatar ids (``fullmatch``); the folder name under the root."""
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
"""Allowed names of model files inside an avatar folder (no separators, no leading dot)."""
MANIFEST, CROP_RECTS, FRAMES = "manifest.json", "crop_rects.json", "frames"
VIDEO_FPS = 25
"""The pipeline's video rate (640 audio samples per frame at 16 kHz): every avatar plays at it."""
AUDIO_MODES = ("ave",)
"""Audio front ends the pipeline implements (SyncTalk_2D's 'ave' encoder)."""
SOURCES = ("video", "photo")


class UnknownAvatar(LookupError):
    """No avatar with this id (or the id is not an allowed one)."""


class BadAvatar(ValueError):
    """The avatar exists but its files are missing or malformed; the message names the file."""


def frame_name(index: int) -> str:
    return f"{index:06d}.jpg"


@dataclass(kw_only=True)
class Manifest:
    """``manifest.json``: what an avatar is and how to play it."""

    id: str
    fps: int = VIDEO_FPS
    frame_count: int
    width: int
    height: int
    audio_mode: str = "ave"
    model: str | None = None
    """File name of the U-Net weights inside the folder, or None (no trained model: the
    non-neural mouth is used)."""
    audio_encoder: str | None = None
    """File name of the audio encoder weights inside the folder, or None (the shared one)."""
    source: str = "photo"
    crop_size: int = 328
    mouth: tuple[float, float, float, float] | None = None
    """Mouth centre x, mouth-corner line y, corner-to-corner width and the y where the lips
    meet at the centre, in 328-crop pixels (medians over frames): ``MouthSynth(mouth=...)``.
    None in hand-made manifests (``crop.DEFAULT_MOUTH`` is used)."""

    def to_json(self) -> str:
        data = asdict(self)
        data["mouth"] = list(self.mouth) if self.mouth is not None else None
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: object, where: str) -> Manifest:
        """Validated manifest from parsed JSON; ``where`` (the file) starts every error."""
        if not isinstance(data, dict):
            raise BadAvatar(f"{where}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unexpected = sorted(set(data) - known)
        if unexpected:
            raise BadAvatar(f"{where}: unknown fields {unexpected}; allowed: {sorted(known)}")
        missing = sorted(name for name in ("id", "frame_count", "width", "height") if name not in data)
        if missing:
            raise BadAvatar(f"{where}: missing fields {missing}")

        def integer(name: str, low: int, high: int) -> None:
            value = data.get(name)
            if name in data and (type(value) is not int or not low <= value <= high):
                raise BadAvatar(f"{where}: {name} must be an integer in {low}..{high}, got {value!r}")

        integer("frame_count", 1, 1_000_000)
        integer("width", 16, 16_384)
        integer("height", 16, 16_384)
        integer("fps", VIDEO_FPS, VIDEO_FPS)
        integer("crop_size", 328, 328)
        if not isinstance(data["id"], str) or not AVATAR_ID.fullmatch(data["id"]):
            raise BadAvatar(f"{where}: id must match {AVATAR_ID.pattern}, got {data['id']!r}")
        if data.get("audio_mode", "ave") not in AUDIO_MODES:
            raise BadAvatar(f"{where}: audio_mode must be one of {list(AUDIO_MODES)}, got {data['audio_mode']!r}")
        if data.get("source", "photo") not in SOURCES:
            raise BadAvatar(f"{where}: source must be one of {list(SOURCES)}, got {data['source']!r}")
        for name in ("model", "audio_encoder"):
            value = data.get(name)
            if value is not None and (not isinstance(value, str) or not FILE_NAME.fullmatch(value)):
                raise BadAvatar(f"{where}: {name} must be null or a file name matching {FILE_NAME.pattern}, "
                                f"got {value!r}")
        mouth = data.get("mouth")
        if mouth is not None:
            if (not isinstance(mouth, list) or len(mouth) != 4
                    or not all(type(v) in (int, float) and 0 <= v <= 328 for v in mouth)):
                raise BadAvatar(f"{where}: mouth must be null or [x, corner_y, width, lip_y] in 0..328, "
                                f"got {mouth!r}")
            data = {**data, "mouth": tuple(float(v) for v in mouth)}
        return cls(**data)


def pingpong(i: int, n: int) -> int:
    """Avatar frame for video frame ``i`` of an ``n``-frame avatar: 0, 1, .., n-1, n-2, .., 1, 0, 1, ..

    Playing forward then backward loops any clip without a jump cut."""
    if n < 1:
        raise ValueError(f"pingpong needs n >= 1 frames, got {n}")
    if i < 0:
        raise ValueError(f"pingpong needs a video frame index >= 0, got {i}")
    if n == 1:
        return 0
    period = 2 * n - 2
    r = i % period
    return r if r < n else period - r


def load_rects(path: Path, manifest: Manifest) -> np.ndarray:
    """``crop_rects.json`` as ``[N, 4]`` int32, checked against the manifest (one square per
    frame, inside the frame)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadAvatar(f"{path}: missing (one crop rectangle per frame)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadAvatar(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, list) or len(data) != manifest.frame_count:
        got = f"{len(data)} entries" if isinstance(data, list) else type(data).__name__
        raise BadAvatar(f"{path}: expected a list of {manifest.frame_count} [x1, y1, x2, y2] (frame_count), got {got}")
    for i, rect in enumerate(data):
        if not isinstance(rect, list) or len(rect) != 4 or not all(type(v) is int for v in rect):
            raise BadAvatar(f"{path}: entry {i} must be four integers [x1, y1, x2, y2], got {rect!r}")
        x1, y1, x2, y2 = rect
        if not (0 <= x1 < x2 <= manifest.width and 0 <= y1 < y2 <= manifest.height and x2 - x1 == y2 - y1):
            raise BadAvatar(f"{path}: entry {i} {rect} is not a square inside the "
                            f"{manifest.width}x{manifest.height} frame")
    return np.asarray(data, dtype=np.int32).reshape(-1, 4)


class AvatarStore:
    """The avatars under one root folder; thread-safe."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self._manifests: dict[str, tuple[tuple[int, int], Manifest]] = {}
        self._rects: dict[str, tuple[tuple[int, int], np.ndarray]] = {}

    def ids(self) -> list[str]:
        """Ids of the folders under the root that are avatars (have a manifest), sorted.
        Other entries (temporary build folders start with '.') are ignored."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in os.scandir(self.root):
            if AVATAR_ID.fullmatch(entry.name):
                try:
                    folder = self.folder(entry.name)
                except UnknownAvatar:
                    continue
                if (folder / MANIFEST).is_file():
                    found.append(entry.name)
        return sorted(found)

    def folder(self, avatar: str) -> Path:
        """The folder of ``avatar``; UnknownAvatar unless the id is allowed and names a
        folder directly under the root (or a symlink resolving inside the root)."""
        if not isinstance(avatar, str) or not AVATAR_ID.fullmatch(avatar):
            shown = repr(avatar[:80]) if isinstance(avatar, str) else type(avatar).__name__
            raise UnknownAvatar(f"avatar id {shown} is not allowed (ids match {AVATAR_ID.pattern})")
        folder = self.root / avatar
        if not folder.is_dir():
            raise UnknownAvatar(f"unknown avatar {avatar!r} (no folder {folder})")
        if folder.is_symlink():
            root = self.root.resolve()
            if not folder.resolve().is_relative_to(root):
                raise UnknownAvatar(f"avatar {avatar!r}: {folder} links outside the avatar root {root}")
        return folder

    def manifest(self, avatar: str) -> Manifest:
        """The validated manifest (cached until the file changes); BadAvatar names the file."""
        path = self.folder(avatar) / MANIFEST
        key = file_key(path)
        with self._lock:
            cached = self._manifests.get(avatar)
            if cached is not None and cached[0] == key:
                return cached[1]
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BadAvatar(f"{path}: missing (the avatar has no manifest)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadAvatar(f"{path}: not readable JSON ({e})") from e
        manifest = Manifest.from_dict(data, str(path))
        if manifest.id != avatar:
            raise BadAvatar(f"{path}: id {manifest.id!r} does not match the folder name {avatar!r}")
        frames = path.parent / FRAMES
        for index in (0, manifest.frame_count - 1):
            if not (frames / frame_name(index)).is_file():
                raise BadAvatar(f"{frames / frame_name(index)}: missing "
                                f"(manifest {path} says {manifest.frame_count} frames)")
        for name in (manifest.model, manifest.audio_encoder):
            if name is not None and not (path.parent / name).is_file():
                raise BadAvatar(f"{path.parent / name}: missing (named by {path})")
        with self._lock:
            self._manifests[avatar] = (key, manifest)
        return manifest

    def crop_rects(self, avatar: str) -> np.ndarray:
        """``[N, 4]`` int32 crop rectangles, one per frame (cached until the file changes; read-only)."""
        manifest = self.manifest(avatar)
        path = self.folder(avatar) / CROP_RECTS
        key = file_key(path)
        with self._lock:
            cached = self._rects.get(avatar)
            if cached is not None and cached[0] == key and len(cached[1]) == manifest.frame_count:
                return cached[1]
        rects = load_rects(path, manifest)
        rects.setflags(write=False)
        with self._lock:
            self._rects[avatar] = (key, rects)
        return rects

    def frame_path(self, avatar: str, index: int) -> Path:
        manifest = self.manifest(avatar)
        if (type(index) is not int and not isinstance(index, np.integer)) or not 0 <= index < manifest.frame_count:
            raise IndexError(f"avatar {avatar!r}: frame index {index!r} outside 0..{manifest.frame_count - 1}")
        return self.folder(avatar) / FRAMES / frame_name(int(index))

    def read_frame(self, avatar: str, index: int) -> np.ndarray:
        """Frame ``index`` as an H x W x 3 uint8 RGB array (decoded from disk every call:
        ``BackgroundCache`` keeps the hot ones)."""
        path = self.frame_path(avatar, index)
        manifest = self.manifest(avatar)
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            what = "missing" if not path.exists() else "not a readable image"
            raise BadAvatar(f"{path}: {what} (frame {index} of avatar {avatar!r})")
        if bgr.shape[:2] != (manifest.height, manifest.width):
            raise BadAvatar(f"{path}: {bgr.shape[1]}x{bgr.shape[0]}, but the manifest says "
                            f"{manifest.width}x{manifest.height}")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def model_file(self, avatar: str, which: str = "model") -> Path | None:
        """Path of the manifest's ``model`` or ``audio_encoder`` file, None when it names none."""
        if which not in ("model", "audio_encoder"):
            raise ValueError(f"which must be 'model' or 'audio_encoder', got {which!r}")
        name = getattr(self.manifest(avatar), which)
        return None if name is None else self.folder(avatar) / name

    def forget(self, avatar: str | None = None) -> None:
        """Drop cached manifests/rectangles (all, or one avatar's)."""
        with self._lock:
            for cache in (self._manifests, self._rects):
                if avatar is None:
                    cache.clear()
                else:
                    cache.pop(avatar, None)


def file_key(path: Path) -> tuple[int, int]:
    """(mtime_ns, size) of a file, (-1, -1) when it is missing: a cache key that changes on rewrite."""
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return (st.st_mtime_ns, st.st_size)
