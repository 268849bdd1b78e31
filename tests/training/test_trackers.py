"""output.report_to through accelerate: MLflow (a local file store, read back with MLflow's client) holds the
recipe as params and the curves as metrics; TensorBoard event files; a missing package is exit 2 up front."""

import json

import pytest
from run_helpers import cli, lorakit, recipe_dict, subprocess_env, write_data, write_recipe

from lorakit.config.load import parse_recipe
from lorakit.training.trackers import flat_recipe, tracker_names


def test_tensorboard_alias_and_flat_recipe(tiny_model_dir, tmp_path):
    recipe = parse_recipe(recipe_dict(tiny_model_dir, "d.jsonl", tmp_path / "run"))
    assert tracker_names(recipe.output) == []
    alias = recipe.output.model_copy(update={"tensorboard": True, "report_to": ["mlflow", "tensorboard"]})
    assert tracker_names(alias) == ["mlflow", "tensorboard"]  # once, in the order given
    flat = flat_recipe(recipe)
    assert flat["train.learning_rate"] == 1e-3 and flat["model.name_or_path"] == str(tiny_model_dir)
    assert json.loads(flat["adapter.target_modules"]) == ["q_proj", "v_proj"] and flat["data.eval"] == "null"


def test_mlflow_file_store_holds_recipe_params_and_loss_curve(tiny_model_dir, tmp_path, monkeypatch):
    import mlflow

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants an opt-in for the file store
    data = write_data(tmp_path / "train.jsonl", n=12)
    recipe = recipe_dict(tiny_model_dir, data, tmp_path / "my-run", max_steps=4, log_every=2)
    recipe["data"]["eval_split"] = 0.25
    recipe["output"].update(report_to=["mlflow", "tensorboard"], project="lorakit-tests")
    result = cli("train", write_recipe(tmp_path / "recipe.yaml", recipe))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "my-run" / "metrics.jsonl").read_text().splitlines()]

    client = mlflow.MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("lorakit-tests")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "my-run" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.learning_rate"] == "0.001" and params["model.name_or_path"] == str(tiny_model_dir)
    assert params["output.project"] == "lorakit-tests" and params["adapter.r"] == "4"
    losses = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"])) for r in records if "loss" in r]
    for name in ("train/lr", "train/grad_norm", "eval/loss", "train/mfu", "train/input_tokens_per_s"):
        assert client.get_metric_history(run.info.run_id, name), name

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "my-run" / "tensorboard"))
    events.Reload()
    assert [(s.step, pytest.approx(s.value, rel=1e-6)) for s in events.Scalars("train/loss")] == losses


def test_a_missing_tracker_package_is_exit_2_before_anything_loads(tiny_model_dir, tmp_path):
    recipe = recipe_dict(tiny_model_dir, write_data(tmp_path / "train.jsonl"), tmp_path / "run")
    recipe["output"]["report_to"] = ["swanlab"]  # not installed in the test environment
    result = cli("train", write_recipe(tmp_path / "recipe.yaml", recipe))
    assert result.exit_code == 2, result.output
    assert "output.report_to: the swanlab tracker needs its package: pip install 'lorakit[swanlab]'" in result.output
    assert "loading model" not in result.output and not (tmp_path / "run").exists()


def test_an_unknown_tracker_is_a_recipe_error(tiny_model_dir, tmp_path):
    recipe = recipe_dict(tiny_model_dir, "d.jsonl", tmp_path / "run")
    recipe["output"]["report_to"] = ["mlfow"]
    result = cli("validate", write_recipe(tmp_path / "recipe.yaml", recipe))
    assert result.exit_code == 2 and "output.report_to" in result.output and "mlflow" in result.output


