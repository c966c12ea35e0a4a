"""Build a lip-sync avatar folder from a photo or a video clip.

    python launch/prepare_avatar.py --image me.jpg --id me
    python launch/prepare_avatar.py --video clip.mp4 --id anna --seconds 20 \\
        --model checkpoint/anna/195.pth --audio-encoder model/checkpoints/audio_visual_encoder.pth

The folder (``<root>/<id>/``) holds the frames (the clip resampled to 25 fps, or an idle
sway synthesised from the photo), one smoothed crop rectangle per frame from MTCNN's face
landmarks (``crop_rects.json``) and ``manifest.json``; a SyncTalk_2D U-Net and audio
encoder given here are copied in and named by the manifest. Without a model the avatar
speaks with the non-neural mouth. See ``stages/lipsync/prepare.py`` for how.

Bad input (missing file, no face, id not allowed, folder exists) exits with status 2
and one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.lipsync.avatar import AVATAR_ID
from stages.lipsync.prepare import DEFAULT_SECONDS, MAX_SECONDS, MAX_SIDE, build_avatar

log = logging.getLogger("prepare_avatar")


def avatar_id(text: str) -> str:
    if not AVATAR_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must match {AVATAR_ID.pattern} "
                                         f"(lower-case letters, digits, '_' and '-'), got {text!r}")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path, help="a photo with one frontal face (idle sway is synthesised)")
    source.add_argument("--video", type=Path, help="a clip of the face talking or idle (read with OpenCV)")
    parser.add_argument("--id", required=True, type=avatar_id, help="avatar id: the folder name under --root")
    parser.add_argument("--root", type=Path, default=Path("avatars"),
                        help="folder of avatar folders (default: %(default)s, the pipeline's avatar_dir)")
    parser.add_argument("--seconds", type=float, default=None,
                        help=f"photo: length of the sway (default {DEFAULT_SECONDS:g}); video: at most this much "
                             f"of the clip (default: all of it, up to {MAX_SECONDS:g})")
    parser.add_argument("--max-side", type=int, default=MAX_SIDE,
                        help="frames are downscaled to this longer side (default: %(default)s)")
    parser.add_argument("--model", type=Path, help="SyncTalk_2D unet_328 weights (.pth) for this person")
    parser.add_argument("--audio-encoder", type=Path, help="its audio encoder weights (default: the shared one)")
    parser.add_argument("--force", action="store_true", help="replace an existing avatar with this id")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    started = time.perf_counter()
    try:
        manifest = build_avatar(image=args.image, video=args.video, avatar=args.id, root=args.root,
                                seconds=args.seconds, model=args.model, audio_encoder=args.audio_encoder,
                                max_side=args.max_side, replace=args.force)
    except (ValueError, OSError) as e:  # FileNotFoundError, FileExistsError are OSErrors
        print(f"prepare_avatar: error: {e}", file=sys.stderr)
        return 2
    folder = args.root / manifest.id
    log.info("built avatar %r in %s: %d frames %dx%d at %d fps from a %s, model %s, audio encoder %s (%.1f s)",
             manifest.id, folder, manifest.frame_count, manifest.width, manifest.height, manifest.fps,
             manifest.source, manifest.model or "none (non-neural mouth)",
             manifest.audio_encoder or "shared", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
