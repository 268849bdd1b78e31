"""Where lorakit keeps files of its own, and the one rule that tells a local path from a hub id."""

from __future__ import annotations

import os
from pathlib import Path

from lorakit.errors import UsageError


def cache_dir() -> Path:
    path = Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))
    blocked = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise UsageError(f"LORAKIT_CACHE={path}: {blocked} is a file, not a directory; point LORAKIT_CACHE at a "
                         "directory (or unset it for ~/.cache/lorakit)")
    return path


def is_local(name: str) -> bool:
    """The one rule for models, datasets and adapter bases: a name is a local path when it exists, starts with
    '.', '/' or '~', has more than one '/' or ends in .gguf; anything else is a hub id ('owner/name', or a
    canonical id without an owner such as 'gpt2' or 'imdb')."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(".gguf")
            or Path(name).expanduser().exists())
