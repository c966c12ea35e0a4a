"""Building an avatar folder from a photo or a video clip (``launch/prepare_avatar.py``).

A video gives the frames directly: read with OpenCV, resampled to the pipeline's 25 fps
(nearest source frame), at most ``seconds`` long, downscaled to ``max_side``. A photo
gives an idle sway: ``seconds`` x 25 frames of the same photo with the head moving a
little (sub-pixel translation, a fraction of a degree of rotation about the neck, a
breath of scale), warped inside a soft ellipse around the head so the background and
shoulders stay still. Every motion component is a cosine of an integer multiple of
pi t / T, so it starts and ends at rest: played ping-pong (forward, then back) the sway
has no jerk at the turn. The mouth is left as in the photo.

Crop rectangles come from MTCNN's five landmarks (``crop.rects_from_landmarks``): every
video frame is detected (on a copy downscaled to ``DETECT_SIDE`` for speed); for a photo
the face is detected once and its landmarks moved with each frame's warp, which is exact
and costs nothing. The builder also records where the mouth sits in the crop and where
the lips meet (``Manifest.mouth``) for the non-neural mouth.

Builds are atomic: everything is written into a hidden temporary folder next to the
target (same file system) and renamed into place at the end, so a crash never leaves a
half-built avatar under a valid id (hidden folders never match ``AVATAR_ID``). Stale
temporary folders of crashed builds are removed by later builds.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import cv2
import numpy as np

from stages.lipsync.avatar import (
    AVATAR_ID,
    CROP_RECTS,
    FRAMES,
    MANIFEST,
    VIDEO_FPS,
    AvatarStore,
    Manifest,
    UnknownAvatar,
    frame_name,
)
from stages.lipsync.crop import cut_crop, mouth_in_crop, rects_from_landmarks
from stages.lipsync.mouth_synth import find_lip_line

log = logging.getLogger(__name__)

DEFAULT_AVATAR = "astronaut"
DEFAULT_PHOTO_NAME = "astronaut_640x480.jpg"
DEFAULT_PHOTOS = (Path(__file__).resolve().parent / "assets" / DEFAULT_PHOTO_NAME,)
"""Where the default avatar's photo (scikit-image's public-domain astronaut, Eileen
Collins, NASA; provenance in assets/PROVENANCE.md) is looked for: shipped with the package."""
DEFAULT_SECONDS = 4.0
"""Length of the default avatar's sway: 100 frames, an 8 s loop when played ping-pong."""
JPEG_QUALITY = 92
MAX_SIDE = 720
"""Frames larger than this (longer side, px) are downscaled."""
MAX_SECONDS = 600.0
"""Longest avatar accepted (15 000 frames)."""
DETECT_SIDE = 480
"""Video frames are downscaled to this longer side for face detection (landmarks scaled back)."""
DETECT_BATCH = 16
STALE_BUILD_S = 3600.0
"""Temporary build folders older than this are leftovers of a crash and are removed."""
MODEL_FILE, AUDIO_ENCODER_FILE = "unet.pth", "audio_encoder.pth"
"""Names the model files get inside the avatar folder (never a name taken from the input)."""

SWAY_SHIFT = 0.025
"""Head translation amplitude in inter-ocular distances (~1.4 px for a 54 px face)."""
SWAY_DEGREES = 0.6
SWAY_BREATH = 0.004
"""Relative scale change of the breathing component."""


def default_photo() -> Path:
    for path in DEFAULT_PHOTOS:
        if path.is_file():
            return path
    raise FileNotFoundError(f"the default avatar's photo {DEFAULT_PHOTO_NAME} is missing; looked in "
                            + ", ".join(str(p.parent) for p in DEFAULT_PHOTOS))


