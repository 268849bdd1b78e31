"""The measured examples of docs/hyperparameters.md: short runs of recipes/cpu-demo.yaml, one knob at a time.

    python scripts/hparam_sweep.py [--steps 20] [--runs N] [--out runs/hparams]

Each run trains SmolLM2-135M-Instruct (prepared by `make demo`) on data/demo/ for --steps steps and reports
the trainable parameters, the mean train loss of the last 5 steps and the wall time, as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (label, --set overrides) — one knob changed at a time from the first row.
RUNS = [
    ("baseline: r=16, alpha=32, all-linear, lr 1e-3", []),
    ("lr 1e-4", ["train.learning_rate=1e-4"]),
    ("lr 3e-3", ["train.learning_rate=3e-3"]),
    ("r=4, alpha=8", ["adapter.r=4", "adapter.lora_alpha=8"]),
    ("r=64, alpha=128", ["adapter.r=64", "adapter.lora_alpha=128"]),
    ("targets q_proj, v_proj only", ["adapter.target_modules=[q_proj, v_proj]"]),
    ("r=16, alpha=16", ["adapter.lora_alpha=16"]),
    ("lora_dropout 0.1", ["adapter.lora_dropout=0.1"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=len(RUNS), help="only the first N runs of the table")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "hparams")
    args = parser.parse_args()

    from lorakit.console import configure
    from lorakit.config.load import load_recipe
    from lorakit.training.run import run_training

    configure(quiet=True)
    rows = []
    for i, (label, overrides) in enumerate(RUNS[: args.runs]):
        out = args.out / f"run-{i}"
        shutil.rmtree(out, ignore_errors=True)
        common = [f"train.max_steps={args.steps}", "train.log_every=1", f"output.dir={out}"]
        recipe = load_recipe(ROOT / "recipes" / "cpu-demo.yaml", common + overrides)
        start = time.perf_counter()
        run_training(recipe)
        seconds = time.perf_counter() - start
        losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        trainable = _trainable(out / "adapter")
        rows.append((label, trainable, losses[0], sum(losses[-5:]) / 5, seconds))
        print(f"| {label} | {trainable:,} | {losses[0]:.3f} | {rows[-1][3]:.3f} | {seconds:.0f} |", flush=True)
    print("\n| run | trainable params | loss at step 1 | mean loss, last 5 steps | seconds |")
    print("|---|---:|---:|---:|---:|")
    for label, trainable, first, last, seconds in rows:
        print(f"| {label} | {trainable:,} | {first:.3f} | {last:.3f} | {seconds:.0f} |")


def _trainable(adapter_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
