"""What `lorakit train` leaves besides the adapter: run.json, loss.png, TensorBoard events, and its log modes."""

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from run_helpers import lorakit, png_size, recipe_dict, subprocess_env, write_data, write_recipe
from typer.testing import CliRunner

from lorakit.cli.main import app
from lorakit.console import configure
from lorakit.training.manifest import git_state


@pytest.fixture(autouse=True)
def _normal_output_after():
    yield
    configure()


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dir):
    data = write_data(tmp_path / "train.jsonl", n=12)
    recipe = recipe_dict(tiny_model_dir, data, tmp_path / "run", max_steps=4, log_every=2)
    recipe["data"]["eval_split"] = 0.25
    recipe["output"]["tensorboard"] = True
    return write_recipe(tmp_path / "recipe.yaml", recipe)


def test_train_writes_manifest_plot_and_tensorboard_with_json_logs(tiny_recipe, tmp_path):
    result = CliRunner().invoke(app, ["--json-logs", "train", str(tiny_recipe)])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]  # every stdout line is one JSON object
    assert "Loading weights" not in result.stderr  # transformers' own tqdm bar is off; loading is a lorakit stage
    run = tmp_path / "run"

    metrics = [e for e in events if e["event"] == "metrics"]
    assert [m["step"] for m in metrics if "loss" in m] == [2, 4]
    # Epochs completed, as transformers' Trainer logs them (9 rows, 4 a step: 3 steps an epoch); was 0, 1.
    assert [m["epoch"] for m in metrics if "loss" in m] == [0.6667, 1.3333]
    assert any("eval_loss" in m for m in metrics)
    saved = {e["what"]: e["path"] for e in events if e["event"] == "saved"}
    assert saved["adapter"] == str(run / "adapter")
    assert saved["run manifest"] == str(run / "run.json") and saved["loss plot"] == str(run / "loss.png")
    assert {"loading model", "tokenizing data"} <= {e["name"] for e in events if e["event"] == "stage"}

    manifest = json.loads((run / "run.json").read_text())
    for package in ("lorakit", "torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        assert manifest["versions"][package], package
    assert manifest["recipe_sha256"] == hashlib.sha256((run / "recipe.yaml").read_bytes()).hexdigest()
    [data] = manifest["data"]
    assert data["sha256"] == hashlib.sha256((tmp_path / "train.jsonl").read_bytes()).hexdigest()  # = sha256sum
    assert manifest["seed"] == 7 and manifest["world_size"] == 1 and manifest["devices"]
    assert manifest["wall_time_s"] > 0
    last_loss = [m for m in metrics if "loss" in m][-1]["loss"]
    assert manifest["final_metrics"]["loss"] == last_loss
    assert manifest["final_metrics"]["eval_loss"] == [m for m in metrics if "eval_loss" in m][-1]["eval_loss"]

    assert png_size(run / "loss.png") == (1000, 700)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events_tb = EventAccumulator(str(run / "tensorboard"))
    events_tb.Reload()
    assert [s.step for s in events_tb.Scalars("train/loss")] == [2, 4]
    assert events_tb.Scalars("train/loss")[-1].value == pytest.approx(last_loss, rel=1e-6)
    assert "eval/loss" in events_tb.Tags()["scalars"]


def test_git_state_outside_a_repository_is_none(tmp_path):
    assert git_state(tmp_path) is None
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert git_state(tmp_path) is None  # a repository without a commit has no commit to record


@pytest.mark.slow
def test_quiet_train_prints_only_the_written_paths(tiny_recipe, tmp_path):
    r = lorakit("--quiet", "train", tiny_recipe, env=subprocess_env(HF_HUB_OFFLINE="1", COLUMNS="300"))
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    assert r.stdout.splitlines() == [
        f"adapter saved to {run / 'adapter'}",
        f"run manifest saved to {run / 'run.json'}",
        f"loss plot saved to {run / 'loss.png'}",
    ]
    assert "warning" not in r.stderr
    assert Path(run / "tensorboard").is_dir()
