"""Preference training in real processes on the tiny model: killed by SIGKILL and resumed == uninterrupted
(adapter bytes and log), and DDP on gloo (2 ranks x grad_accum k == 1 rank x 2k), as the SFT tests do."""

import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.faults import RANK_FAULT_ENV
from run_helpers import adapter_hash, pref_recipe, subprocess_env, training_records, write_pairs, write_recipe

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(cmd: list, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env or subprocess_env(), timeout=600, cwd=ROOT)


def test_killed_and_resumed_equals_uninterrupted(tiny_model_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 20)
    recipe = pref_recipe(tiny_model_dir, data, tmp_path / "clean", max_steps=6, save_every=2)
    clean = _run([sys.executable, "-m", "lorakit", "train", write_recipe(tmp_path / "clean.yaml", recipe)])
    assert clean.returncode == 0, clean.stderr[-3000:]
    recipe["output"]["dir"] = str(tmp_path / "killed")
    path = write_recipe(tmp_path / "killed.yaml", recipe)
    killed = _run([sys.executable, "-m", "lorakit", "train", path], subprocess_env(**{RANK_FAULT_ENV: "die:0:3"}))
    assert killed.returncode != 0 and (tmp_path / "killed" / "checkpoints" / "step-000002").is_dir()
    resumed = _run([sys.executable, "-m", "lorakit", "train", path, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert adapter_hash(tmp_path / "killed" / "adapter") == adapter_hash(tmp_path / "clean" / "adapter")
    assert training_records(tmp_path / "killed" / "metrics.jsonl") == training_records(
        tmp_path / "clean" / "metrics.jsonl")


def test_two_ranks_with_grad_accum_k_equal_one_rank_with_2k(tiny_model_dir, tmp_path):
    """DDP on gloo, launched as the shipped accelerate config does: the same adapter and log as one process."""
    data = write_pairs(tmp_path / "pairs.jsonl", 26)
    runs = {}
    for name, accum in (("two", 1), ("one", 2)):
        recipe = pref_recipe(tiny_model_dir, data, tmp_path / name, max_steps=None, epochs=1, grad_accum=accum,
                             ddp_timeout=600)
        runs[name] = write_recipe(tmp_path / f"{name}.yaml", recipe)
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    two = _run([accelerate, "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / "ddp.yaml"),
                "--num_processes", "2", "-m", "lorakit", "train", str(runs["two"])])
    assert two.returncode == 0, two.stderr[-3000:]
    one = _run([sys.executable, "-m", "lorakit", "train", str(runs["one"])])
    assert one.returncode == 0, one.stderr[-3000:]

    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    log_two, log_one = training_records(tmp_path / "two" / "metrics.jsonl"), training_records(
        tmp_path / "one" / "metrics.jsonl")
    assert len(log_two) == len(log_one) and any("eval_rewards/accuracy" in r for r in log_two)
    for x, y in zip(log_two, log_one):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-5), (key, x, y)
