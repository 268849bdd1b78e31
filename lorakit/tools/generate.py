"""`lorakit generate`: text from one base model with any number of adapters, loaded once and chosen per prompt.

Every adapter is attached to the one shared base with PEFT (``load_adapter``) and activated per request
(``set_adapter``); the name ``base`` runs with all adapters disabled. This is the "adapter serving" pattern:
one copy of the base weights in memory, a few megabytes per task adapter.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from lorakit.adapters.build import load_adapter
from lorakit.adapters.files import (check_recorded_base, find_adapter_dir, is_model_dir, read_config, read_record,
                                    recorded_base, recorded_quantization, require_weights, target_dir)
from lorakit.compat import adapter_generate
from lorakit.config.schema import ModelSection
from lorakit.data.chat import check_messages
from lorakit.data.sources import BadRowError, jsonl_rows
from lorakit.data.stop_tokens import eos_ids, read_generation_eos, stop_token_ids
from lorakit.errors import CheckpointError, DataError, UsageError
from lorakit.models.checks import new_token_room
from lorakit.models.loading import load_base_model, load_tokenizer, resolve_device, resolve_model_path
from lorakit.models.tokens import grow_embeddings, recorded_vocab
from lorakit.training.scoring import check_new_tokens

BASE = "base"  # the adapter name that means "no adapter"
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def peft_name(name: str) -> str:
    """The name PEFT holds the adapter NAME under. PEFT refuses a '.' in it and finds an adapter's tensors by
    substring: a name inside its parameter prefix ('a' in 'lora_') or inside another adapter's name gets a
    warning that the other adapters' keys are missing. A fixed-width digest of NAME is neither."""
    return f"lorakit_{hashlib.sha256(name.encode()).hexdigest()[:16]}"


@dataclass
class Request:
    adapter: str
    prompt: str | None = None
    messages: list[dict] | None = None


