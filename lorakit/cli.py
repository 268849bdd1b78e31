"""The `lorakit` command line: a thin Typer layer over the modules that do the work.

Heavy libraries (torch, transformers, peft) are imported inside commands, never at module import,
so `lorakit --help` and `lorakit validate` start fast.
"""

from __future__ import annotations

import functools
import sys
import traceback
from pathlib import Path
from typing import Callable, List, Optional

import typer

from lorakit import __version__
from lorakit.errors import EXIT_CODES, EXIT_INTERRUPTED, EXIT_UNEXPECTED, LorakitError

app = typer.Typer(
    name="lorakit",
    help="LoRA/QLoRA fine-tuning of open LLMs from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
_state = {"debug": False}


def _exit_codes_epilog() -> str:
    return "Exit codes: " + "; ".join(f"{code} {text.split(' (')[0]}" for code, text in EXIT_CODES.items()) + "."


def fail(code: int, message: str) -> None:
    """Print one line to stderr and exit with ``code``."""
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {message}", markup=True)
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
                if _state["debug"]:
                    traceback.print_exc()
                fail(e.exit_code, _escape(str(e)))
            except KeyboardInterrupt:
                fail(EXIT_INTERRUPTED, "interrupted")
            except Exception as e:  # a bug: say so in one line unless --debug
                if _state["debug"]:
                    traceback.print_exc()
                    raise typer.Exit(EXIT_UNEXPECTED)
                fail(
                    EXIT_UNEXPECTED,
                    _escape(f"unexpected failure: {type(e).__name__}: {e} (rerun with --debug for the traceback)"),
                )

        kwargs.setdefault("epilog", _exit_codes_epilog())
        return app.command(*args, **kwargs)(wrapper)

    return decorate


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lorakit {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    _state["debug"] = debug


def _recipe_keys_help() -> str:
    from lorakit.recipe import describe_keys

    return "Recipe keys (override any with --set KEY=VALUE):\n\n" + "\n\n".join(
        f"[bold]{key}[/] ({default}): {text}" for key, default, text in describe_keys()
    )


RecipeArg = typer.Argument(..., help="Path of the YAML recipe.", show_default=False)
SetOpt = typer.Option(
    None, "--set", help="Override a recipe key, typed by the schema: --set train.learning_rate=1e-4 (repeatable)."
)


@command(help="Check a recipe and report every problem at once. Loads no model or data.")
def validate(recipe: Path = RecipeArg, set_: Optional[List[str]] = SetOpt) -> None:
    from lorakit.recipe import load_recipe

    load_recipe(recipe, set_)
    typer.echo(f"{recipe}: ok")


@command(help="Fine-tune a model as the recipe says.", epilog=_recipe_keys_help() + "\n\n" + _exit_codes_epilog())
def train(
    recipe: Path = RecipeArg,
    set_: Optional[List[str]] = SetOpt,
    output_dir: Optional[str] = typer.Option(None, "--output-dir", help="Run directory (overrides output.dir)."),
) -> None:
    from lorakit.recipe import load_recipe

    loaded = load_recipe(recipe, set_, output_dir=output_dir)
    from lorakit.train import run_training  # heavy: torch, transformers

    run_training(loaded)


def run() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(run())