@pytest.mark.slow
def test_two_ranks_log_one_tracker_run_from_rank_0(tiny_model_dir, tmp_path, monkeypatch):
    """Under DDP only rank 0 reaches the trackers (one MLflow run, one TensorBoard event file), and
    train.eval_generate on rank 0 alone does not stall the other rank."""
    import mlflow
    from run_helpers import lorakit, subprocess_env

    from lorakit.testing import write_memorisation_data

    store = tmp_path / "mlruns"
    data = write_memorisation_data(tmp_path / "train.jsonl")
    recipe = recipe_dict(tiny_model_dir, data, tmp_path / "run", max_steps=4, log_every=1, eval_every=2,
                         eval_generate=2, ddp_timeout=600)
    recipe["data"]["eval_split"] = 0.25
    recipe["output"]["report_to"] = ["mlflow", "tensorboard"]
    env = subprocess_env(MLFLOW_TRACKING_URI=store.as_uri(), MLFLOW_ALLOW_FILE_STORE="true", HF_HUB_OFFLINE="1")
    result = lorakit("train", write_recipe(tmp_path / "recipe.yaml", recipe), "--nproc", "2", env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=store.as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("lorakit").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/score")] == [2, 4]
    assert len(list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_a_tracker_that_cannot_start_is_one_line_exit_2(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # MLflow 3 refuses a file store without it
    recipe = recipe_dict(tiny_model_dir, write_data(tmp_path / "train.jsonl"), tmp_path / "run")
    recipe["output"]["report_to"] = ["mlflow"]
    result = cli("train", write_recipe(tmp_path / "recipe.yaml", recipe))
    assert result.exit_code == 2, result.output
    assert "output.report_to: a tracker could not start: The filesystem tracking backend" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run" / "recipe.yaml").exists()
    # What it left (the run's marker alone) is no run: the same command without the tracker may use the folder;
    # it was refused as 'not empty (it holds a lorakit run ...)'.
    from lorakit.training.run import check_output_dir

    check_output_dir(tmp_path / "run")


def _wandb_records(path):
    """The protobuf records of an offline W&B run file (LevelDB log format: 32 KiB blocks, 7-byte headers).
    wandb 0.31's Python package no longer ships a reader: the Go core writes and syncs these files."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks, records = path.read_bytes(), 7, b"", []  # 7: the ":W&B" file header
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def test_wandb_offline_run_holds_recipe_config_and_loss_history(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # an optional extra: lorakit[wandb]
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = write_data(tmp_path / "train.jsonl", n=12)
    recipe = recipe_dict(tiny_model_dir, data, tmp_path / "wb-run", max_steps=3, log_every=1)
    recipe["output"].update(report_to=["wandb"], project="lorakit-wb")
    result = cli("train", write_recipe(tmp_path / "recipe.yaml", recipe))
    assert result.exit_code == 0, result.output
    losses = [json.loads(line)["loss"] for line in (tmp_path / "wb-run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]

    [run_file] = (tmp_path / "wb-run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(run_file)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "wb-run" and run.project == "lorakit-wb"
    config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for item in r.config.update}
    assert config["train.learning_rate"] == 1e-3 and config["adapter.r"] == 4
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["train/loss"] for h in history if "train/loss" in h] == pytest.approx(losses)


@pytest.mark.parametrize("mode", ["--quiet", "--json-logs"])
def test_wandb_keeps_quiet_under_quiet_and_json_logs(tiny_model_dir, tmp_path, mode):
    """--quiet prints errors and written paths only, --json-logs JSON objects only: W&B's own banner and run
    summary (some 30 lines on stderr) were printed through both."""
    pytest.importorskip("wandb")
    env = {k: v for k, v in subprocess_env(WANDB_MODE="offline").items() if k != "WANDB_SILENT"}
    recipe = recipe_dict(tiny_model_dir, write_data(tmp_path / "train.jsonl", n=8), tmp_path / "run", max_steps=1)
    recipe["output"]["report_to"] = ["wandb"]
    result = lorakit(mode, "train", write_recipe(tmp_path / "recipe.yaml", recipe), env=env)
    assert result.returncode == 0, result.stderr
    assert "wandb:" not in result.stderr + result.stdout, result.stderr
    if mode == "--json-logs":
        assert all(json.loads(line) for line in result.stdout.splitlines())
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))  # still tracked


def test_a_resumed_run_continues_its_mlflow_run_and_a_tracker_added_starts_one(tiny_model_dir, tmp_path, monkeypatch):
    """--resume logs into the MLflow run the interrupted run started (one run, not two), params logged once.
    output.report_to may change on resume (trackers change what is shown, not what is learned): the resumed adapter
    is the uninterrupted run's, bit for bit, and a tracker added since starts its own run with the recipe as its
    params. output.project may not: the recorded tracker runs live in the old project."""
    import mlflow
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    data = write_data(tmp_path / "train.jsonl", n=12)
    recipe = recipe_dict(tiny_model_dir, data, tmp_path / "run", max_steps=4, log_every=1, save_every=2)
    recipe["output"]["report_to"] = ["mlflow"]
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    assert cli("train", path).exit_code == 0
    first = json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]
    reference = (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    step_2 = tmp_path / "run" / "checkpoints" / "step-000002"
    (tmp_path / "run" / "adapter").rename(tmp_path / "finished-adapter")  # stopped before its end: resumable
    result = cli("train", path, "--resume", step_2, "--set", "output.project=elsewhere")
    assert result.exit_code == 4 and "output.project: 'lorakit' → 'elsewhere'" in result.output, result.output
    assert "tracker runs (trackers.json) live in" in result.output
    result = cli("train", path, "--resume", step_2, "--set", "output.report_to=[mlflow, tensorboard]")
    assert result.exit_code == 0, result.output
    assert "changed settings" not in result.output
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes() == reference

    client = mlflow.MlflowClient(tracking_uri=store.as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("lorakit").experiment_id])
    assert run.info.run_id == first and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]  # once each
    assert run.data.params["train.max_steps"] == "4"
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [s.step for s in events.Scalars("train/loss")] == [3, 4]
    [hparams] = (tmp_path / "run" / "tensorboard").glob("*/hparams.yml")
    assert yaml.safe_load(hparams.read_text())["train.learning_rate"] == 1e-3


def test_killed_runs_resumed_send_each_step_to_the_continued_tracker_run_once(tiny_model_dir, tmp_path, monkeypatch):
    """A run killed after step N resumes from its checkpoint C < N and replays C+1..N: the MLflow run it continues
    already holds those (it had two values per step). Also across two resumes, the first from an older checkpoint
    under --allow-recipe-change: the tracker keeps the values it was first sent, metrics.jsonl the resumed run's."""
    import mlflow

    from lorakit.faults import RANK_FAULT_ENV

    store = tmp_path / "mlruns"
    env = subprocess_env(MLFLOW_TRACKING_URI=store.as_uri(), MLFLOW_ALLOW_FILE_STORE="true", HF_HUB_OFFLINE="1")
    recipe = recipe_dict(tiny_model_dir, write_data(tmp_path / "train.jsonl", n=12), tmp_path / "run", max_steps=8,
                         log_every=1, save_every=2, keep_last=3)
    recipe["output"]["report_to"] = ["mlflow"]
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    metrics = tmp_path / "run" / "metrics.jsonl"

    def losses(records):
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    killed = lorakit("train", path, env={**env, RANK_FAULT_ENV: "die:0:7"})  # SIGKILL before step 8: 1..7 logged
    assert killed.returncode == -9, killed.stderr[-2000:]
    first = losses(json.loads(line) for line in metrics.read_text().splitlines())
    assert sorted(first) == [1, 2, 3, 4, 5, 6, 7]
    # Back to step 2 with another learning rate, killed again after step 5: steps 3..5 were sent before.
    change = ("--allow-recipe-change", "--set", "train.learning_rate=0.0005")
    killed = lorakit("train", path, "--resume", tmp_path / "run" / "checkpoints" / "step-000002", *change,
                     env={**env, RANK_FAULT_ENV: "die:0:5"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert "trackers: mlflow keep their values of steps 3-7 from before the interruption" in killed.stdout
    result = lorakit("train", path, "--resume", *change, env=env)  # from step 4: 5..7 were sent, 8 was not
    assert result.returncode == 0, result.stderr[-2000:]
    final = losses(json.loads(line) for line in metrics.read_text().splitlines())
    assert sorted(final) == list(range(1, 9)) and final[4] != first[4]  # metrics.jsonl: the resumed run's values

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=store.as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("lorakit").experiment_id])
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert [step for step, _ in history] == list(range(1, 9))  # each step once
    assert dict(history) == pytest.approx({**first, 8: final[8]})