def parse_adapter_specs(specs: list[str]) -> dict[str, Path]:
    """``NAME=DIR`` (or a bare DIR, named after it) → {name: dir}, in the order given."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep:
            directory = spec
            name = Path(spec).resolve().name
            name = Path(spec).resolve().parent.name if name == "adapter" else name  # RUN/adapter is named RUN
        if not _NAME.fullmatch(name) or name == BASE or name in adapters:
            raise UsageError(f"--adapter {spec}: names are letters, digits, '_', '.', '-', unique and not {BASE!r}; "
                             "write NAME=DIR")
        adapters[name] = find_adapter_dir(directory, f"--adapter {spec}")
        require_weights(adapters[name], f"--adapter {spec}")
    methods = {read_config(p).get("peft_type") for p in adapters.values()}
    if len(methods) > 1 or ("BOTTLENECK" in methods and len(adapters) > 1):
        raise UsageError(f"--adapter: adapters of different methods ({', '.join(sorted(methods))}), or several "
                         "bottleneck adapters, cannot share one base; run generate once per method")
    return adapters


def generation_target(target: str | None, model: str | None, adapters: list[str], say) -> tuple[str, list[str]]:
    """(--model, --adapter specs) once TARGET is placed: a run or adapter directory is the first adapter, a model
    directory (merged or full; RUN/merged of a run saved with output.save: merged) the model. Without --model the
    base is the one the adapters record."""
    if target is not None:
        path = target_dir(Path(target).expanduser())
        if is_model_dir(path):
            if model is not None:
                raise UsageError(f"--model {model}: {target} is a model already (merged or full); give one of the two")
            model = str(path)
        else:
            adapters = [target, *adapters]
    if model is None:
        if not adapters:
            raise UsageError("give a run directory (lorakit generate RUN --prompt TEXT), an adapter or merged model "
                             "directory, or --model BASE")
        model = recorded_base_of(adapters)
        say(f"base model: {model} (as the adapter records; --model chooses another)")
    return model, adapters


def recorded_base_of(specs: list[str]) -> str:
    """The base model the adapters record (lorakit.json, else PEFT's base_model_name_or_path), for a generate
    without --model; every adapter must name the same one."""
    bases = {}
    for name, path in parse_adapter_specs(specs).items():
        found, recorded = recorded_base(read_record(path), read_config(path).get("base_model_name_or_path"))
        if found is None:
            where = f"records {' and '.join(dict.fromkeys(recorded))}, which is not on this machine" if recorded \
                else "records no base model"
            raise UsageError(f"--adapter {name}: {path} {where}; give the base with --model BASE")
        bases[name] = found
    if len(set(bases.values())) > 1:
        listed = ", ".join(f"{name} {base}" for name, base in bases.items())
        raise UsageError(f"--adapter: the adapters record different bases ({listed}); choose one with --model BASE")
    return next(iter(bases.values()))


def read_requests(path: Path, default: str, known: set[str]) -> list[Request]:
    """Rows of ``{"prompt": TEXT}`` or ``{"messages": [...]}``, each with an optional ``"adapter": NAME``, read
    as training data's JSON Lines are (lorakit.data.sources.jsonl_rows)."""
    if not path.is_file():
        raise DataError(f"--file {path}: not found")
    requests = []
    try:
        for row in jsonl_rows(path):
            where, data = row.where, row.data
            if not (isinstance(data.get("prompt"), str) or isinstance(data.get("messages"), list)):
                raise DataError(f'{where}: expected {{"prompt": TEXT}} or {{"messages": [...]}}, optionally with '
                                '"adapter"')
            messages = None
            if isinstance(data.get("messages"), list):
                try:
                    messages = check_messages(data["messages"], where, "messages")
                except BadRowError as e:  # its remedy names a recipe key; generate has no recipe
                    raise DataError(f"{e.reason}; fix the row") from None
            elif not data["prompt"]:
                raise DataError(f"{where}: the prompt is empty; give the text to complete")
            adapter = data.get("adapter", default)
            if adapter not in known:
                raise DataError(f"{where}: adapter {adapter!r} is not loaded; loaded: {', '.join(sorted(known))}")
            requests.append(Request(adapter, data.get("prompt"), messages))
    except BadRowError as e:
        raise DataError(e.reason) from None  # its remedy, data.skip_bad_rows, means nothing to generate
    if not requests:
        raise DataError(f"--file {path}: no prompts")
    return requests


def trained_precision(section: ModelSection, adapters: dict[str, Path], say) -> ModelSection:
    """The base in the precision the adapters were trained on: without --quantization (``section`` does not set it)
    the quantization their lorakit.json records (adapters.files.recorded_quantization), said in one line. Adapters
    recorded on different precisions cannot share one base: exit 2 unless --quantization chooses."""
    if "quantization" in section.model_fields_set:
        return section
    recorded = {name: found for name, path in adapters.items() if (found := recorded_quantization(path))}
    if len({_precision(quant, double) for quant, double, _ in recorded.values()}) > 1:
        listed = ", ".join(f"{name} {_precision(quant, double)}" for name, (quant, double, _) in recorded.items())
        raise UsageError(f"--adapter: the adapters were trained on different base precisions ({listed}) and share "
                         "one base; choose it with --quantization (none, nf4, fp4 or int8), or run generate once per "
                         "precision")
    quant, double, source = next(iter(recorded.values()), ("none", True, None))
    if quant == "none":
        return section
    say(precision_note(quant, double, source))
    return section.model_copy(update={"quantization": quant, "double_quant": double})


def precision_note(quant: str, double: bool, source: Path) -> str:
    """The line generate and eval print when they load a base quantized because the adapter was trained so."""
    return (f"base loaded in {_precision(quant, double)}, as {source} records the adapter was trained; "
            "--quantization none loads it in full precision")


def _precision(quant: str, double: bool) -> str:
    return quant + (" without double quant" if quant in ("nf4", "fp4") and not double else "")


def load_for_generation(section: ModelSection, adapters: dict[str, Path], *, allow_pickle: bool, device: str,
                        model_path: str | None = None, base_option: str = "--model", adapter_label=None):
    """(model, tokenizer): the base once, every adapter attached to it under peft_name(its name). ``model_path``:
    resolve_model_path(section) where the caller has it already. ``base_option`` and ``adapter_label(name, path)``
    say in messages how the command was given the base and each adapter."""
    label = adapter_label or (lambda name, path: f"--adapter {name}={path}")
    short = adapter_label or (lambda name, path: f"--adapter {name}")
    from peft import PeftModel

    from lorakit.adapters.bottleneck import is_bottleneck_dir

    model_path = model_path or resolve_model_path(section)
    tokenizer = load_tokenizer(section, model_path)
    model = load_base_model(section, model_path, allow_pickle)
    model.config.use_cache = True  # load_base_model turns the KV cache off for training
    if section.quantization == "none":
        model = model.to(device)
    grown = max(adapters.values(), key=recorded_vocab, default=None)
    if grown is not None and grow_embeddings(model, recorded_vocab(grown)):
        tokenizer = load_tokenizer(section.model_copy(update={"tokenizer": str(grown)}))  # it has the new tokens
    if any(is_bottleneck_dir(p) for p in adapters.values()):  # lorakit's own method: one adapter, no names
        return load_adapter(model, next(iter(adapters.values()))).eval(), tokenizer
    for i, (name, path) in enumerate(adapters.items()):
        check_recorded_base(read_record(path), model_path, f"{short(name, path)}: {base_option}")
        try:
            if i == 0:
                model = PeftModel.from_pretrained(model, path, adapter_name=peft_name(name))
            else:
                model.load_adapter(path, adapter_name=peft_name(name))
        except (ValueError, RuntimeError, KeyError) as e:
            lines = [line.strip() for line in str(e).strip().splitlines()] or [type(e).__name__]
            # load_state_dict's first line only names the model class; the first mismatch says what differs
            why = next((line for line in lines if "mismatch" in line), lines[0])[:300]
            raise CheckpointError(f"{label(name, path)}: PEFT cannot attach it to {model_path} ({why}); is "
                                  f"{base_option} the base it was trained on?") from None
    return model.eval(), tokenizer


def generate_one(model, tokenizer, request: Request, *, chat: bool, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int, stop_ids: list[int] | None = None) -> str:
    """The completion for one request, with its adapter active (or all adapters off for ``base``), ending at
    the first of ``stop_ids`` (default: the model's generation config)."""
    if request.messages is not None or chat:
        messages = request.messages or [{"role": "user", "content": request.prompt}]
        if not tokenizer.chat_template:
            raise UsageError("--chat: the tokenizer has no chat template; drop --chat to send raw prompts")
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
    else:
        inputs = tokenizer(request.prompt, return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    from peft import PeftModel

    from lorakit.adapters.bottleneck import BottleneckModel

    context, generate = nullcontext(), partial(adapter_generate, model)
    if request.adapter == BASE and isinstance(model, (PeftModel, BottleneckModel)):
        context, generate = model.disable_adapter(), model.generate
    elif isinstance(model, PeftModel):
        model.set_adapter(peft_name(request.adapter))
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False}
    torch.manual_seed(seed)  # per request, so a prompt's sample does not depend on the prompts before it
    max_new_tokens = new_token_room(model, inputs["input_ids"].shape[1], max_new_tokens,
                                    adapter_on=request.adapter != BASE)
    with context, torch.no_grad():
        output = generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=stop_ids, **sampling)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def run_generate(section: ModelSection, adapter_specs: list[str], *, prompt: str | None, file: Path | None,
                 use: str | None, chat: bool, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                 allow_pickle: bool, device: str | None, say=print):
    """Yield (request, completion) for --prompt or every row of --file, loading the model once (quantized as the
    adapters were trained unless ``section`` sets model.quantization)."""
    if (prompt is None) == (file is None):
        raise UsageError("give exactly one of --prompt TEXT or --file PROMPTS.jsonl")
    if prompt == "":
        raise UsageError("--prompt is empty; give the text to complete")
    device = resolve_device(device)
    check_model_is_no_run(section.name_or_path)
    adapters = parse_adapter_specs(adapter_specs)
    known = {BASE, *adapters}
    default = use or next(iter(adapters), BASE)
    if default not in known:
        raise UsageError(f"--use {default}: no adapter of that name; loaded: {', '.join(sorted(known))}")
    requests = [Request(default, prompt=prompt)] if prompt is not None else read_requests(file, default, known)
    section = trained_precision(section, adapters, say)
    model, tokenizer = load_for_generation(section, adapters, allow_pickle=allow_pickle, device=device)
    check_new_tokens(model, max_new_tokens)
    stop_ids = generation_stop_ids(model, tokenizer, adapters.values())
    for request in requests:
        yield request, generate_one(model, tokenizer, request, chat=chat, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_p=top_p, seed=seed, stop_ids=stop_ids)


