"""Directories that appear whole or not at all: written under a temporary name, synced, renamed into place.

replace_dir publishes what must survive a crash (checkpoints, `lorakit merge` output); publish_dir publishes
what can be rebuilt (the tokenized-data cache, GGUF conversions). Each caller names its own temporary and
set-aside directories and cleans up what a killed process left of them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_files(folder: Path) -> None:
    """Flush every file under ``folder`` to disk."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def umask_modes(folder: Path) -> None:
    """Give the safetensors files under ``folder`` the mode a new file gets (0o666 less the umask). safetensors 0.8
    writes through a temporary file created 0600 and renames it into place (safetensors issue #782): adapters and
    checkpoints were then readable by their owner only, so a server or a teammate's job running as another user
    (vLLM's LoRA loader says "No adapter found") could not load what every other file of the folder lets it read."""
    mode = 0o666 & ~_umask()
    for path in folder.rglob("*.safetensors"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def _umask() -> int:
    """This process's umask, read without changing it (Linux /proc), else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """Make the renames inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp: Path, final: Path, aside: Path) -> None:
    """Rename the finished ``tmp`` to ``final`` and make the rename durable. An existing ``final`` is first
    renamed to ``aside`` and deleted afterwards: a crash in between leaves it there, complete, never half-gone."""
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        final.rename(aside)
    tmp.rename(final)
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` to ``final``. When another process (rank) published ``final`` first, its copy
    is kept and ``tmp`` dropped: both were built from the same inputs. Raises if ``final`` is still missing."""
    try:
        tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise


def publish_file(tmp: Path, final: Path) -> None:
    """Rename the finished file ``tmp`` (next to ``final``) onto ``final`` durably: readers see the old file or the
    new one, never a part. The caller has already refused to replace a file the user did not ask to replace."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_file(final: Path, text: str) -> None:
    """Write ``text`` to ``final`` through a hidden sibling file and publish_file: readers never see a part."""
    tmp = final.with_name(f".{final.name}.tmp")
    tmp.write_text(text)
    publish_file(tmp, final)