def downscale(frame: np.ndarray, max_side: int) -> np.ndarray:
    height, width = frame.shape[:2]
    if max(height, width) <= max_side:
        return frame
    scale = max_side / max(height, width)
    size = (max(16, round(width * scale)), max(16, round(height * scale)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


def write_frame(folder: Path, index: int, frame_rgb: np.ndarray) -> None:
    path = folder / frame_name(index)
    if not cv2.imwrite(str(path), cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
        raise OSError(f"could not write {path}")


class FaceFinder:
    """MTCNN on frames, one face per frame: the largest in the first frame, then the one
    nearest the previous choice (a second face passing by does not steal the crop)."""

    def __init__(self, detect_side: int = DETECT_SIDE) -> None:
        # Imported here: only a build needs the detector and its weights.
        from stages.vision.mtcnn import MTCNN

        self.detector = MTCNN()
        self.detect_side = detect_side
        self.previous: np.ndarray | None = None

    def landmarks(self, frames: list[np.ndarray]) -> np.ndarray:
        """``[len(frames), 5, 2]`` landmarks in the frames' pixels, NaN where no face was found."""
        out = np.full((len(frames), 5, 2), np.nan)
        if not frames:
            return out
        small = [downscale(f, self.detect_side) for f in frames]
        # Per-axis factors (the downscaled size is rounded); continuous coordinates scale exactly.
        scale = np.array([small[0].shape[1] / frames[0].shape[1], small[0].shape[0] / frames[0].shape[0]])
        for i, faces in enumerate(self.detector.detect(small)):
            if not faces:
                continue
            marks = [np.asarray(face.landmarks, dtype=np.float64) / scale for face in faces]
            if self.previous is None:
                chosen = marks[0]  # detect() sorts largest first
            else:
                chosen = min(marks, key=lambda m: float(np.linalg.norm(m.mean(0) - self.previous.mean(0))))
            out[i] = self.previous = chosen
        return out


def sway_matrices(count: int, landmarks: np.ndarray) -> list[np.ndarray]:
    """2x3 affine matrices of the idle sway, one per frame; see the module docstring."""
    eyes, mouth = landmarks[:2].mean(0), landmarks[3:].mean(0)
    iod = float(np.linalg.norm(landmarks[1] - landmarks[0]))
    pivot = (float(mouth[0]), float(mouth[1] + 0.9 * (mouth[1] - eyes[1])))  # about the neck
    shift = SWAY_SHIFT * iod
    matrices = []
    for k in range(count):
        u = k / (count - 1) if count > 1 else 0.0
        angle = SWAY_DEGREES * (0.6 * math.cos(2 * math.pi * u) + 0.4 * math.cos(math.pi * u))
        scale = 1.0 + SWAY_BREATH * math.cos(2 * math.pi * u)
        m = cv2.getRotationMatrix2D(pivot, angle, scale)
        m[0, 2] += shift * (0.7 * math.cos(math.pi * u) + 0.3 * math.cos(3 * math.pi * u))
        m[1, 2] += 0.5 * shift * math.cos(2 * math.pi * u)
        matrices.append(m)
    return matrices


def head_mask(shape: tuple[int, ...], landmarks: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Soft ellipse (float32 0..1) over head and hair, and its bounding box (x0, y0, x1, y1):
    where the sway moves pixels; the rest of the photo stays still."""
    height, width = shape[:2]
    eyes, mouth = landmarks[:2].mean(0), landmarks[3:].mean(0)
    iod = float(np.linalg.norm(landmarks[1] - landmarks[0]))
    face = max(iod, float(np.linalg.norm(mouth - eyes)))
    centre = (float(eyes[0]), float(eyes[1] + 0.2 * face))
    axes = (1.9 * face, 2.6 * face)
    soft = 0.5 * face
    x0, x1 = max(0, int(centre[0] - axes[0] - 2 * soft)), min(width, int(centre[0] + axes[0] + 2 * soft) + 1)
    y0, y1 = max(0, int(centre[1] - axes[1] - 2 * soft)), min(height, int(centre[1] + axes[1] + 2 * soft) + 1)
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    r = np.sqrt(((xs + 0.5 - centre[0]) / axes[0]) ** 2 + ((ys + 0.5 - centre[1]) / axes[1]) ** 2)
    t = np.clip((1.0 - r) * min(axes) / soft + 0.5, 0.0, 1.0)  # ramp of width ``soft`` across the ellipse
    return (t * t * (3 - 2 * t)).astype(np.float32), (x0, y0, x1, y1)


def photo_frames(image: Path, frames_dir: Path, count: int, max_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Writes the sway frames; returns their landmarks ``[count, 5, 2]`` and (width, height)."""
    bgr = cv2.imread(str(image), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{image}: not a readable image")
    photo = downscale(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), max_side)
    marks = FaceFinder(detect_side=max(photo.shape[:2])).landmarks([photo])[0]  # one image: full resolution
    if np.isnan(marks).any():
        raise ValueError(f"{image}: no face found (MTCNN, faces of at least 40 px)")
    mask, (x0, y0, x1, y1) = head_mask(photo.shape, marks)
    weight = mask[..., None]
    still = photo[y0:y1, x0:x1].astype(np.float32) * (1.0 - weight)
    landmarks = np.empty((count, 5, 2))
    for k, m in enumerate(sway_matrices(count, marks)):
        local = m.copy()
        local[:, 2] -= (x0, y0)  # render only the mask's box: output (x, y) is frame (x + x0, y + y0)
        moved = cv2.warpAffine(photo, local, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT_101)
        frame = photo.copy()
        frame[y0:y1, x0:x1] = np.clip(moved * weight + still + 0.5, 0, 255).astype(np.uint8)
        write_frame(frames_dir, k, frame)
        landmarks[k] = marks @ m[:, :2].T + m[:, 2]
    return landmarks, (photo.shape[1], photo.shape[0])


def video_frames(video: Path, frames_dir: Path, max_frames: int, max_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Writes the clip's frames resampled to 25 fps; returns landmarks ``[N, 5, 2]`` (NaN where
    no face) and (width, height)."""
    capture = cv2.VideoCapture(str(video))
    if not capture.isOpened():
        raise ValueError(f"{video}: not a readable video")
    fps = capture.get(cv2.CAP_PROP_FPS)
    if not (math.isfinite(fps) and 1.0 <= fps <= 240.0):
        log.warning("%s: frame rate %r unknown, assuming %d fps", video, fps, VIDEO_FPS)
        fps = float(VIDEO_FPS)
    finder, pending, parts = FaceFinder(), [], []
    size: tuple[int, int] | None = None
    written = source_index = 0
    try:
        while written < max_frames:
            ok, bgr = capture.read()
            if not ok:
                break
            frame: np.ndarray | None = None
            # Output frame k shows the source frame nearest to its time k / 25 s.
            while written < max_frames and round(written * fps / VIDEO_FPS) == source_index:
                if frame is None:
                    frame = downscale(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), max_side)
                    if size is None:
                        size = (frame.shape[1], frame.shape[0])
                    elif (frame.shape[1], frame.shape[0]) != size:
                        raise ValueError(f"{video}: frame size changes mid-clip at source frame {source_index}")
                write_frame(frames_dir, written, frame)
                pending.append(frame)
                written += 1
                if len(pending) == DETECT_BATCH:
                    parts.append(finder.landmarks(pending))
                    pending = []
            source_index += 1
    finally:
        capture.release()
    if written == 0 or size is None:
        raise ValueError(f"{video}: no frames could be decoded")
    parts.append(finder.landmarks(pending))
    return np.concatenate(parts), size


def sweep_stale(root: Path) -> None:
    """Removes temporary build folders left by crashed builds (hidden, older than STALE_BUILD_S)."""
    now = time.time()
    for entry in root.glob(".build-*"):
        try:
            if entry.is_dir() and not entry.is_symlink() and now - entry.stat().st_mtime > STALE_BUILD_S:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def build_avatar(*, image: Path | None = None, video: Path | None = None, avatar: str, root: Path,
                 seconds: float | None = DEFAULT_SECONDS, model: Path | None = None,
                 audio_encoder: Path | None = None, max_side: int = MAX_SIDE, replace: bool = False) -> Manifest:
    """Builds ``root/avatar`` from a photo (idle sway of ``seconds``) or a video (at most
    ``seconds``; None = the whole clip, up to MAX_SECONDS); returns its manifest.

    ``model`` / ``audio_encoder`` are copied in as ``unet.pth`` / ``audio_encoder.pth``
    (not loaded here). An existing avatar is only replaced with ``replace``
    (FileExistsError otherwise). Bad input raises ValueError or FileNotFoundError naming it.
    """
    if (image is None) == (video is None):
        raise ValueError("give exactly one of image or video")
    if not isinstance(avatar, str) or not AVATAR_ID.fullmatch(avatar):
        raise ValueError(f"avatar id must match {AVATAR_ID.pattern} (lower-case letters, digits, '_', '-'), "
                         f"got {avatar!r}")
    if seconds is None:
        seconds = DEFAULT_SECONDS if image is not None else MAX_SECONDS
    if not (isinstance(seconds, (int, float)) and 0 < seconds <= MAX_SECONDS):
        raise ValueError(f"seconds must be in (0, {MAX_SECONDS:g}], got {seconds!r}")
    if type(max_side) is not int or not 64 <= max_side <= 4096:
        raise ValueError(f"max_side must be an integer in 64..4096, got {max_side!r}")
    source = Path(image if image is not None else video)
    if not source.is_file():
        raise FileNotFoundError(f"{'image' if image is not None else 'video'} not found: {source}")
    for what, path in (("model", model), ("audio encoder", audio_encoder)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{what} file not found: {path}")
        if path is not None and Path(path).stat().st_size == 0:
            raise ValueError(f"{what} file is empty: {path}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / avatar
    if (target.exists() or target.is_symlink()) and not replace:
        raise FileExistsError(f"avatar folder already exists: {target} (replace it with --force)")
    sweep_stale(root)
    count = max(1, round(seconds * VIDEO_FPS))

    build = Path(tempfile.mkdtemp(prefix=f".build-{avatar}-", dir=root))
    try:
        build.chmod(0o755)  # mkdtemp makes it private; the avatar is read by other users' servers too
        frames_dir = build / FRAMES
        frames_dir.mkdir()
        if image is not None:
            landmarks, (width, height) = photo_frames(source, frames_dir, count, max_side)
        else:
            landmarks, (width, height) = video_frames(source, frames_dir, count, max_side)
        try:
            rects = rects_from_landmarks(landmarks, (width, height))
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        missing = int(np.isnan(landmarks).any(axis=(1, 2)).sum())
        if missing:
            log.info("%s: no face in %d of %d frames; their crops are interpolated", source, missing, len(rects))
        mouth = mouth_geometry(frames_dir, landmarks, rects)
        if model is not None:
            shutil.copyfile(model, build / MODEL_FILE)
        if audio_encoder is not None:
            shutil.copyfile(audio_encoder, build / AUDIO_ENCODER_FILE)
        manifest = Manifest(id=avatar, frame_count=len(rects), width=width, height=height,
                            model=MODEL_FILE if model is not None else None,
                            audio_encoder=AUDIO_ENCODER_FILE if audio_encoder is not None else None,
                            source="photo" if image is not None else "video", mouth=mouth)
        (build / CROP_RECTS).write_text("[" + ",\n ".join(str(r) for r in rects.tolist()) + "]\n", encoding="utf-8")
        (build / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
        publish(build, target, replace)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return manifest


def mouth_geometry(frames_dir: Path, landmarks: np.ndarray, rects: np.ndarray) -> tuple[float, float, float, float]:
    """(centre x, corner-line y, width, lip-line y) of the mouth in 328-crop pixels: the
    landmarks' median, and the lip line found in up to five frames spread over the clip."""
    cx, cy, width = mouth_in_crop(landmarks, rects)
    known = np.flatnonzero(~np.isnan(landmarks).any(axis=(1, 2)))
    picks = known[np.linspace(0, len(known) - 1, min(5, len(known))).round().astype(int)]
    lips = []
    for k in picks:
        frame = cv2.cvtColor(cv2.imread(str(frames_dir / frame_name(int(k)))), cv2.COLOR_BGR2RGB)
        lips.append(find_lip_line(cut_crop(frame, rects[k]), (cx, cy, width)))
    return cx, cy, width, round(float(np.median(lips)), 1)


def publish(build: Path, target: Path, replace: bool) -> None:
    """Renames the finished build to ``target``; with ``replace`` an existing avatar is moved
    aside first and deleted after (the id is missing for an instant, never half-built)."""
    old = None
    if replace and (target.exists() or target.is_symlink()):
        old = target.with_name(f".build-old-{target.name}-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    try:
        os.rename(build, target)
    except OSError as e:
        if target.exists():  # someone else published the same id in the meantime
            raise FileExistsError(f"avatar folder already exists: {target}") from e
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def ensure_default_avatar(root: Path) -> Manifest:
    """The default 'astronaut' avatar under ``root``, built from the shipped photo if it is
    missing (idempotent; safe when several processes start at once: one build wins, the
    others use it). A present but broken one raises BadAvatar naming the file."""
    store = AvatarStore(Path(root))
    try:
        return store.manifest(DEFAULT_AVATAR)
    except UnknownAvatar:
        pass
    started = time.perf_counter()
    try:
        manifest = build_avatar(image=default_photo(), avatar=DEFAULT_AVATAR, root=Path(root), seconds=DEFAULT_SECONDS)
    except FileExistsError:
        return AvatarStore(Path(root)).manifest(DEFAULT_AVATAR)
    log.info("built the default avatar %r in %s (%d frames, %.1f s)", DEFAULT_AVATAR, Path(root) / DEFAULT_AVATAR,
             manifest.frame_count, time.perf_counter() - started)
    return manifest
