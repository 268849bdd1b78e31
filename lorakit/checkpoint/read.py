"""Finding and verifying checkpoints: a step-NNNNNN directory whose files match its manifest is complete;
anything else is reported and never resumed from."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lorakit.checkpoint.format import (
    _NAME, ADAPTER, FORMAT, FORMAT_VERSION, MANIFEST, RECIPE, REQUIRED, RESIDUAL_ADAPTER, STATE,
)
from lorakit.config.methods import ADAPTER_LAYOUTS, PEFT_LAYOUT  # ADAPTER/ holds one registered method's layout
from lorakit.errors import CheckpointError


@dataclass
class Checkpoint:
    path: Path
    step: int
    manifest: dict

    @property
    def state(self) -> dict:
        try:
            return json.loads((self.path / STATE).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: {STATE} cannot be read ({e}); the checkpoint is corrupt") from None

    @property
    def recipe_text(self) -> str:
        return (self.path / RECIPE).read_text()


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step-NNNNNN directory (complete or not), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def verify_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint at ``path`` if its manifest is valid and every file matches it; CheckpointError otherwise."""
    from lorakit.data.sources import content_hash

    def bad(reason: str) -> CheckpointError:
        return CheckpointError(f"{path}: {reason}")

    if not path.is_dir():
        raise bad("not found or not a directory")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        held = list_checkpoints(path / "checkpoints") or list_checkpoints(path)  # a run, or its checkpoints/
        if held:
            raise bad(f"a folder of checkpoints, not one checkpoint; give one of them, e.g. {held[-1][1]}") from None
        raise bad(f"no {MANIFEST}: an interrupted write, or not a lorakit checkpoint") from None
    except (OSError, ValueError):
        raise bad(f"{MANIFEST} is not valid JSON: the checkpoint is corrupt") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise bad(f"{MANIFEST} is not a lorakit checkpoint manifest (a foreign directory)")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise bad(f"written by a newer lorakit (format {manifest['format_version']}); upgrade lorakit to resume it")
    files = manifest.get("files") or {}
    for name in (*adapter_files(files), *REQUIRED):
        if name not in files:
            raise bad(f"incomplete: {name} is not in {MANIFEST}")
    for name, meta in files.items():
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not isinstance(meta, dict):
            raise bad(f"{MANIFEST} lists {name!r}, which is not a file of this checkpoint (a forged manifest)")
        if not file.is_file():
            raise bad(f"{name} is missing (listed in {MANIFEST})")
        if file.stat().st_size != meta.get("size"):
            raise bad(f"{name} is {file.stat().st_size} bytes, {MANIFEST} says {meta.get('size')}: truncated or modified")
        if content_hash(str(file)) != meta.get("sha256"):
            raise bad(f"{name} does not match its sha256 in {MANIFEST}: corrupt or modified")
    return Checkpoint(path, int(manifest.get("step", -1)), manifest)


def adapter_files(names) -> tuple[str, str]:
    """The (config, weights) paths of the adapter layout whose config is among ``names`` (PEFT's when none is)."""
    for config, weights in ADAPTER_LAYOUTS:
        if f"{ADAPTER}/{config}" in names:
            return f"{ADAPTER}/{config}", f"{ADAPTER}/{weights}"
    return f"{ADAPTER}/{ADAPTER_LAYOUTS[0][0]}", f"{ADAPTER}/{ADAPTER_LAYOUTS[0][1]}"


def resume_weights(names) -> str:
    """The adapter weights training continues from: RESIDUAL_ADAPTER's for a weight-rewriting init (ADAPTER/ then
    holds the converted delta), ADAPTER/'s otherwise (and in checkpoints written before the conversion existed)."""
    residual = f"{RESIDUAL_ADAPTER}/{PEFT_LAYOUT[1]}"
    return residual if residual in names else adapter_files(names)[1]


def latest_checkpoint(root: Path, say: Callable[[str], None]) -> Checkpoint | None:
    """The newest complete checkpoint under ``root``; incomplete or corrupt ones are reported and skipped."""
    for leftover in sorted(root.glob("step-*.tmp")) if root.is_dir() else []:
        say(f"skipping {leftover}: an interrupted checkpoint write (no manifest)")
    for _, path in reversed(list_checkpoints(root)):
        try:
            return verify_checkpoint(path)
        except CheckpointError as e:
            say(f"skipping {e}")
    return None


def select_checkpoint(root: Path, explicit: Path | None, say: Callable[[str], None]) -> Checkpoint:
    """The checkpoint `--resume [PATH]` continues from: the given one, or the newest complete one."""
    if explicit is not None:
        return verify_checkpoint(Path(explicit))
    found = latest_checkpoint(root, say)
    if found is None and not root.parent.exists():  # --overwrite would have nothing to replace
        raise CheckpointError(f"{root.parent}: nothing to resume, the folder does not exist (no complete checkpoint); "
                              "start the run without --resume, or give a checkpoint with --resume PATH")
    if found is None:
        raise CheckpointError(
            f"{root}: no complete checkpoint to resume from; start over without --resume (with --overwrite to "
            "replace this run), or give one with --resume PATH"
        )
    return found


def set_aside_newer(root: Path, step: int, say: Callable[[str], None], finished: list[Path] = ()) -> None:
    """Resuming from an older checkpoint: move newer step dirs out of the way (kept, never resumed from), and
    ``finished``: a finished run's outputs (DIR/adapter, DIR/merged, eval.json) the resumed run would replace
    with different ones."""
    newer = [p for s, p in list_checkpoints(root) if s > step] + [p for p in finished if p.exists()]
    if not newer:
        return
    aside = root / time.strftime("superseded-%Y%m%d-%H%M%S")
    aside.mkdir(parents=True, exist_ok=True)
    for path in newer:
        path.rename(aside / path.name)
    say(f"moved {', '.join(p.name for p in newer)} to {aside} (newer than the checkpoint resumed from)")
