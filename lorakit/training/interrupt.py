"""Stopping a run on request: SIGINT/SIGTERM finish the optimizer step, the loop writes a checkpoint, exit 75.

A second signal stops at once. Ctrl-C outside the loop is exit 75 too, saying what there is to continue from:
nothing before the run directory is written (the CLI's message), the newest checkpoint after. See
docs/checkpoints.md.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from lorakit.errors import Interrupted


class GracefulStop:
    """Inside the loop, SIGINT/SIGTERM ask to stop after the current optimizer step; a second one stops at once.

    Handlers are installed only for the loop (and only from the main thread) and restored afterwards.
    """

    def __init__(self, resume_command: str):
        self.resume_command = resume_command
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise Interrupted(
                f"{signal.Signals(signum).name} again: stopped at once without a new checkpoint; continue from the "
                f"last complete one with: {self.resume_command}"
            )
        self.signum = signum
        # os.write, not print: a signal handler may run in the middle of another write to the terminal.
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
                    "(press Ctrl-C again to stop at once)\n".encode())

    def stopped(self, step: int, checkpoint: Path) -> Interrupted:
        """The error that ends a run stopped on request, after ``step`` and its checkpoint were written."""
        name = signal.Signals(self.signum).name if self.signum else "stop"
        return Interrupted(f"{name}: stopped after step {step}, checkpoint {checkpoint}; resume with: "
                           f"{self.resume_command}")


@contextmanager
def outside_steps(checkpoints: Path, resume_command: str):
    """Once the run directory is written, a Ctrl-C outside the loop (the rest of the setup, the final evaluation
    and save) is exit 75 naming what continues the run; inside the loop GracefulStop's handler takes over."""
    try:
        yield
    except KeyboardInterrupt:
        from lorakit.checkpoint.format import MANIFEST
        from lorakit.checkpoint.read import list_checkpoints

        done = [p for _, p in list_checkpoints(Path(checkpoints)) if (p / MANIFEST).is_file()]
        start_over = resume_command.removesuffix(" --resume") + " --overwrite"
        how = (f"continue from {done[-1]} with: {resume_command}" if done
               else f"no checkpoint was written yet; start over with: {start_over}")
        raise Interrupted(f"interrupted outside a training step, so no checkpoint was written for it; {how}") from None
