"""A run's work is never lost or silently mixed: the adapter is saved before the efficiency summary, run.json and
the plot, whose failures are warnings (issue 15, item 2); a resume on edited data is refused (item 4)."""

from __future__ import annotations

import json

import pytest

import lorakit.training.run
from run_helpers import cli, recipe_dict, write_data, write_recipe


def test_float16_on_cpu_trains_saves_and_exits_0(tiny_model_dir, tmp_path):
    """The issue's reproduction: the float16 matmul probe measures no peak on CPU (MFU was 1/0, exit 1)."""
    data = write_data(tmp_path / "d.jsonl", 8)
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model_dir, data, tmp_path / "run", max_steps=2))
    result = cli("train", recipe, "--set", "model.dtype=float16")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "tokens_per_s" in last and (last["mfu"] is None or last["mfu"] >= 0)


def test_a_failing_report_is_a_warning_and_the_adapter_is_saved_first(tiny_model_dir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file(), "reported before saving"
        raise OSError("disk quota exceeded")

    monkeypatch.setattr(lorakit.training.run, "describe", broken)
    monkeypatch.setattr(lorakit.training.run, "write_run_manifest", broken)
    data = write_data(tmp_path / "d.jsonl", 8)
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model_dir, data, tmp_path / "run", max_steps=2))
    result = cli("train", recipe)
    assert result.exit_code == 0, result.output
    assert "warning: run.json could not be made (OSError: disk quota exceeded); the adapter is saved" in result.stderr
    assert "warning: the efficiency line could not be made" in result.stderr
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_after_editing_one_row_is_exit_4_naming_the_data(tiny_model_dir, tmp_path):
    """Same row count, one name changed inside one row: the tokenized examples' fingerprint tells."""
    data = write_data(tmp_path / "d.jsonl", 8)
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model_dir, data, tmp_path / "run", max_steps=6,
                                                           save_every=2))
    assert cli("train", recipe).exit_code == 0
    rows = data.read_text().splitlines()
    rows[3] = rows[3].replace("Count to", "Count up to")
    data.write_text("\n".join(rows) + "\n")
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000004"
    (tmp_path / "run" / "adapter").rename(tmp_path / "finished-adapter")  # stopped before its end: resumable
    result = cli("train", recipe, "--resume", checkpoint)
    assert result.exit_code == 4, result.output
    assert f"data.train source {data} changed since this checkpoint" in " ".join(result.output.split())
    result = cli("train", recipe, "--resume", checkpoint, "--allow-recipe-change")
    assert result.exit_code == 0 and "continuing on the new data" in " ".join(result.output.split()), result.output


@pytest.mark.parametrize("scheduler", ["constant"])  # reduce_lr_on_plateau and greedy: refused by the schema
@pytest.mark.parametrize("key,value", [("warmup_steps", 5), ("warmup_ratio", 0.1)])
def test_warmup_with_a_schedule_that_has_none_is_refused(scheduler, key, value, tiny_model_dir, tmp_path):
    """A warmup the schedule would ignore is refused (every key takes an effect or is refused), naming the fix."""
    import pydantic

    from lorakit.config.schema import TrainSection

    with pytest.raises(pydantic.ValidationError, match=f"train.{key}: the {scheduler} schedule has no warmup"):
        TrainSection(max_steps=3, lr_scheduler=scheduler, **{key: value})
    TrainSection(max_steps=3, lr_scheduler="constant_with_warmup", **{key: value})  # the fix it names
    data = write_data(tmp_path / "d.jsonl", 8)
    recipe = recipe_dict(tiny_model_dir, data, tmp_path / "run", max_steps=3)
    recipe["train"].update(lr_scheduler=scheduler, **{key: value})
    result = cli("validate", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 2 and "constant_with_warmup" in result.output, result.output


def test_lorakit_cache_pointing_at_a_file_is_exit_2(tiny_model_dir, tmp_path, monkeypatch):
    data = write_data(tmp_path / "d.jsonl", 8)
    monkeypatch.setenv("LORAKIT_CACHE", str(data))
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model_dir, data, tmp_path / "run", max_steps=1))
    result = cli("train", recipe)
    assert result.exit_code == 2 and "LORAKIT_CACHE" in result.output and "is a file" in result.output, result.output
    assert data.read_text().count("\n") == 8


def test_estimate_memory_is_constant_in_memory_whatever_the_numbers():
    """The issue's reproduction grew to ~24 GB (a full chunk list built before it was sliced). The process runs
    under a 4 GiB address-space limit, so a regression fails fast with a MemoryError instead of hanging."""
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    proc = subprocess.Popen(
        [sys.executable, "-m", "lorakit", "estimate-memory", "--model", "mistral-7b", "--batch-size", "1000000000",
         "--seq-len", "1000000000", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limit)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    assert json.loads(stdout)["total_bytes"] > 0


@pytest.fixture
def fresh_accelerate_state():
    """accelerate's state is process-wide: start and leave this test with none, as a `lorakit train` process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_an_earlier_bf16_accelerator_in_this_process_is_refused_not_inherited(tiny_model_dir, tmp_path,
                                                                                fresh_accelerate_state):
    """A library user's Trainer (bf16) ran first in this process: lorakit's run used to train silently under its
    bf16 autocast (accelerate keeps one state per process). Now it names the conflict, exit 2, before training."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from lorakit.config.load import parse_recipe
    from lorakit.errors import UsageError

    Accelerator(mixed_precision="bf16", cpu=True)
    data = write_data(tmp_path / "d.jsonl", 8)
    recipe = parse_recipe(recipe_dict(tiny_model_dir, data, tmp_path / "run", max_steps=1))
    with pytest.raises(UsageError) as caught:
        lorakit.training.run.run_training(recipe)
    message = str(caught.value)
    assert caught.value.exit_code == 2 and "\n" not in message
    assert "mixed_precision='bf16' (lorakit trains with 'no')" in message and "lorakit train RECIPE" in message
    assert not (tmp_path / "run" / "adapter").exists()
    # From a clean state (a process of its own) the same run trains, under lorakit's own choice.
    AcceleratorState._reset_state(reset_partial_state=True)
    assert lorakit.training.run.run_training(recipe) == tmp_path / "run"
    assert AcceleratorState().mixed_precision == "no"
