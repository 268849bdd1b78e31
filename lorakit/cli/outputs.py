"""Commands that use what training wrote: eval, generate, merge, export."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lorakit.cli.app import number_option, output_file_option, command

# The smallest sampling temperature: logits divided by less can overflow float32 to inf, and sampling then fails
# on NaN probabilities (vLLM raises such temperatures to the same 0.01). 0 means greedy.
MIN_TEMPERATURE = 0.01

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
    output: Optional[Path] = output_file_option(
        None, "eval.json path (default: RUN/eval.json for a run, else ./eval.json); an "
        "existing file is moved aside, not overwritten."),
    base: Optional[str] = typer.Option(
        None, "--base", help="Base model, in place of the recorded one: an adapter's (when its base has moved), or "
        "a merged model's for --base-too."),
    quantization: Optional[str] = typer.Option(
        None, "--quantization", help="none, nf4, fp4 or int8: the precision to load the model in (default: the "
        "adapter's recorded model.quantization)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read pickle (.bin) weights; they can run code."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
) -> None:
    from lorakit.console import adopt_transformers_output, console, emit, is_json, saved, stage
    from lorakit.tools.evaluate import check_report_output, default_output, format_summary, run_eval, write_report

    adopt_transformers_output()
    say = console(True)
    path = output or default_output(target)
    resolved = check_report_output(path, data)
    from lorakit.config.load import flags_named

    with stage(True, "evaluating"), flags_named({"model.name_or_path": "--base"} if base is not None else {}):
        report = run_eval(target, data, metric=metric, base_too=base_too, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, allow_pickle=allow_pickle, device=device, base=base,
                          quantization=quantization, say=say)
    aside = write_report(report, resolved)
    if aside is not None:
        say(f"the earlier {path.name} was moved to {aside}")
    if is_json():
        emit("eval", totals=report["totals"], rows=report["scored_rows"])
    else:
        say(format_summary(report))
    saved(True)("eval report", path)


@command(help="Generate with a base model and adapters loaded once onto it, chosen per prompt (greedy by default).")
def generate(
    target: Optional[str] = typer.Argument(
        None, help="A run directory, adapter directory or merged model to generate with: a run or adapter loads onto "
        "the base it records (as --adapter DIR), a merged model loads alone (as --model DIR).", show_default=False),
    model: Optional[str] = typer.Option(
        None, "--model", help="Base model: local directory, hub id or .gguf (default: the base the adapters record).",
        show_default=False),
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
    temperature: float = number_option(
        0.0, "--temperature", low=0.0, help=f"0 is greedy; {MIN_TEMPERATURE:g} or more samples."),
    top_p: Optional[float] = number_option(
        None, "--top-p", low=0.0, high=1.0, help="Nucleus sampling mass (with --temperature; default 1.0).",
        show_default=False),
    seed: Optional[int] = typer.Option(
        None, "--seed", min=0, max=2**32 - 1, show_default=False,
        help="Sampling seed, reset for every prompt (with --temperature; default 0)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Base dtype (as model.dtype in a recipe)."),
    quantization: Optional[str] = typer.Option(None, "--quantization", help="none, nf4, fp4 or int8 (as "
                                               "model.quantization; default: what the adapters' lorakit.json records)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read pickle (.bin) weights; they can run code."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
) -> None:
    import json

    from lorakit.config.load import flags_named
    from lorakit.console import adopt_transformers_output, console, emit, is_json
    from lorakit.errors import UsageError
    from lorakit.tools.generate import generation_target, run_generate
    from lorakit.config.schema import ModelSection

    adopt_transformers_output()
    if 0 < temperature < MIN_TEMPERATURE:
        raise UsageError(f"--temperature {temperature:g}: too small to sample with (the logits divided by it can "
                         f"overflow to inf); use 0 for greedy decoding or at least {MIN_TEMPERATURE:g}")
    if temperature == 0 and (top_p is not None or seed is not None):
        given = [name for name, value in (("--top-p", top_p), ("--seed", seed)) if value is not None]
        raise UsageError(f"{' and '.join(given)} appl{'y' if len(given) > 1 else 'ies'} only when sampling; "
                         "decoding is greedy without --temperature above 0")
    model, adapter = generation_target(target, model, list(adapter or []), console(True, stderr=True))
    flags = {"model.name_or_path": "--model", "model.dtype": "--dtype", "model.quantization": "--quantization"}
    fields = {"dtype": dtype, "quantization": quantization}
    try:
        section = ModelSection(name_or_path=model, **{k: v for k, v in fields.items() if v is not None})
    except ValueError as e:  # pydantic names the field and the allowed values
        error = e.errors()[0]
        flag = flags.get(f"model.{error['loc'][0]}" if error["loc"] else "", "--model")
        raise UsageError(f"{flag}: {error['msg']}") from None
    results = run_generate(section, adapter, prompt=prompt, file=file, use=use, chat=chat,
                           max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=1.0 if top_p is None else top_p, seed=seed or 0,
                           allow_pickle=allow_pickle, device=device, say=console(True, stderr=True))
    with flags_named(flags):  # generate has no recipe: its model keys are its flags (results come lazily)
        for request, completion in results:
            if is_json():
                emit("completion", adapter=request.adapter, prompt=request.prompt, messages=request.messages,
                     completion=completion)
            elif file is not None:
                row = {"prompt": request.prompt} if request.messages is None else {"messages": request.messages}
                typer.echo(json.dumps({**row, "adapter": request.adapter, "completion": completion},
                                      ensure_ascii=False))
            else:
                typer.echo(completion)


@command(help="Merge an adapter into its base model, shard by shard in bounded memory, into a plain Hugging Face "
         "model directory (loads without PEFT). Verifies merged logits against the adapter's on small models.")
def merge(
    adapter_dir: Path = typer.Argument(
        ..., help="Adapter directory (RUN/adapter), run dir or checkpoint (RUN/checkpoints/step-N).", show_default=False),
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
    quant: str = typer.Option("f16", "--quant", help="f16, bf16, q8_0 or q4_0 (gguf-lora: f32, f16, bf16 or q8_0)."),
    output: Optional[Path] = output_file_option(None, "FILE.gguf to write.", show_default=False),
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
        writing = [name for name, given in (("-o", output is not None), ("--format", format_ != "gguf"),
                                            ("--quant", quant != "f16"), ("--overwrite", overwrite),
                                            ("--verify", verify), ("--ollama", ollama), ("--allow-pickle", allow_pickle))
                   if given]
        if writing:
            raise UsageError(f"--check vllm writes nothing and loads no weights, so {', '.join(writing)} would do "
                             "nothing; drop them, or drop --check to write a GGUF file")
        return run_vllm_check(target, max_lora_rank, base=base, say=say)
    if max_lora_rank is not None:
        raise UsageError("--max-lora-rank applies only with --check vllm (a GGUF file has no rank limit)")
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
