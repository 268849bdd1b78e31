"""Training metrics: DIR/metrics.jsonl (always), TensorBoard scalars (output.tensorboard), and reading them back.

metrics.jsonl is the record of a run; TensorBoard and `lorakit plot` are views of the same records.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.console import show_metrics
from lorakit.errors import UsageError


class MetricsLog:
    """metrics.jsonl (rank 0 only): one JSON object per log step or evaluation, mirrored to TensorBoard."""

    def __init__(self, path: Path, enabled: bool, tensorboard: bool = False):
        self.path, self.enabled = Path(path), enabled
        self.tensorboard = TensorBoardLog(self.path.parent / "tensorboard") if enabled and tensorboard else None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(record)
        show_metrics(record)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


class TensorBoardLog:
    """Each numeric metric as a scalar: eval_* under eval/, the rest under train/, against the step."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError(
                "output.tensorboard: true needs the tensorboard package; pip install 'lorakit[tensorboard]' "
                "or set output.tensorboard: false"
            ) from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: dict) -> None:
        step = record.get("step")
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            tag = f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file (a torn last line from a killed run is skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no metrics file; is this a lorakit run directory?")
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, sorted by step; a step logged twice (a resumed run) keeps its last value."""
    by_step: dict[int, float] = {}
    for record in records:
        if key in record and "step" in record and isinstance(record[key], (int, float)):
            by_step[int(record["step"])] = float(record[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]
