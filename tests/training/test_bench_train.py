"""scripts/bench_train.py's own process (the in-process step FLOPs and profile) shows library warnings as
lorakit's CLI does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from run_helpers import recipe_dict, subprocess_env

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_train.py"


def test_the_bench_process_hides_the_library_noise_lorakit_train_hides(tiny_model_dir, tmp_path):
    """bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" (on CPUs with AVX512-BF16, with
    the kernels package installed and the hub offline) was printed by the bench itself, not by `lorakit train`."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {w}", "output": w}) + "\n" for w in "abcdefgh"))
    recipe = recipe_dict(tiny_model_dir, data, tmp_path / "run")
    script = ("import importlib.util, json, sys\n"
              f"spec = importlib.util.spec_from_file_location('bench_train', {str(SCRIPT)!r})\n"
              "bench = importlib.util.module_from_spec(spec)\n"
              "spec.loader.exec_module(bench)\n"
              "bench.first_steps(json.loads(sys.argv[1]))\n")
    result = subprocess.run([sys.executable, "-c", script, json.dumps(recipe)], capture_output=True, text=True,
                            timeout=120, env=subprocess_env())
    assert result.returncode == 0, result.stderr
    assert "gemm_4bit_forward" not in result.stderr and "kernels-community" not in result.stderr, result.stderr
