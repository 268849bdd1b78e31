"""Experiment trackers (output.report_to) through accelerate: TensorBoard, MLflow, W&B, Trackio, Aim, ...

accelerate owns the integrations (``Accelerator(log_with=...)``, ``init_trackers``, ``log``, ``end_training``,
all on the main process only); lorakit picks the names, checks the packages before anything heavy loads, names
the run after the run directory and the experiment after output.project, and logs the resolved recipe
(flattened) as the run's parameters. A resumed run continues the same tracker runs (MLflow run id, W&B run id,
kept in DIR/trackers.json) instead of starting new ones beside them, and sends each of them a step only once
(TrackerMirror): the steps between its checkpoint and the interruption, which it replays, they already hold.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from lorakit.atomic import write_file
from lorakit.config.schema import OutputSection, Recipe
from lorakit.console import is_json, is_quiet
from lorakit.errors import UsageError

TRACKER_IDS = "trackers.json"  # in the run directory: {"mlflow": RUN_ID, "wandb": RUN_ID, "logged": {...}}
# Trackers whose run a resume continues: MLflow and W&B by their recorded run id, TensorBoard by writing into the
# same DIR/tensorboard. The others start a new run on every start, which holds none of the earlier steps.
CONTINUED = ("mlflow", "wandb", "tensorboard")


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


def start_trackers(accelerator, recipe: Recipe, run_dir: Path, resuming: bool = False,
                   logged: dict[str, int] | None = None) -> TrackerMirror | None:
    """One tracker run named after the run directory in the experiment output.project, the recipe as its params;
    returns what mirrors the metrics records to them (None without trackers).

    Resuming, the runs recorded in DIR/trackers.json are continued (their params are already logged, and MLflow
    refuses a changed value, as --allow-recipe-change may bring); trackers without a recorded run (one added to
    output.report_to since) start one, with the recipe as its params. ``logged``: metrics_logged() of
    metrics.jsonl before the resume cut it back to the checkpoint; a continued run is not sent those steps again."""
    if not accelerator.log_with:
        return None
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
    mirror = TrackerMirror(accelerator.trackers, held_steps(accelerator.trackers, run_dir, known, logged)
                           if resuming else {})
    write_tracker_ids(accelerator, run_dir, mirror.held)
    return mirror


class TrackerMirror:
    """Mirrors metrics.jsonl records to the trackers (what ``accelerator.log`` does), each metric of each step once:
    ``held`` maps a tracker to the last step of each metric its continued run already holds."""

    def __init__(self, trackers, held: dict[str, dict[str, int]]):
        self.trackers, self.held = list(trackers), held

    def __call__(self, values: dict, step: int | None = None) -> None:
        for tracker in self.trackers:
            held = self.held.get(tracker.name, {})
            new = {k: v for k, v in values.items() if step is None or step > held.get(k, -1)}
            if new:
                tracker.log(new, step=step)

    def replayed(self, start: int) -> tuple[list[str], int]:
        """(the trackers that hold steps after ``start``, the last such step): what a resume from ``start`` will
        not send again."""
        names = [name for name, held in self.held.items() if max(held.values(), default=0) > start]
        return names, max((max(self.held[n].values()) for n in names), default=start)


def metrics_logged(records: list[dict]) -> dict[str, int]:
    """{tracker metric: the last step metrics.jsonl records it at}: what the trackers were sent."""
    last: dict[str, int] = {}
    for record in records:
        step = record.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            for key in tracker_values(record):
                last[key] = max(last.get(key, step), step)
    return last


def held_steps(trackers, run_dir: Path, known: dict, logged: dict[str, int] | None) -> dict[str, dict[str, int]]:
    """For each tracker whose run this start continues (CONTINUED, and for MLflow and W&B a recorded run id), the
    last step of each metric it holds: what trackers.json recorded (an earlier resume's metrics.jsonl was cut back
    since) merged with what the run before this one logged. A tracker that run did not have gets everything."""
    before = read_logged(run_dir)
    if before is None:  # trackers.json of a lorakit that did not record them: its MLflow and W&B runs
        before = {name: {} for name in known}
    held = {}
    for tracker in trackers:
        name = tracker.name
        if name in CONTINUED and name in before and (name == "tensorboard" or name in known):
            merged = dict(before[name])
            for key, step in (logged or {}).items():
                merged[key] = max(merged.get(key, step), step)
            held[name] = merged
    return held


def _read_trackers_file(run_dir: Path) -> dict:
    try:
        ids = json.loads((run_dir / TRACKER_IDS).read_text())
    except (OSError, ValueError):  # none recorded (a run from before this file, or no tracker)
        return {}
    return ids if isinstance(ids, dict) else {}


def read_tracker_ids(run_dir: Path) -> dict:
    return {k: v for k, v in _read_trackers_file(run_dir).items() if isinstance(v, str)}


def read_logged(run_dir: Path) -> dict[str, dict[str, int]] | None:
    """trackers.json's "logged": the trackers of the last start, each with the last step of each metric it holds
    from before that start; None when not recorded."""
    logged = _read_trackers_file(run_dir).get("logged")
    if not isinstance(logged, dict):
        return None
    return {name: {k: s for k, s in held.items() if isinstance(s, int)} for name, held in logged.items()
            if isinstance(held, dict)}


def write_tracker_ids(accelerator, run_dir: Path, held: dict[str, dict[str, int]] | None = None) -> None:
    """Record the MLflow and W&B run ids, so that a resumed run logs into the same runs, and which trackers this
    start has with the steps they already held (``held``), so that a later resume knows what each was sent."""
    ids: dict = {}
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow" and getattr(tracker, "active_run", None) is not None:
            ids["mlflow"] = tracker.active_run.info.run_id
        elif tracker.name == "wandb" and getattr(tracker, "run", None) is not None:
            ids["wandb"] = tracker.run.id
    ids["logged"] = {tracker.name: (held or {}).get(tracker.name, {}) for tracker in accelerator.trackers}
    if accelerator.trackers:
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
