"""Terminal output: one place decides what is printed (rank 0 only) and draws the progress bar."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

_console = None


def get_console():
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(stderr=False, highlight=False, soft_wrap=True)
    return _console


def console(enabled: bool) -> Callable[[str], None]:
    """A print function that is silent off the main process."""

    def say(message: str) -> None:
        if enabled:
            get_console().print(message, markup=False)

    return say


class _Bar:
    def __init__(self, progress, task):
        self.progress, self.task, self.start = progress, task, time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def update(self, completed: int, *, loss: float, lr: float, tps: float) -> None:
        if self.progress is not None:
            info = f"loss {loss:.4f}  lr {lr:.2e}  {tps:,.0f} tok/s"
            self.progress.update(self.task, completed=completed, info=info)


@contextmanager
def progress_bar(enabled: bool, total: int):
    """Rich progress for the training steps: step, loss, lr, tokens/s, ETA."""
    if not enabled or not get_console().is_terminal:
        yield _Bar(None, None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"),
        TextColumn("eta"), TimeRemainingColumn(),
    )
    with Progress(*columns, console=get_console(), transient=False) as progress:
        yield _Bar(progress, progress.add_task("train", total=total, info=""))
