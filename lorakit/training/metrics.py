"""Training metrics: DIR/metrics.jsonl (always), mirrored to the experiment trackers, and reading them back.

metrics.jsonl is the record of a run; the trackers (output.report_to) and `lorakit plot` are views of the same records.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lorakit.console import show_metrics
from lorakit.errors import UsageError
from lorakit.training.trackers import tracker_values


class MetricsLog:
    """metrics.jsonl (rank 0 only): one JSON object per log step or evaluation, mirrored to the experiment
    trackers (output.report_to) through ``log`` (trackers.TrackerMirror), which also runs on the main process only."""

    def __init__(self, path: Path, enabled: bool, log=None):
        self.path, self.enabled, self.log = Path(path), enabled, log

    def write(self, record: dict, text: bool = True) -> None:
        """``text`` False: no line of the record's keys on the terminal (--json-logs still gets its event)."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.log is not None:
            self.log(tracker_values(record), step=record.get("step"))
        show_metrics(record, text)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file; a line that is no record (a torn last line from a killed run, bytes a
    disk or an editor damaged) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no metrics file; is this a lorakit run directory?")
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, sorted by step; a step logged twice (a resumed run) keeps its last value."""
    by_step: dict[int, float] = {}
    for record in records:
        step, value = record.get("step"), record.get(key)
        if _is_step(step) and isinstance(value, (int, float)):  # a damaged record may hold anything
            by_step[int(step)] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _is_step(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
