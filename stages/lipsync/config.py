"""The lip-sync stages' config sections: ``speech:``, ``lipsync:``, ``composite:``.

Every default lives here; ``configs/lipsync.yaml`` only states what differs. The avatar
folder is named twice on purpose (``lipsync.avatar_dir`` and ``composite.avatar_dir``):
the U-Net ranks and the compositing ranks may be on different machines, each reading its
own copy of the avatars.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.config import check, check_choice, check_range
from stages.lipsync.avatar import AVATAR_ID

EVICTION_POLICIES = ("lru", "lfu")
PLACEMENTS = ("round_robin", "least_loaded", "preferred")
PATCH_DTYPES = ("uint8", "float16", "float32")
"""What the U-Net rank sends the compositing rank per frame: the 320x320 BGR patch as
uint8 (0.3 MB), float16 (0.6 MB) or float32 (1.2 MB, the seeds' contract)."""
PRECISIONS = ("float32", "float16", "bfloat16")
DEFAULT_AVATAR_DIR = "avatars"


@dataclass(kw_only=True, slots=True)
class SpeechConfig:
    """The speech stage (server rank): the page's audio chunks -> one message per video frame."""

    vad_threshold: float = 0.5
    """Silero VAD speech probability above which a 32 ms chunk counts as speech."""
    hangover_s: float = 0.2
    """Speech stays on this long after the last speech chunk, so the mouth does not snap
    shut between words."""
    max_sessions: int = 64
    """Sessions whose audio state (mel, VAD, timing) is kept; the least recently heard beyond are dropped."""
    idle_s: float = 30.0
    """A session silent this long (no chunk at all) loses its audio state; its next chunk starts afresh."""

    def __post_init__(self) -> None:
        check_range(self.vad_threshold, "vad_threshold", 0.05, 0.95)
        check_range(self.hangover_s, "hangover_s", 0.0, 2.0)
        check_range(self.max_sessions, "max_sessions", 1, 4096)
        check_range(self.idle_s, "idle_s", 1.0, 3600.0)


@dataclass(kw_only=True, slots=True)
class LipsyncConfig:
    """The lip-sync stage (U-Net ranks): many avatars' models in a byte-bounded registry."""

    avatar_dir: str = DEFAULT_AVATAR_DIR
    """Folder of avatar folders (``launch/prepare_avatar.py`` makes them), relative to the
    working directory. Avatar ids from the page are looked up here and nowhere else."""
    default_avatar: str = "astronaut"
    """The avatar of a session that selected none."""
    build_default: bool = True
    """Build the 'astronaut' avatar (from the shipped public-domain photo) when it is missing."""
    audio_encoder: str | None = None
    """Audio encoder weights shared by every avatar whose folder has none of its own
    (SyncTalk ships one ``audio_visual_encoder.pth`` for all its models)."""
    capacity_mb: int | None = None
    """Registry budget per replica, MB. null: on a GPU, ``memory_fraction`` of its free
    memory at start (pynvml); on CPU, 1024."""
    memory_fraction: float = 0.8
    """Share of a GPU's free memory the registry may fill when ``capacity_mb`` is null."""
    eviction: str = "lru"
    """Which resident avatar goes when a new one needs room: 'lru' (least recently used)
    or 'lfu' (least often used)."""
    idle_timeout_s: float | None = 600.0
    """An avatar unused this long is unloaded; null keeps it until evicted."""
    retry_after_s: float = 30.0
    """An avatar whose model failed to load is not tried again for this long (its requests
    fail fast with the remembered error)."""
    placement: str = "least_loaded"
    """Where an avatar no replica holds is loaded: 'round_robin', 'least_loaded' (fewest
    bytes resident) or 'preferred' (``preferred``, else least loaded)."""
    preferred: dict[str, int] = field(default_factory=dict)
    """Avatar id -> replica index of the lip-sync stage, for ``placement: preferred``."""
    precision: str = "float16"
    """U-Net weights and activations on a GPU: 'float16', 'bfloat16' or 'float32' (CPU always float32)."""
    patch_dtype: str = "uint8"
    """The mouth patch sent to compositing: 'uint8' (default), 'float16' or 'float32'."""
    max_sessions: int = 256
    """Sessions whose audio-feature window is kept; least recently seen dropped beyond."""
    quiet_db: float = -45.0
    """Loudness (dBFS) at which the non-neural mouth is closed."""
    loud_db: float = -15.0
    """Loudness (dBFS) at which the non-neural mouth is fully open."""

    def __post_init__(self) -> None:
        check(bool(self.avatar_dir.strip()), "avatar_dir", "must name a folder")
        check(AVATAR_ID.fullmatch(self.default_avatar) is not None, "default_avatar",
              f"must be an avatar id ({AVATAR_ID.pattern}), got {self.default_avatar!r}")
        if self.capacity_mb is not None:
            check_range(self.capacity_mb, "capacity_mb", 1, 1_048_576)
        check_range(self.memory_fraction, "memory_fraction", 0.05, 0.95)
        check_choice(self.eviction, "eviction", EVICTION_POLICIES)
        if self.idle_timeout_s is not None:
            check_range(self.idle_timeout_s, "idle_timeout_s", 1.0, 86_400.0)
        check_range(self.retry_after_s, "retry_after_s", 0.0, 86_400.0)
        check_choice(self.placement, "placement", PLACEMENTS)
        for avatar, replica in self.preferred.items():
            check(AVATAR_ID.fullmatch(str(avatar)) is not None, f"preferred.{avatar}", "is not an avatar id")
            check(isinstance(replica, int) and replica >= 0, f"preferred.{avatar}",
                  f"must be a replica index >= 0, got {replica!r}")
        check_choice(self.precision, "precision", PRECISIONS)
        check_choice(self.patch_dtype, "patch_dtype", PATCH_DTYPES)
        check_range(self.max_sessions, "max_sessions", 1, 65_536)
        check_range(self.quiet_db, "quiet_db", -100.0, 0.0)
        check(self.loud_db > self.quiet_db, "loud_db", f"must be above quiet_db ({self.quiet_db}), got {self.loud_db}")


@dataclass(kw_only=True, slots=True)
class CompositeConfig:
    """The compositing stage (CPU ranks): mouth patches pasted into the avatar's frames, JPEG out."""

    avatar_dir: str = DEFAULT_AVATAR_DIR
    """The avatars folder as this stage's ranks see it (the same avatars as ``lipsync.avatar_dir``)."""
    cache_mb: int = 512
    """Decoded background frames kept per replica (LRU, bytes-bounded); a 640x480 frame is 0.9 MB."""
    feather_px: int = 6
    """Width of the soft seam where the patch meets the frame; 0 pastes a hard square as the seeds do."""
    jpeg_quality: int | None = None
    """JPEG quality 30..95; null follows the page's live ``jpeg_quality``."""

    def __post_init__(self) -> None:
        check(bool(self.avatar_dir.strip()), "avatar_dir", "must name a folder")
        check_range(self.cache_mb, "cache_mb", 1, 1_048_576)
        check_range(self.feather_px, "feather_px", 0, 64)
        if self.jpeg_quality is not None:
            check_range(self.jpeg_quality, "jpeg_quality", 30, 95)


@dataclass(kw_only=True, slots=True)
class PresentConfig:
    """The present stage (server rank) has nothing to configure: it labels frames for the page."""
