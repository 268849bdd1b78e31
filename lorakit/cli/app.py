"""The Typer app every command module registers on: one-line errors with documented exit codes, global options,
and the arguments several commands share.

Heavy libraries (torch, transformers, peft) are imported inside commands, never at module import,
so `lorakit --help` and `lorakit validate` start fast (tests/e2e/test_cli_start.py).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
import sys
import traceback
from typing import Callable

import typer
from typer.core import TyperGroup

from lorakit import __version__
from lorakit.console import debugging
from lorakit.errors import EXIT_CODES, EXIT_INTERRUPTED, EXIT_UNEXPECTED, LorakitError


class OneLineUsageErrors(TyperGroup):
    """Click's own usage errors (an option out of range, a missing argument) end like every lorakit error: one
    line on stderr, exit 2, instead of a usage panel. Typer's public ``cls`` hook, no patching."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as e:  # click's errors (typer vendors click: only this base class is public)
            if type(e).__name__ == "NoArgsIsHelpError":  # `lorakit` alone: the help is the answer
                e.show()
                sys.exit(e.exit_code)
            from lorakit.console import configure, show_error

            given = list(kwargs.get("args") or (args[0] if args else sys.argv[1:]))
            leading = given[: next((i for i, a in enumerate(given) if not a.startswith("-")), len(given))]
            if "--json-logs" in leading:  # an unknown command or global option: the callback never ran
                configure(json_logs=True)
            where = e.ctx.command_path if getattr(e, "ctx", None) else "lorakit"
            message = " ".join(e.format_message().split())
            show_error(e.exit_code, escape(f"{where}: {message} (see {where} --help)"))
            sys.exit(e.exit_code)
        except typer.Abort:
            from lorakit.console import show_error

            show_error(EXIT_INTERRUPTED, "interrupted before anything was saved; rerun the same command")
            sys.exit(EXIT_INTERRUPTED)
        # Without standalone mode click returns a typer.Exit's code, or the command's value (None: success).
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    name="lorakit",
    cls=OneLineUsageErrors,
    help="LoRA/QLoRA fine-tuning of open LLMs from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def exit_codes_epilog() -> str:
    return "Exit codes: " + "; ".join(f"{code} {text.split(' (')[0]}" for code, text in EXIT_CODES.items()) + "."


def fail(code: int, message: str) -> None:
    """Print one line to stderr (and an "error" event with --json-logs) and exit with ``code``."""
    from lorakit.console import show_error

    show_error(code, message)
    raise typer.Exit(code)


def command(*args, **kwargs) -> Callable:
    """``app.command`` that turns a LorakitError into one line + its exit code (traceback only with --debug)."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*a, **k):
            try:
                return fn(*a, **k)
            except typer.Exit:
                raise
            except LorakitError as e:
                if debugging():
                    traceback.print_exc()
                fail(e.exit_code, escape(str(e)))
            except KeyboardInterrupt:
                # Commands leave no half-written output (merge publishes atomically, a training run's steps
                # handle Ctrl-C themselves: lorakit/training/interrupt.py), so a Ctrl-C that gets here saved nothing.
                fail(EXIT_INTERRUPTED, "interrupted before anything was saved; rerun the same command")
            except Exception as e:  # a bug: say so in one line unless --debug
                if debugging():
                    traceback.print_exc()
                    raise typer.Exit(EXIT_UNEXPECTED)
                fail(
                    EXIT_UNEXPECTED,
                    escape(f"unexpected failure: {type(e).__name__}: {e} (rerun with --debug for the traceback)"),
                )

        kwargs.setdefault("epilog", exit_codes_epilog())
        return app.command(*args, **kwargs)(wrapper)

    return decorate


def escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lorakit {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors, and every library warning."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors and the paths of what was written."),
    json_logs: bool = typer.Option(
        False, "--json-logs", help="Print one JSON object per line on stdout (messages, metrics, warnings, errors)."
    ),
) -> None:
    from lorakit.console import configure

    configure(quiet=quiet, json_logs=json_logs, debug=debug)


def recipe_keys_help() -> str:
    from lorakit.config.schema import describe_keys

    return "Recipe keys (override any with --set KEY=VALUE):\n\n" + "\n\n".join(
        f"[bold]{key}[/] ({default}): {text}" for key, default, text in describe_keys()
    )


RecipeArg = typer.Argument(..., help="Path of the YAML recipe.", show_default=False)
SetOpt = typer.Option(
    None, "--set", help="Override a recipe key, typed by the schema: --set train.learning_rate=1e-4 (repeatable); "
    "--set '~KEY' removes a key the recipe sets."
)


def path_value(text) -> Path:
    """The parser of a file option (-o): an empty value is refused, where pathlib reads '' as '.', the current
    directory, which no command means."""
    if not str(text).strip():
        raise typer.BadParameter("the path is empty; name a file")
    return Path(text)


def output_file_option(default, help: str, **kwargs):
    """The --output/-o option of a command that writes one file: a path, never empty (path_value)."""
    return typer.Option(default, "--output", "-o", parser=path_value, metavar="<path>", help=help, **kwargs)


def number_option(default, *decls: str, low: float, high: float | None = None, help: str, **kwargs):
    """A float option bounded to [low, high] that names NaN and infinity for what they are: typer's own range
    check reads 'nan' as below the minimum (or above the maximum) and lets 'inf' through an open top."""
    where = f"from {low:g} to {high:g}" if high is not None else f"of at least {low:g}"

    def parse(text) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise typer.BadParameter(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise typer.BadParameter(f"{text} is not a finite number; give a number {where}")
        if value < low or (high is not None and value > high):
            raise typer.BadParameter(f"{text} is out of range; give a number {where}")
        return value

    # min/max only show the range in --help: with a parser, typer leaves the checking to it
    return typer.Option(default, *decls, parser=parse, min=low, max=high, help=help, **kwargs)
