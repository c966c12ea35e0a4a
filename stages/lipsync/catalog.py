"""The avatars a session may select, as the server rank's ``avatar.select`` sees them.

A thin view of an ``AvatarStore``: ids come from the folder (a request's id is checked
against it, never joined into a path unchecked), and the default avatar is built from
the shipped photo the first time it is missing, so a fresh checkout works out of the box.
"""

from __future__ import annotations

from pathlib import Path

from stages.lipsync.avatar import AvatarStore, BadAvatar, UnknownAvatar
from stages.lipsync.prepare import ensure_default_avatar


def open_store(avatar_dir: str, build_default: bool) -> AvatarStore:
    """The avatar folder, with the default avatar built in it first if asked and missing."""
    root = Path(avatar_dir)
    if build_default:
        root.mkdir(parents=True, exist_ok=True)
        ensure_default_avatar(root)
    return AvatarStore(root)


class AvatarCatalog:
    """``stages.base.Catalog`` over an avatar folder."""

    def __init__(self, store: AvatarStore, default: str) -> None:
        self.store = store
        self.default = default

    def ids(self) -> list[str]:
        return self.store.ids()

    def check(self, key: str) -> None:
        """Raises ``LookupError`` for an id that is not a usable avatar here."""
        try:
            self.store.manifest(key)
        except UnknownAvatar:
            raise
        except BadAvatar as e:  # present but broken: as unusable as absent, and say why
            raise UnknownAvatar(f"avatar {key!r} cannot be used: {e}") from None
