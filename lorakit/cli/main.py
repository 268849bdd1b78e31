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
            from lorakit.console import show_error

            where = e.ctx.command_path if getattr(e, "ctx", None) else "lorakit"
            message = " ".join(e.format_message().split())
            show_error(e.exit_code, _escape(f"{where}: {message} (see {where} --help)"))
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


def _exit_codes_epilog() -> str:
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
                fail(e.exit_code, _escape(str(e)))
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
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors, and every library warning."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors and the paths of what was written."),
    json_logs: bool = typer.Option(
        False, "--json-logs", help="Print one JSON object per line on stdout (messages, metrics, warnings, errors)."
    ),
) -> None:
    from lorakit.console import configure

    configure(quiet=quiet, json_logs=json_logs, debug=debug)


def _recipe_keys_help() -> str:
    from lorakit.config.schema import describe_keys

    return "Recipe keys (override any with --set KEY=VALUE):\n\n" + "\n\n".join(
        f"[bold]{key}[/] ({default}): {text}" for key, default, text in describe_keys()
    )


RecipeArg = typer.Argument(..., help="Path of the YAML recipe.", show_default=False)
SetOpt = typer.Option(
    None, "--set", help="Override a recipe key, typed by the schema: --set train.learning_rate=1e-4 (repeatable)."
)


@command(help="Check a recipe and report every problem at once. Loads no model or data.")
def validate(recipe: Path = RecipeArg, set_: Optional[List[str]] = SetOpt) -> None:
    from lorakit.config.load import load_recipe

    load_recipe(recipe, set_)
    from lorakit.console import console

    console(True)(f"{recipe}: ok")


@command(name="preview-data", help="Show the first rows as the model sees them (supervised tokens highlighted, "
         "masked ones dimmed) and the data summary. Loads the tokenizer and data only; trains nothing.")
def preview_data(
    recipe: Path = RecipeArg,
    set_: Optional[List[str]] = SetOpt,
    rows: int = typer.Option(3, "-n", "--rows", min=1, help="How many rows to show."),
    stats: bool = typer.Option(
        True, "--stats/--no-stats", help="Also tokenize the whole dataset (cached) and print kept/truncated/dropped "
        "counts and the token-length distribution."),
) -> None:
    from lorakit.config.load import load_recipe

    loaded = load_recipe(recipe, set_)
    from lorakit.console import adopt_transformers_output
    from lorakit.tools.preview import preview_data as show_preview  # heavy: transformers

    adopt_transformers_output()
    show_preview(loaded, rows, stats)


@command(help="Fine-tune a model as the recipe says.", epilog=_recipe_keys_help() + "\n\n" + _exit_codes_epilog())
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
        "--resume): the result is bitwise the uninterrupted run's. See docs/checkpoints.md.",
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
    loaded = load_recipe(recipe, set_, output_dir=output_dir)
    import os

    from lorakit.console import console
    from lorakit.export.vllm import warn_if_not_servable

    warn_if_not_servable(loaded.adapter, console(os.environ.get("RANK", "0") == "0"))  # once, not per process
    if nproc > 1:  # the recipe is checked once here, before N processes start
        from lorakit.distributed.launch import relaunch

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


@command(help="Write a commented starter recipe. Templates: lora, qlora, dora, cpu-demo, multi-gpu (--list).")
def init(
    template: str = typer.Argument("lora", help="Template name (see --list)."),
    output: Path = typer.Option(Path("recipe.yaml"), "--output", "-o", help="Where to write it ('-' for stdout)."),
    force: bool = typer.Option(
        False, "--force", help="Move an existing file aside (FILE.replaced-TIME) and write a new one."),
    list_: bool = typer.Option(False, "--list", help="List the templates and exit."),
) -> None:
    from lorakit.console import console, saved
    from lorakit.config.init import TEMPLATES, render, write_template

    if list_:
        say = console(True)
        for name, tpl in TEMPLATES.items():
            say(f"{name:<10} {tpl.summary}")
        return
    if str(output) == "-":
        sys.stdout.write(render(template))
        return
    saved(True)("recipe", write_template(template, output, force=force))


