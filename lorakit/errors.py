"""Errors a user can cause, each with its documented exit code.

The CLI turns any ``LorakitError`` into one line on stderr and ``exit(error.exit_code)``;
anything else is a bug (exit 1, traceback only with ``--debug``).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_CHECKPOINT = 4
EXIT_SAFETY = 5
EXIT_NONFINITE = 6
EXIT_INTERRUPTED = 75

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_UNEXPECTED: "unexpected failure (a bug: rerun with --debug and report it)",
    EXIT_USAGE: "invalid recipe or command-line usage",
    EXIT_DATA: "invalid data (file, row, field or an empty dataset)",
    EXIT_CHECKPOINT: "checkpoint or adapter problem (missing, corrupt, foreign or changed recipe)",
    EXIT_SAFETY: "refused for safety (would overwrite a run, pickle weights, remote code)",
    EXIT_NONFINITE: "non-finite loss or gradient norm",
    EXIT_INTERRUPTED: "interrupted and resumable: the message names the command (--resume from the checkpoint written, or a plain rerun when nothing was written yet)",
}


class LorakitError(Exception):
    """Base class: ``str(error)`` is the one line the user sees."""

    exit_code = EXIT_UNEXPECTED


class UsageError(LorakitError):
    """Invalid recipe value or command-line usage."""

    exit_code = EXIT_USAGE


class OptionError(UsageError, ValueError):
    """An adapter option that lorakit's own config classes reject. Also a ValueError, so a saved adapter config
    holding such a value is reported as a damaged adapter where one is loaded."""


class RecipeError(UsageError):
    """One or more recipe problems, reported together."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = f"{where}{self.problems[0]}"
        else:
            lines = "\n".join(f"  {p}" for p in self.problems)
            message = f"{where}{len(self.problems)} problems\n{lines}"
        super().__init__(message)


class DataError(LorakitError):
    exit_code = EXIT_DATA


class CheckpointError(LorakitError):
    exit_code = EXIT_CHECKPOINT


class SafetyError(LorakitError):
    exit_code = EXIT_SAFETY


class NonFiniteLossError(LorakitError):
    exit_code = EXIT_NONFINITE

    @classmethod
    def at_step(cls, step: int, loss: float, grad_norm: float, last_checkpoint) -> "NonFiniteLossError":
        return cls(
            f"step {step}: loss {loss} / grad norm {grad_norm} is not finite; nothing was saved from this step "
            f"(last good checkpoint: {last_checkpoint or 'none written'}). Likely causes: learning rate too high "
            "(train.learning_rate), float16 overflow (use bfloat16 or float32), or corrupt data rows"
        )


class Interrupted(LorakitError):
    exit_code = EXIT_INTERRUPTED


class VerificationError(LorakitError):
    """A check of a finished artifact failed (`lorakit merge --verify`: merged logits off the adapter's)."""

    exit_code = EXIT_UNEXPECTED


class DistributedError(LorakitError):
    """A process of a multi-process run died, hung or failed; the run ends with that process's exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_UNEXPECTED):
        super().__init__(message)
        self.exit_code = exit_code


def first_line(e: BaseException) -> str:
    """A library exception's first line, cut at 200 characters: what a one-line lorakit message quotes of it."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
