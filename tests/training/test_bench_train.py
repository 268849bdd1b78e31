"""scripts/bench_train.py's in-process parts: its process shows library warnings as lorakit's CLI does, and
--ceiling measures what it says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from run_helpers import recipe_dict, subprocess_env

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_train.py"


def run_bench(call: str, recipe: dict) -> subprocess.CompletedProcess:
    """``call`` (Python, with ``bench`` the script's module and ``recipe`` the recipe) in a fresh process."""
    script = ("import importlib.util, json, sys\n"
              f"spec = importlib.util.spec_from_file_location('bench_train', {str(SCRIPT)!r})\n"
              "bench = importlib.util.module_from_spec(spec)\n"
              "spec.loader.exec_module(bench)\n"
              "recipe = json.loads(sys.argv[1])\n"
              f"{call}\n")
    return subprocess.run([sys.executable, "-c", script, json.dumps(recipe)], capture_output=True, text=True,
                          timeout=120, env=subprocess_env())


def test_the_bench_process_hides_the_library_noise_lorakit_train_hides(tiny_model_dir, tmp_path):
    """bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" (on CPUs with AVX512-BF16, with
    the kernels package installed and the hub offline) was printed by the bench itself, not by `lorakit train`."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {w}", "output": w}) + "\n" for w in "abcdefgh"))
    recipe = recipe_dict(tiny_model_dir, data, tmp_path / "run")
    result = run_bench("bench.first_steps(recipe)", recipe)
    assert result.returncode == 0, result.stderr
    assert "gemm_4bit_forward" not in result.stderr and "kernels-community" not in result.stderr, result.stderr


def test_the_ceiling_times_the_first_steps_own_matmuls(tiny_model_dir, tmp_path):
    """`bench_train.py --ceiling`: the first step's matmuls, found by the profiler, each timed alone; the
    ceiling is the formula's FLOPs over their time plus the attention kernels' (so it is the step's MFU when
    nothing else took time)."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {w} " * 9, "output": w}) + "\n" for w in "abcdefgh"))
    recipe = recipe_dict(tiny_model_dir, data, tmp_path / "run")
    result = run_bench("print(json.dumps(bench.matmul_ceiling(recipe, repeats=2)))", recipe)
    assert result.returncode == 0, result.stderr
    c = json.loads(result.stdout.strip().splitlines()[-1])
    assert c["matmuls"] > 0 and c["matmul_seconds_alone"] > 0 and c["step_seconds"] > 0
    assert c["ceiling_mfu"] == pytest.approx(c["step_mfu"] * c["step_seconds"]
                                             / (c["matmul_seconds_alone"] + c["attention_seconds"]))
