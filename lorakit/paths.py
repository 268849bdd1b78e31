"""Where lorakit keeps files of its own, and the one rule that tells a local path from a hub id."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))


def is_local(name: str) -> bool:
    """The one rule for models, datasets and adapter bases: a name is a local path when it exists, starts with
    '.', '/' or '~', has more than one '/' or ends in .gguf; anything else is a hub id ('owner/name', or a
    canonical id without an owner such as 'gpt2' or 'imdb')."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(".gguf")
            or Path(name).expanduser().exists())
