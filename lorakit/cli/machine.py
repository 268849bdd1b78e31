"""Commands about models and this machine, before any training: inspect, estimate-memory, doctor."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lorakit.cli.app import SetOpt, escape, command, number_option

@command(name="inspect", help="Show a model's targetable linear modules with shapes, what the adapter trains per "
         "module and in total, and the LoRA rank table. Builds the model on the meta device: no weights loaded.")
def inspect_(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe to inspect (or use --model).", show_default=False),
    model: Optional[str] = typer.Option(
        None, "--model", help="Preset (mistral-7b, llama-3.1-405b, ...), model dir, .gguf or hub id (overrides the "
        "recipe's)."),
    method: Optional[str] = typer.Option(None, "--method", help="Adapter method (as adapter.method)."),
    r: Optional[int] = typer.Option(None, "--r", min=1, help="Rank / bottleneck width (as adapter.r)."),
    targets: Optional[str] = typer.Option(
        None, "--targets", help="all-linear, comma-separated module names (q_proj,v_proj) or a regex."),
    set_: Optional[List[str]] = SetOpt,
) -> None:
    from lorakit.config.load import flags_named
    from lorakit.console import emit, is_json
    from lorakit.tools.inspect import format_report, inspect_model, inspect_sections, report_record

    given = {"model.name_or_path": ("--model", model), "adapter.method": ("--method", method),
             "adapter.r": ("--r", r), "adapter.target_modules": ("--targets", targets)}
    with flags_named({key: flag for key, (flag, value) in given.items() if value is not None}):
        model_section, adapter_section = inspect_sections(recipe, model, method, r, targets, set_ or [])
        report = inspect_model(model_section, adapter_section)
    if is_json():  # --json-logs: stdout holds only JSON lines
        emit("inspect", **report_record(report))
    else:
        typer.echo(format_report(report))


@command(name="estimate-memory", help="Estimate training memory: exact parameter counts (meta device, no weights "
         "read), a per-line breakdown, a comparison of full fine-tuning with the recipe's adapter method (over a "
         "model.dtype and a 4-bit base) and fit advice. Flags override the recipe.")
def estimate_memory(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe to estimate (or use --model).", show_default=False),
    model: Optional[str] = typer.Option(
        None, "--model", help="Preset (mistral-7b, llama-3.1-405b, ...), model dir, config.json or hub id."),
    method: Optional[str] = typer.Option(
        None, "--method", help="full | lora | qlora: full fine-tuning, or the recipe's adapter method (LoRA unless "
        "it names another) over an unquantized base (lora) or a 4-bit one (qlora)."),
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
    objective: Optional[str] = typer.Option(
        None, "--objective", help="sft | dpo | ipo | orpo | simpo (as train.objective): pairs run 2 sequences each."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Memory per GPU, e.g. 24GB: fit advice."),
    explain: bool = typer.Option(False, "--explain", help="Show each line's formula with the numbers."),
    as_json: bool = typer.Option(False, "--json", help="Print the estimate as one JSON document."),
    set_: Optional[List[str]] = SetOpt,
) -> None:
    import json

    from lorakit.console import emit, is_json
    from lorakit.errors import UsageError
    from lorakit.memory.report import Flags, report

    if explain and (as_json or is_json()):  # the JSON document always carries every formula --explain prints
        raise UsageError(f"--explain: {'--json' if as_json else '--json-logs'} already gives each line's formula "
                         "(formulas, activation_formulas, peak_formula, per_device_formula); drop --explain")

    flags = Flags(model=model, method=method, r=r, targets=targets, batch_size=batch_size, seq_len=seq_len,
                  optimizer=optimizer, gradient_checkpointing=gradient_checkpointing, dtype=dtype, attn=attn,
                  gpus=gpus, strategy=strategy, overrides=list(set_ or []), objective=objective)
    text, data = report(recipe, flags, gpu_memory, explain)
    if is_json():  # --json-logs: one event on one line
        emit("memory_estimate", **data)
    else:
        typer.echo(json.dumps(data, indent=2) if as_json else text)


@command(help="Check this machine: stack versions, GPUs and memory, bf16, bitsandbytes, hub, disk; and what to do.")
def doctor(
    timeout: float = number_option(3.0, "--timeout", low=0.1, high=60,
                                   help="Seconds to wait for the hub (skipped when HF_HUB_OFFLINE=1)."),
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
        out.print(f"{marks[f.status]} {f.name:<13} {escape(f.detail)}", markup=True)
        if f.fix and f.status != OK:
            out.print(f"     {'':<13} → {escape(f.fix)}", markup=True)
    if not is_quiet():
        out.print(f"{len(problems)} problem(s) found" if problems else "no problems found", markup=False)
