"""CLI start time: wall seconds of `lorakit --help`, `lorakit train --help` and `lorakit validate` (goal <= 0.5 s).

    python scripts/bench_cli.py [--repeats 7]

Each command runs in a fresh process (the installed `lorakit` entry point); the median of the repeats is
reported, after one warm-up run that fills the OS file cache.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_S = 0.5
RECIPE = """\
model: {name_or_path: some/model}
data: {train: train.jsonl}
train: {max_steps: 10}
"""


def lorakit_command() -> list[str]:
    exe = Path(sys.executable).with_name("lorakit")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lorakit"]


def wall_seconds(cmd: list[str], repeats: int) -> float:
    subprocess.run(cmd, capture_output=True, check=True)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(RECIPE)
        base = lorakit_command()
        cases = {
            "lorakit --help": [*base, "--help"],
            "lorakit train --help": [*base, "train", "--help"],
            "lorakit validate RECIPE": [*base, "validate", str(recipe)],
        }
        worst = 0.0
        print(f"{'command':28s} median wall s (goal <= {GOAL_S})")
        for name, cmd in cases.items():
            seconds = wall_seconds(cmd, args.repeats)
            worst = max(worst, seconds)
            print(f"{name:28s} {seconds:.3f}")
    print(f"{'goal met' if worst <= GOAL_S else 'GOAL NOT MET'}: slowest {worst:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