@command(help="Print the recipe JSON Schema (for editors: lorakit schema > recipe.schema.json).")
def schema(
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Write it to this file instead of stdout (replaces only an earlier schema)."),
) -> None:
    import json

    from lorakit.config.docs import recipe_json_schema

    text = json.dumps(recipe_json_schema(), indent=2, ensure_ascii=False) + "\n"
    if output is None:
        sys.stdout.write(text)
        return
    from lorakit.console import saved
    from lorakit.errors import SafetyError
    from lorakit.publish import check_file_output

    check_file_output("schema -o", output)
    if output.exists() and _json_title(output) != "lorakit recipe":  # an earlier schema is replaced, nothing else
        raise SafetyError(f"schema -o {output}: the file exists and is not a lorakit recipe schema; choose another "
                          "file")
    output.write_text(text)
    saved(True)("schema", output)


def _json_title(path: Path) -> str | None:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data.get("title") if isinstance(data, dict) else None


@command(help="Draw train/eval loss and learning rate against step from RUN_DIR/metrics.jsonl (a PNG).")
def plot(
    run_dir: Path = typer.Argument(..., help="Run directory (output.dir of a run).", show_default=False),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG path (default: RUN_DIR/loss.png)."),
    width: int = typer.Option(1000, min=200, max=10000, help="Width in pixels."),
    height: int = typer.Option(700, min=200, max=10000, help="Height in pixels."),
) -> None:
    from lorakit.console import saved
    from lorakit.training.plot import plot_run

    saved(True)("plot", plot_run(run_dir, output, width=width, height=height))


@command(help="Check this machine: stack versions, GPUs and memory, bf16, bitsandbytes, hub, disk; and what to do.")
def doctor(
    timeout: float = typer.Option(3.0, min=0.1, max=60, help="Seconds to wait for the hub (skipped when HF_HUB_OFFLINE=1)."),
) -> None:
    from lorakit.console import adopt_transformers_output, emit, get_console, is_json, is_quiet
    from lorakit.tools.doctor import FAIL, INFO, OK, WARN, run_checks

    adopt_transformers_output()  # bitsandbytes/transformers import-time warnings: once, in lorakit's format
    findings = run_checks(hub_timeout=timeout)
    problems = [f for f in findings if f.status in (WARN, FAIL)]
    if is_json():
        for f in findings:
            emit("check", name=f.name, status=f.status, detail=f.detail, fix=f.fix)
        return
    marks = {OK: "[green]ok  [/]", INFO: "[cyan]info[/]", WARN: "[yellow]warn[/]", FAIL: "[bold red]fail[/]"}
    out = get_console()
    for f in findings:
        if is_quiet() and f.status != FAIL:
            continue
        out.print(f"{marks[f.status]} {f.name:<13} {_escape(f.detail)}", markup=True)
        if f.fix and f.status != OK:
            out.print(f"     {'':<13} → {_escape(f.fix)}", markup=True)
    if not is_quiet():
        out.print(f"{len(problems)} problem(s) found" if problems else "no problems found", markup=False)


@command(help="Merge an adapter into its base model, shard by shard in bounded memory, into a plain Hugging Face "
         "model directory (loads without PEFT). Verifies merged logits against the adapter's on small models.")
def merge(
    adapter_dir: Path = typer.Argument(..., help="Adapter directory (RUN/adapter) or run dir.", show_default=False),
    output: str = typer.Option(..., "--output", "-o", help="Output model directory.", show_default=False),
    base: Optional[str] = typer.Option(None, "--base", help="Base model (default: the one the adapter records)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bfloat16, float16 or float32 (default: the base's)."),
    max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size", help="Largest output file, e.g. 5GB."),
    base_precision: Optional[str] = typer.Option(
        None, "--base-precision", help="QLoRA adapters: merge into the original weights or the dequantized NF4 "
        "round-trip the adapter saw (default: dequantized when the adapter was trained on a quantized base)."),
    verify: Optional[bool] = typer.Option(
        None, "--verify/--no-verify", help="Compare merged logits with the adapter's; exit 1 over the limit "
        "(default: on below 2B parameters)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read pickle (.bin) weights; they can run code."),
    device: Optional[str] = typer.Option(None, "--device", help="Where to compute the merge: cpu (default) or cuda."),
) -> None:
    from lorakit.console import adopt_transformers_output, console, saved, stage
    from lorakit.merge.merge import merge_adapter

    adopt_transformers_output()
    options = {"base": base, "dtype": dtype, "max_shard_size": max_shard_size, "base_precision": base_precision,
               "verify": verify, "device": device}
    with stage(True, "merging"):
        report = merge_adapter(adapter_dir, output, overwrite=overwrite, allow_pickle=allow_pickle, log=console(True),
                               **{k: v for k, v in options.items() if v is not None})
    saved(True)("merged model", report.output_dir)


