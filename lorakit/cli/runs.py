"""Commands about training runs: train, plot, explain."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lorakit.cli.app import output_file_option, RecipeArg, SetOpt, exit_codes_epilog, recipe_keys_help, command

@command(help="Fine-tune a model as the recipe says.", epilog=recipe_keys_help() + "\n\n" + exit_codes_epilog())
def train(
    recipe: Path = RecipeArg,
    set_: Optional[List[str]] = SetOpt,
    output_dir: Optional[str] = typer.Option(None, "--output-dir", help="Run directory (overrides output.dir)."),
    nproc: int = typer.Option(
        1, "--nproc", min=1,
        help="Train on N processes of this machine (one per GPU; gloo on CPU): the same as "
        "`torchrun --standalone --nproc-per-node N -m lorakit train ...`. See docs/scaling.md.",
    ),
    checkpoint: Optional[Path] = typer.Argument(
        None, metavar="[CHECKPOINT]", show_default=False,
        help="With --resume: the checkpoint directory to continue from (lorakit train RECIPE --resume PATH); "
        "without it, the newest complete one in output.dir/checkpoints.",
    ),
    resume: bool = typer.Option(
        False, "--resume",
        help="Continue the run in output.dir from its newest complete checkpoint (or the CHECKPOINT given after "
        "--resume): the result is bitwise the uninterrupted run's; a finished run says so and trains nothing. See "
        "docs/checkpoints.md.",
    ),
    allow_recipe_change: bool = typer.Option(
        False, "--allow-recipe-change",
        help="With --resume: continue although the recipe or the number of processes changed since the checkpoint.",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite",
        help="Replace the run in output.dir; the old run is moved to DIR.replaced-TIMESTAMP, nothing is deleted.",
    ),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Load pickle weights (.bin/.pt/.pth), which can run code: trusted sources only."
    ),
) -> None:
    from lorakit.errors import UsageError
    from lorakit.config.load import load_recipe

    if checkpoint is not None and not resume:
        raise UsageError(f"{checkpoint}: a checkpoint is given with --resume: lorakit train {recipe} --resume {checkpoint}")
    if allow_recipe_change and not resume:
        raise UsageError("--allow-recipe-change applies only with --resume")
    loaded = load_recipe(recipe, set_, output_dir=output_dir, resuming=resume)
    if nproc > 1:  # the recipe (and a checkpoint given) is checked once here, before N processes start
        from lorakit.distributed.launch import relaunch

        if checkpoint is not None:
            from lorakit.checkpoint.read import verify_checkpoint

            verify_checkpoint(checkpoint)
        return relaunch(nproc)
    from lorakit.distributed.launch import collective_failures
    from lorakit.training.run import run_training  # heavy: torch, transformers

    with collective_failures(loaded.train):  # another rank died or hangs: one line, not a gloo/NCCL traceback
        run_training(
            loaded, allow_pickle=allow_pickle, resume=resume, resume_from=checkpoint,
            allow_recipe_change=allow_recipe_change, overwrite=overwrite,
            resume_command=_resume_command(recipe, set_, output_dir), recipe_file=recipe,
        )


def _resume_command(recipe: Path, set_: Optional[List[str]], output_dir: Optional[str]) -> str:
    """The command that continues this run, as the interrupted-run message shows it."""
    import shlex

    parts = ["lorakit", "train", str(recipe)]
    for item in set_ or []:
        parts += ["--set", item]
    if output_dir:
        parts += ["--output-dir", output_dir]
    import os

    # A run started by a launcher resumes with as many processes (one machine: --nproc launches them the same way).
    world = os.environ.get("WORLD_SIZE", "1")
    if world != "1" and os.environ.get("LOCAL_WORLD_SIZE") == world:
        parts += ["--nproc", world]
    return shlex.join([*parts, "--resume"])


@command(help="Draw train/eval loss and learning rate against step from RUN_DIR/metrics.jsonl (a PNG).")
def plot(
    run_dir: Path = typer.Argument(..., help="Run directory (output.dir of a run).", show_default=False),
    output: Optional[Path] = output_file_option(None, "PNG path (default: RUN_DIR/loss.png)."),
    width: int = typer.Option(1000, min=200, max=10000, help="Width in pixels."),
    height: int = typer.Option(700, min=200, max=10000, help="Height in pixels."),
) -> None:
    from lorakit.console import saved
    from lorakit.training.plot import plot_run

    saved(True)("plot", plot_run(run_dir, output, width=width, height=height))


@command(help="Print the effective settings a finished run recorded (RUN/run.json): what each recipe setting did, "
         "as `lorakit train` printed it after building the model.")
def explain(run: Path = typer.Argument(..., help="Run directory (output.dir of a finished run).")) -> None:
    from lorakit.console import emit, is_json
    from lorakit.training.effective import explain as explain_run, recorded_settings

    if is_json():  # --json-logs: stdout holds only JSON lines
        emit("effective_settings", run=str(run), settings=recorded_settings(run))
    else:
        typer.echo(explain_run(run))
