"""Experiment trackers (output.report_to) through accelerate: TensorBoard, MLflow, W&B, Trackio, Aim, ...

accelerate owns the integrations (``Accelerator(log_with=...)``, ``init_trackers``, ``log``, ``end_training``,
all on the main process only); lorakit picks the names, checks the packages before anything heavy loads, names
the run after the run directory and the experiment after output.project, and logs the resolved recipe
(flattened) as the run's parameters. A resumed run continues the same tracker runs (MLflow run id, W&B run id,
kept in DIR/trackers.json) instead of starting new ones beside them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from lorakit.atomic import write_file
from lorakit.config.schema import OutputSection, Recipe
from lorakit.console import is_json, is_quiet
from lorakit.errors import UsageError

TRACKER_IDS = "trackers.json"  # in the run directory: {"mlflow": RUN_ID, "wandb": RUN_ID}


def tracker_names(output: OutputSection) -> list[str]:
    """output.report_to, plus tensorboard for the deprecated output.tensorboard: true."""
    return list(dict.fromkeys([*output.report_to, *(["tensorboard"] if output.tensorboard else [])]))


def check_tracker_packages(output: OutputSection) -> None:
    """Exit 2 naming the extra to install, before the model loads (accelerate would only warn and drop it)."""
    for name in tracker_names(output):
        if importlib.util.find_spec(name) is None:  # recipe.TRACKERS: each name is its module's
            key = "output.tensorboard" if name == "tensorboard" and name not in output.report_to else "output.report_to"
            raise UsageError(f"{key}: the {name} tracker needs its package: pip install 'lorakit[{name}]', or remove "
                             f"{name} from {key}")


def build_trackers(output: OutputSection, run_dir: Path) -> list:
    """What ``Accelerator(log_with=...)`` takes: TensorBoard as a tracker object writing to DIR/tensorboard/ (where
    lorakit always wrote it), the others by name."""
    names = tracker_names(output)
    if "tensorboard" not in names:
        return names
    from accelerate.tracking import TensorBoardTracker

    return [TensorBoardTracker("tensorboard", str(run_dir)) if n == "tensorboard" else n for n in names]


def start_trackers(accelerator, recipe: Recipe, run_dir: Path, resuming: bool = False) -> None:
    """One tracker run named after the run directory in the experiment output.project, the recipe as its params.

    Resuming, the runs recorded in DIR/trackers.json are continued (their params are already logged, and MLflow
    refuses a changed value, as --allow-recipe-change may bring); trackers without a recorded run (one added to
    output.report_to since) start one, with the recipe as its params."""
    if not accelerator.log_with:
        return
    run_dir = Path(run_dir)
    run_name = run_dir.resolve().name
    known = read_tracker_ids(run_dir) if resuming else {}
    init_kwargs = {"mlflow": {"run_name": run_name}, "wandb": {"name": run_name, "dir": str(run_dir)},
                   "trackio": {"name": run_name}}
    if is_quiet() or is_json():  # W&B prints some 30 lines of its own; --quiet promises errors and paths only
        init_kwargs["wandb"]["settings"] = {"silent": True}
    if "mlflow" in known:
        init_kwargs["mlflow"]["run_id"] = known["mlflow"]
    if "wandb" in known:
        init_kwargs["wandb"].update(id=known["wandb"], resume="allow")
    try:
        accelerator.init_trackers(recipe.output.project, config=None if known else flat_recipe(recipe),
                                  init_kwargs=init_kwargs)
        for tracker in accelerator.trackers if known else ():  # one added on resume (output.report_to) starts anew
            if tracker.name not in known:
                tracker.store_init_configuration(flat_recipe(recipe))
    except Exception as e:  # a tracker's own settings (an unreachable server, a refused store): one line, exit 2
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"output.report_to: a tracker could not start: {reason}; check its settings "
                         "(MLFLOW_TRACKING_URI, WANDB_MODE, ...) or remove it from output.report_to") from None
    write_tracker_ids(accelerator, run_dir)


def read_tracker_ids(run_dir: Path) -> dict:
    try:
        ids = json.loads((run_dir / TRACKER_IDS).read_text())
    except (OSError, ValueError):  # none recorded (a run from before this file, or no resumable tracker)
        return {}
    return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}


def write_tracker_ids(accelerator, run_dir: Path) -> None:
    """Record the MLflow and W&B run ids, so that a resumed run logs into the same runs."""
    ids = {}
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow" and getattr(tracker, "active_run", None) is not None:
            ids["mlflow"] = tracker.active_run.info.run_id
        elif tracker.name == "wandb" and getattr(tracker, "run", None) is not None:
            ids["wandb"] = tracker.run.id
    if ids:
        write_file(run_dir / TRACKER_IDS, json.dumps(ids, indent=1) + "\n")


def finish_trackers(accelerator) -> None:
    """Close every tracker run. Not accelerator.end_training(): that also destroys the process group, which the
    adapter gather and saves after the loop still use."""
    for tracker in accelerator.trackers:
        tracker.finish()


def flat_recipe(recipe: Recipe) -> dict:
    """{"train.learning_rate": 0.0002, ...}: scalars as they are, lists and None as text (every tracker takes these)."""
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:
            flat[prefix] = json.dumps(value)

    walk("", recipe.model_dump(mode="json"))
    return flat


def tracker_values(record: dict) -> dict:
    """A metrics.jsonl record as tracker scalars: eval_* under eval/, the rest under train/ (HF Trainer's layout)."""
    values = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        values[f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"] = value
    return values