@command(help="Export for serving: a GGUF model (llama.cpp, Ollama) or a GGUF LoRA adapter, from a run directory, "
         "an adapter (merged on the fly) or a merged model; or check that vLLM can serve an adapter (--check vllm). "
         "See docs/serving.md.")
def export(
    target: Path = typer.Argument(..., help="Run directory, adapter directory or merged model.", show_default=False),
    format_: str = typer.Option("gguf", "--format", help="gguf (the whole model) or gguf-lora (the adapter only)."),
    quant: str = typer.Option("f16", "--quant", help="f16, bf16, q8_0 or q4_0 (gguf-lora: f16, bf16 or q8_0)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="FILE.gguf to write.", show_default=False),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Move an existing FILE.gguf (and Modelfile) aside as FILE.gguf.replaced-TIME and write "
        "a new one."),
    verify: bool = typer.Option(
        False, "--verify", help="Read the GGUF back with transformers' GGUF loader and compare tokens and logits "
        "with the model's; exit 1 over the limit, writing nothing."),
    ollama: bool = typer.Option(False, "--ollama", help="Also write a Modelfile next to FILE.gguf for `ollama create`."),
    check: Optional[str] = typer.Option(
        None, "--check", help="vllm: report whether vLLM's LoRA loader accepts the adapter as saved; writes nothing."),
    max_lora_rank: Optional[int] = typer.Option(
        None, "--max-lora-rank", min=1, help="With --check vllm: the rank limit the server will run with."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model (default: the one the adapter records)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read pickle (.bin) weights; they can run code."),
) -> None:
    from lorakit.console import adopt_transformers_output, console, saved
    from lorakit.errors import UsageError

    adopt_transformers_output()
    say = console(True)
    if check is not None:
        from lorakit.export.vllm import run_vllm_check

        if check != "vllm":
            raise UsageError(f"--check {check}: the only check is vllm")
        return run_vllm_check(target, max_lora_rank, base=base, say=say)
    if output is None:
        raise UsageError(f"-o FILE.gguf is required: lorakit export {target} --format {format_} -o FILE.gguf")
    from lorakit.export.run import check_output
    from lorakit.runlock import OutputLock

    with OutputLock(check_output(output, overwrite), say, "-o"):  # one lorakit process per output file
        _export(target, output, format_, quant, overwrite, verify, ollama, base, allow_pickle, say)


def _export(target, output, format_, quant, overwrite, verify, ollama, base, allow_pickle, say) -> None:
    from lorakit.console import saved
    from lorakit.errors import UsageError

    if ollama:
        from lorakit.export.ollama import check_modelfile

        check_modelfile(output, overwrite)  # before any work
    if format_ == "gguf":
        from lorakit.export.run import export_gguf

        report = export_gguf(target, output, quant=quant, overwrite=overwrite, verify=verify, base=base,
                             allow_pickle=allow_pickle, log=say)
    elif format_ == "gguf-lora":
        from lorakit.export.gguf_lora import export_gguf_lora

        if ollama:
            raise UsageError("--ollama applies to --format gguf (a whole model); Ollama's ADAPTER takes a gguf-lora "
                             "file in a Modelfile of your base model")
        report = export_gguf_lora(target, output, quant=quant, overwrite=overwrite, verify=verify, base=base,
                                  allow_pickle=allow_pickle, log=say)
    else:
        raise UsageError(f"--format {format_}: choose gguf or gguf-lora")
    saved(True)("gguf", report.output)
    if ollama:
        from lorakit.export.ollama import write_modelfile

        modelfile, create = write_modelfile(target, report, overwrite=overwrite)
        saved(True)("Modelfile", modelfile)
        say(f"next: {create}")


@command(help="Generate with a base model and adapters loaded once onto it, chosen per prompt (greedy by default).")
def generate(
    model: str = typer.Option(..., "--model", help="Base model: local directory, hub id or .gguf.", show_default=False),
    adapter: Optional[List[str]] = typer.Option(
        None, "--adapter", help="NAME=DIR of an adapter to load onto the base (repeatable)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="One prompt; its completion goes to stdout."),
    file: Optional[Path] = typer.Option(
        None, "--file", help='JSONL rows {"prompt": ...} or {"messages": [...]}, each with an optional "adapter": '
        'NAME or "base"; writes one JSON line per row to stdout.'),
    use: Optional[str] = typer.Option(
        None, "--use", help="Adapter for --prompt and rows naming none: NAME or base (default: the first --adapter)."),
    chat: bool = typer.Option(False, "--chat", help="Send prompts as a user message through the chat template."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Most tokens to generate per prompt."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 is greedy; above 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (with --temperature)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed, reset for every prompt."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Base dtype (as model.dtype in a recipe)."),
    quantization: Optional[str] = typer.Option(None, "--quantization", help="nf4, fp4 or int8 to load the base "
                                               "quantized, as QLoRA adapters were trained (as model.quantization)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read pickle (.bin) weights; they can run code."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
) -> None:
    import json

    from lorakit.console import adopt_transformers_output, emit, is_json
    from lorakit.errors import UsageError
    from lorakit.tools.generate import run_generate
    from lorakit.config.schema import ModelSection

    adopt_transformers_output()
    fields = {"dtype": dtype, "quantization": quantization}
    try:
        section = ModelSection(name_or_path=model, **{k: v for k, v in fields.items() if v is not None})
    except ValueError as e:  # pydantic names the field and the allowed values
        raise UsageError(f"--dtype/--quantization: {e.errors()[0]['msg']}") from None
    results = run_generate(section, adapter or [], prompt=prompt, file=file, use=use, chat=chat,
                           max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                           allow_pickle=allow_pickle, device=device)
    for request, completion in results:
        if is_json():
            emit("completion", adapter=request.adapter, prompt=request.prompt, messages=request.messages,
                 completion=completion)
        elif file is not None:
            row = {"prompt": request.prompt} if request.messages is None else {"messages": request.messages}
            typer.echo(json.dumps({**row, "adapter": request.adapter, "completion": completion}, ensure_ascii=False))
        else:
            typer.echo(completion)


@command(help="Print the effective settings a finished run recorded (RUN/run.json): what each recipe setting did, "
         "as `lorakit train` printed it after building the model.")
def explain(run: Path = typer.Argument(..., help="Run directory (output.dir of a finished run).")) -> None:
    from lorakit.training.effective import explain as explain_run

    typer.echo(explain_run(run))


@command(name="eval", help="Score a run, adapter or merged model on rows with answers: prompts rendered as in "
         "training, greedy batched generation, --metric per row, answer loss/perplexity; --base-too puts the base "
         "beside it. Writes eval.json. See docs/evaluate.md.")
def eval_(
    target: Path = typer.Argument(..., help="Run directory, adapter directory or merged model.", show_default=False),
    data: Path = typer.Option(..., "--data", help="Rows in the run's data format (alpaca, chat, completion, text): "
                              "the answer is the response the row teaches.", show_default=False),
    metric: str = typer.Option("exact", "--metric", help="exact | contains | regex (answer = pattern) | rouge-l; "
                               "compared with whitespace normalised and case folded."),
    base_too: bool = typer.Option(False, "--base-too", help="Also score the base model (the adapter switched off; "
                                  "for a merged model, the base it records) and show both side by side."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Prompts generated together (left-padded)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Most tokens generated per row."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="eval.json path (default: RUN/eval.json for a run, else ./eval.json); an "
        "existing file is moved aside, not overwritten."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read pickle (.bin) weights; they can run code."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
) -> None:
    from lorakit.console import adopt_transformers_output, console, emit, is_json, saved, stage
    from lorakit.tools.evaluate import default_output, format_summary, run_eval, write_report

    adopt_transformers_output()
    say = console(True)
    with stage(True, "evaluating"):
        report = run_eval(target, data, metric=metric, base_too=base_too, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, allow_pickle=allow_pickle, device=device, say=say)
    path = output or default_output(target)
    aside = write_report(report, path)
    if aside is not None:
        say(f"the earlier {path.name} was moved to {aside}")
    if is_json():
        emit("eval", totals=report["totals"], rows=report["scored_rows"])
    else:
        say(format_summary(report))
    saved(True)("eval report", path)


@command(name="inspect", help="Show a model's targetable linear modules with shapes, what the adapter trains per "
         "module and in total, and the LoRA rank table. Builds the model on the meta device: no weights loaded.")
def inspect_(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe to inspect (or use --model).", show_default=False),
    model: Optional[str] = typer.Option(None, "--model", help="Model dir, .gguf or hub id (overrides the recipe's)."),
    method: Optional[str] = typer.Option(None, "--method", help="Adapter method (as adapter.method)."),
    r: Optional[int] = typer.Option(None, "--r", min=1, help="Rank / bottleneck width (as adapter.r)."),
    targets: Optional[str] = typer.Option(
        None, "--targets", help="all-linear, comma-separated module names (q_proj,v_proj) or a regex."),
    set_: Optional[List[str]] = SetOpt,
) -> None:
    from lorakit.tools.inspect import format_report, inspect_model, inspect_sections

    model_section, adapter_section = inspect_sections(recipe, model, method, r, targets, set_ or [])
    typer.echo(format_report(inspect_model(model_section, adapter_section)))


@command(name="estimate-memory", help="Estimate training memory: exact parameter counts (meta device, no weights "
         "read), a per-line breakdown, full/LoRA/QLoRA comparison and fit advice. Flags override the recipe.")
def estimate_memory(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe to estimate (or use --model).", show_default=False),
    model: Optional[str] = typer.Option(
        None, "--model", help="Preset (mistral-7b, llama-3.1-405b, ...), model dir, config.json or hub id."),
    method: Optional[str] = typer.Option(None, "--method", help="full | lora | qlora (4-bit base)."),
    r: Optional[int] = typer.Option(None, "--r", min=1, help="LoRA rank (as adapter.r)."),
    targets: Optional[str] = typer.Option(
        None, "--targets", help="all-linear, comma-separated module names (q_proj,v_proj) or a regex."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Micro-batch per GPU."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=1, help="Tokens per sequence (as data.max_seq_len)."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adamw | adamw_8bit | paged_adamw_8bit."),
    gradient_checkpointing: Optional[bool] = typer.Option(
        None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in backward."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bfloat16 | float16 | float32 (auto: bfloat16)."),
    attn: Optional[str] = typer.Option(None, "--attn", help="auto | sdpa | eager | flash_attention_2."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="GPUs to train on."),
    strategy: str = typer.Option("ddp", "--strategy", help="ddp (replicated) | fsdp (sharded) when --gpus > 1."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Memory per GPU, e.g. 24GB: fit advice."),
    explain: bool = typer.Option(False, "--explain", help="Show each line's formula with the numbers."),
    as_json: bool = typer.Option(False, "--json", help="Print the estimate as one JSON document."),
    set_: Optional[List[str]] = SetOpt,
) -> None:
    import json

    from lorakit.console import emit, is_json
    from lorakit.memory.report import Flags, report

    flags = Flags(model=model, method=method, r=r, targets=targets, batch_size=batch_size, seq_len=seq_len,
                  optimizer=optimizer, gradient_checkpointing=gradient_checkpointing, dtype=dtype, attn=attn,
                  gpus=gpus, strategy=strategy, overrides=list(set_ or []))
    text, data = report(recipe, flags, gpu_memory, explain)
    if is_json():  # --json-logs: one event on one line
        emit("memory_estimate", **data)
    else:
        typer.echo(json.dumps(data, indent=2) if as_json else text)


def run() -> None:
    """Console-script entry point."""
    from lorakit.training.threads import passive_openmp_waits

    passive_openmp_waits()  # before anything imports torch: OpenMP reads its wait policy once, at load
    app()


if __name__ == "__main__":
    sys.exit(run())
