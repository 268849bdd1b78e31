"""Checkpoints under DIR/checkpoints/step-NNNNNN/: written into a .tmp directory and renamed when complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lorakit.recipe import Recipe, dump_recipe


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def write_checkpoint(root: Path, step: int, model, recipe: Recipe) -> Path:
    final = root / checkpoint_name(step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "adapter")
    (tmp / "recipe.yaml").write_text(dump_recipe(recipe))
    (tmp / "state.json").write_text(json.dumps({"step": step}) + "\n")
    tmp.rename(final)
    rotate(root, recipe.train.keep_last)
    return final


def rotate(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last]:
        shutil.rmtree(old)