def check_model_is_no_run(name: str) -> None:
    """--model given a run directory or an adapter (no config.json): exit 2 with the command that loads it."""
    from lorakit.adapters.files import is_adapter_dir

    path = Path(name).expanduser()
    if not path.is_dir() or (path / "config.json").is_file():
        return
    if (path / "merged" / "config.json").is_file():
        raise UsageError(f"--model {name}: a run directory; its merged model is --model {path / 'merged'}")
    adapter = path if is_adapter_dir(path) else path / "adapter" if is_adapter_dir(path / "adapter") else None
    if adapter is not None:
        try:
            record = read_record(adapter)
        except (OSError, ValueError):  # damaged: --adapter names the file when it is given there
            record = {}
        record = record if isinstance(record, dict) else {}
        base = record.get("base_model_path") or record.get("base_model") or "BASE"
        raise UsageError(f"--model {name}: an adapter{' (of a run)' if adapter != path else ''}, which generate "
                         f"loads onto its base: --model {base} --adapter {adapter}")


def generation_stop_ids(model, tokenizer, adapter_dirs) -> list[int]:
    """Every token that ends an answer: the base's EOS, its template's end-of-turn tokens, and those each
    adapter's run recorded (an adapter tuned on another chat template ends turns with that template's token)."""
    recorded = [read_generation_eos(path) for path in adapter_dirs]
    return stop_token_ids(tokenizer, eos_ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None)), *recorded)
