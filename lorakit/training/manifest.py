"""DIR/run.json: the provenance of a run — versions, git commit, recipe and data hashes, devices, time, results.

Enough to tell two runs apart and to rerun one: the resolved recipe sits next to it in DIR/recipe.yaml, and
``recipe_sha256`` is the sha256 of that file's bytes.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from lorakit.config.load import dump_recipe
from lorakit.config.schema import DataSection, Recipe
from lorakit.data.sources import content_hash
from lorakit.training.metrics import read_metrics
from lorakit.versions import package_versions


def git_state(cwd: str | Path | None = None) -> dict | None:
    """Commit of the git work tree around ``cwd`` (and whether it has local changes); None outside git."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):  # git missing, not a repository, or no commit yet
        return None
    return {"commit": commit, "dirty": dirty}


def data_fingerprints(section: DataSection) -> list[dict]:
    """sha256 of every local data source (a file: of its bytes); a hub dataset id is recorded by name only."""
    sources = [("train", s) for s in section.train_paths()]
    if section.eval:
        sources.append(("eval", section.eval))
    out = []
    for role, source in sources:
        path = Path(source).expanduser()
        kind = "file" if path.is_file() else "directory" if path.is_dir() else "hub"
        out.append({"role": role, "source": source, "kind": kind, "sha256": content_hash(source)})
    return out


def device_names() -> list[str]:
    import torch

    if torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return [f"cpu ({platform.processor() or platform.machine()})"]


def final_metrics(metrics_path: Path) -> dict:
    """The last logged value of each metric (loss, eval_loss, ...) and the last step."""
    final: dict = {}
    for record in read_metrics(metrics_path) if metrics_path.is_file() else []:
        final.update(record)
    return final


def build_manifest(recipe: Recipe, root: Path, *, started: float, world_size: int,
                   effective_settings: list[dict] | None = None, data_stats: dict | None = None) -> dict:
    finished = time.time()
    return {
        "lorakit_run": 1,
        "command": sys.argv,
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": round(finished - started, 2),
        "versions": package_versions(),
        "git": git_state(Path.cwd()),
        "recipe_sha256": hashlib.sha256(dump_recipe(recipe).encode()).hexdigest(),
        "base_model": recipe.model.name_or_path,
        "data": data_fingerprints(recipe.data),
        "data_stats": data_stats or {},  # per split: rows read, kept, truncated, dropped, supervised tokens
        "seed": recipe.train.seed,
        "devices": device_names(),
        "world_size": world_size,
        "final_metrics": final_metrics(root / "metrics.jsonl"),
        "effective_settings": effective_settings or [],  # lorakit.training.effective: what each setting did
    }


def write_run_manifest(root: str | Path, recipe: Recipe, *, started: float, world_size: int,
                       effective_settings: list[dict] | None = None, data_stats: dict | None = None) -> Path:
    root = Path(root)
    path = root / "run.json"
    manifest = build_manifest(recipe, root, started=started, world_size=world_size,
                              effective_settings=effective_settings, data_stats=data_stats)
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path
