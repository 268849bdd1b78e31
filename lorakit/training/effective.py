"""The effective-settings block: what each recipe setting did, read back from the objects the run built.

`lorakit train` prints it once the model and optimizer exist and records it in run.json; `lorakit explain RUN`
prints it from there. Each line names the recipe keys it is evidence for; a key that no line can show has its
reason in NOT_OBSERVED (tests/test_effective.py walks the schema for both).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from lorakit.adapters.bottleneck import BottleneckAdapter
from lorakit.adapters.build import lora_layers
from lorakit.adapters.dropout import uses_lora_dropout
from lorakit.config.schema import CHAT_FORMATS, PREFERENCE_OBJECTIVES
from lorakit.errors import UsageError
from lorakit.paths import run_around
from lorakit.text import NotJsonObject, read_json_object
from lorakit.training.optim import describe_groups
from lorakit.training.threads import openmp_waits

# Keys whose effect shows later or elsewhere than in the built objects, and where to see it.
NOT_OBSERVED = {
    "train.log_every": "the spacing of the step records in metrics.jsonl",
    "train.eval_every": "the eval_loss records in metrics.jsonl",
    "train.save_every": "the step-N directories under DIR/checkpoints",
    "train.save_each_epoch": "the step-N directories under DIR/checkpoints",
    "train.keep_last": "how many step-N directories DIR/checkpoints keeps",
    "train.ddp_timeout": "only a stuck rank shows it (the job ends after that many seconds)",
    "train.max_grad_norm": "the grad_norm column of metrics.jsonl (clipped norms are reported before clipping)",
    "output.dir": "the run directory itself",
    "output.save": "DIR/adapter and DIR/merged after the run",
    "output.tensorboard": "DIR/tensorboard after the run",
    "data.cache": "the '(tokenized data from the cache)' note of the data line on a second run",
    "data.num_proc": "the time the first tokenization takes (the tokens are the same for any number of processes)",
    "train.eval_generate": "the eval_score records in metrics.jsonl (and the trackers and the plot)",
    "train.eval_metric": "the metric the eval_score records of metrics.jsonl were scored with",
    "output.report_to": "the tracker runs themselves (one per run, named after the run directory)",
    "output.project": "the experiment or project the tracker runs are filed under",
}


@dataclass
class Setting:
    label: str
    value: str
    keys: tuple[str, ...]


def _model_lines(recipe, model, tokenizer) -> list[Setting]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    weights = [p for n, p in base.named_parameters() if "lora_" not in n and p.dtype.is_floating_point]
    dtypes = Counter(str(p.dtype).removeprefix("torch.") for p in weights)
    quantized = Counter(type(m).__name__ for m in base.modules()  # bitsandbytes' own layers, not PEFT's wrappers
                        if type(m).__module__.startswith("bitsandbytes") and type(m).__name__.startswith("Linear"))
    quant = "none (0 quantized layers)"
    if quantized:
        cfg = getattr(base.config, "quantization_config", None)
        kind = getattr(cfg, "bnb_4bit_quant_type", "int8") if "Linear4bit" in quantized else "int8"
        storage = getattr(cfg, "bnb_4bit_quant_storage", None) if "Linear4bit" in quantized else "int8"
        double = getattr(cfg, "bnb_4bit_use_double_quant", False) if "Linear4bit" in quantized else False
        quant = (f"{sum(quantized.values())} layers {kind}, stored as {str(storage).removeprefix('torch.')}, "
                 f"double quant {'on' if double else 'off'}")
    added = [t for t in recipe.model.add_tokens if t in tokenizer.get_vocab()]
    return [
        Setting("model", f"{base.config.model_type} from {recipe.model.name_or_path}"
                + (f" @ {recipe.model.revision}" if recipe.model.revision else "")
                + (", remote code allowed" if recipe.model.trust_remote_code else ""),
                ("model.name_or_path", "model.revision", "model.trust_remote_code")),
        Setting("weights dtype", ", ".join(f"{n} tensors {d}" for d, n in dtypes.most_common()),
                ("model.dtype", "model.upcast_unquantized")),
        Setting("quantization", quant, ("model.quantization", "model.double_quant")),
        Setting("attention", str(getattr(base.config, "_attn_implementation", None)), ("model.attn_implementation",)),
        Setting("tokenizer", f"{type(tokenizer).__name__} from {tokenizer.name_or_path}, {len(tokenizer)} tokens"
                + (f", added {', '.join(added)}" if added else ""), ("model.tokenizer", "model.add_tokens")),
    ]


def _dropout(ps: list[float], model) -> str:
    """The dropout line's value: the probabilities, and whether the masks are LoraDropout's 16-bit ones."""
    fast = uses_lora_dropout(model) and any(p > 0 for p in ps)
    return f"p {ps}" + (", CPU masks from 16 random bits per element (LoraDropout)" if fast else "")


def _dropout_default(recipe) -> str:
    """Why the LoRA dropout is what it is, when the recipe left adapter.lora_dropout unset."""
    if not recipe.adapter.defaulted("lora_dropout"):
        return ""
    if recipe.train.objective in PREFERENCE_OBJECTIVES:
        return (f" (the default under train.objective {recipe.train.objective}: preference losses train without "
                "dropout, as TRL's do; adapter.lora_dropout sets one)")
    return " (the default; adapter.lora_dropout sets it)"


def _adapter_lines(recipe, model, init) -> list[Setting]:
    section, lines = recipe.adapter, []
    config = getattr(model, "peft_config", {}).get("default")
    lines.append(Setting("adapter", f"{section.method} ({type(config).__name__ if config else 'BottleneckConfig'})",
                         ("adapter.method",)))
    lora = lora_layers(model)
    if lora:
        short = Counter(n.rsplit(".", 1)[-1] for n, _ in lora)
        ranks = sorted({m.r["default"] for _, m in lora})
        scales = sorted({round(m.scaling["default"], 6) for _, m in lora})
        dropout = sorted({getattr(m.lora_dropout["default"], "p", 0.0) for _, m in lora})
        magnitudes = sum("default" in getattr(m, "lora_magnitude_vector", {}) for _, m in lora)
        lines += [
            Setting("modules adapted", f"{len(lora)}: " + ", ".join(f"{k} ×{v}" for k, v in short.items()),
                    ("adapter.target_modules",)),
            Setting("rank / scale", f"r {ranks}, scale {scales}"
                    + (" (rsLoRA: alpha/√r)" if getattr(config, "use_rslora", False) else " (alpha/r)"),
                    ("adapter.r", "adapter.lora_alpha")),
            Setting("dropout", _dropout(dropout, model) + _dropout_default(recipe), ("adapter.lora_dropout",)),
            Setting("DoRA magnitude vectors", str(magnitudes), ()),
        ]
    elif ia3 := [(n, m) for n, m in model.named_modules() if "default" in getattr(m, "ia3_l", {})]:
        # target_modules null picks PEFT's per-architecture modules: the line says which those were
        short = Counter(n.rsplit(".", 1)[-1] for n, _ in ia3)
        scaled_input = sorted({n.rsplit(".", 1)[-1] for n, m in ia3 if m.is_feedforward})
        lines.append(Setting("modules adapted", f"{len(ia3)}: " + ", ".join(f"{k} ×{v}" for k, v in short.items())
                             + f"; input scaled (feedforward): {', '.join(scaled_input) or 'none'}",
                             ("adapter.target_modules",)))
    elif section.method == "bottleneck":
        dropout = sorted({m.dropout.p for m in model.modules() if isinstance(m, BottleneckAdapter)})
        lines += [Setting("bottleneck", f"width {section.r}", ("adapter.r",)),
                  Setting("dropout", _dropout(dropout, model), ("adapter.dropout",))]
    summary = init.summary()
    # adapter.init_from replaces the fresh weights, so the init is that adapter's (the schema refuses both keys)
    how = f"weights of {summary['init_from']} (adapter.init_from)" if summary["init_from"] else summary[
        "init_lora_weights"]
    lines.append(Setting("init", f"{how}: base rewritten in {summary['base_rewritten_modules']}"
                         f" modules, converted at save: {'yes' if summary['converted_at_save'] else 'no'}"
                         + (f", EVA on {summary['eva_batches']} micro-batches" if summary["eva_batches"] else ""),
                         ("adapter.init_from",)))
    rows = getattr(config, "trainable_token_indices", None) or {}
    lines.append(Setting("trainable tokens", ", ".join(f"{k}: {len(v)} rows" for k, v in rows.items()) or "none",
                         ("adapter.trainable_tokens",)))
    for key in sorted(section.model_extra or {}):  # pass-through keys, as PEFT's config holds them now
        lines.append(Setting(f"adapter.{key}", repr(getattr(config, key, (section.model_extra or {})[key])), ()))
    return lines


def _training_lines(recipe, model, optimizer, scheduler, total_steps: int, world_size: int, loss: str,
                    batching: str) -> list[Setting]:
    import torch

    cfg = recipe.train
    inner = getattr(optimizer, "optimizer", optimizer)
    group = inner.param_groups[0]
    warmup = cfg.warmup_steps if cfg.warmup_ratio is None else f"{cfg.warmup_ratio} × {total_steps}"
    checkpointing = getattr(model.get_base_model() if hasattr(model, "get_base_model") else model,
                            "is_gradient_checkpointing", False)
    compiled = getattr(model, "_compiled_call_impl", None) is not None
    return [
        Setting("optimizer", f"{type(inner).__name__}{' (fused)' if inner.defaults.get('fused') else ''}, "
                f"{describe_groups(inner)}",
                ("train.optimizer", "train.learning_rate", "adapter.loraplus_lr_ratio", "adapter.loraplus_lr_embedding")),
        Setting("optimizer hyperparameters", f"betas {tuple(group['betas'])}, eps {group['eps']}, weight decay "
                f"{sorted({g['weight_decay'] for g in inner.param_groups if g['params']})}",
                ("train.adam_beta1", "train.adam_beta2", "train.adam_epsilon", "train.weight_decay")),
        Setting("schedule", f"{type(scheduler).__name__} ({cfg.lr_scheduler}), warmup {warmup} steps"
                f"{' from LR 0 at step 1' if cfg.warmup_steps or cfg.warmup_ratio else ''}, {total_steps} steps",
                ("train.lr_scheduler", "train.warmup_steps", "train.warmup_ratio", "train.max_steps", "train.epochs")),
        Setting("batch", f"{cfg.micro_batch_size} examples × {cfg.grad_accum} micro-steps × {world_size} "
                f"process{'es' if world_size > 1 else ''} per step; {batching}",
                ("train.micro_batch_size", "train.grad_accum", "data.padding_free", "data.group_by_length")),
        Setting("loss", loss, ("train.chunked_loss",)),
        Setting("objective", _objective(cfg), ("train.objective", "train.beta", "train.label_smoothing",
                                               "train.simpo_gamma", "train.orpo_lambda", "train.reference")),
        Setting("activation checkpointing", "on" if checkpointing else "off", ("train.gradient_checkpointing",)),
        Setting("speed knobs", f"torch.compile {'on' if compiled else 'off'}, liger {'on' if cfg.liger else 'off'}",
                ("train.compile", "train.liger")),
        Setting("seed", str(cfg.seed), ("train.seed",)),
        Setting("CPU threads", f"{torch.get_num_threads()} (torch intra-op); OpenMP waits: {openmp_waits()}",
                ("train.threads",)),
    ]


def _data_lines(recipe, tokenizer, data) -> list[Setting]:
    section, stats = recipe.data, data.train_stats
    sources = [s.path if s.weight == 1 else f"{s.path} (weight {s.weight:g})" for s in section.sources()]
    hub = "" if (section.split, section.subset) == ("train", None) else (
        f" (hub ids: split {section.split}" + (f", subset {section.subset}" if section.subset else "") + ")")
    evaluation = f"{len(data.eval)} examples" + (f" held out ({section.eval_split})" if section.eval_split else
                                                   f" from {section.eval}" if section.eval else "")
    return [
        Setting("data", f"{section.format} rows from {', '.join(map(str, sources))}{hub}"
                + (f" (columns {section.fields})" if section.fields else "") + f": {stats.summary().splitlines()[0]}",
                ("data.train", "data.format", "data.fields", "data.max_seq_len", "data.truncation",
                 "data.skip_bad_rows", "data.packing", "data.split", "data.subset")),
        Setting("supervised", f"{stats.supervised_tokens:,d} tokens, "
                + ("prompt and response" if section.train_on_inputs else "responses only"), ("data.train_on_inputs",)),
        Setting("chat template", _templates(section, tokenizer, stats.eos_token), ("data.chat_template",)),
        Setting("evaluation", evaluation if data.eval else "none", ("data.eval", "data.eval_split")),
    ]


def _templates(section, tokenizer, eos: str | None) -> str:
    """The chat template the chat and preference sources render with; each source's where they differ (the
    tokenizer, saved with the adapter, holds data.chat_template or its own)."""
    own = f"the tokenizer's ({tokenizer.name_or_path})"
    used: dict[str, list[str]] = {}
    for source in section.sources():
        if (source.format or section.format) in CHAT_FORMATS:
            name = source.chat_template or section.chat_template or (own if tokenizer.chat_template else None)
            used.setdefault(name or "none (plain prompts: the tokenizer has no chat template)", []).append(source.path)
    if not used:
        return "none (not a chat format)"
    if len(used) == 1:
        (name,) = used
    else:
        kept = section.chat_template or (own if tokenizer.chat_template else "none")
        name = "; ".join(f"{n} for {', '.join(paths)}" for n, paths in used.items()) + f" (the adapter keeps {kept})"
    return name if name.startswith("none") else f"{name}, end of turn {eos!r}"


def effective_settings(recipe, *, model, tokenizer, optimizer, scheduler, init, data, total_steps: int,
                       world_size: int, loss: str, batching: str) -> list[Setting]:
    """Every line of the block, from the unwrapped model and the optimizer as the loop will use them."""
    return (_model_lines(recipe, model, tokenizer) + _adapter_lines(recipe, model, init)
            + _training_lines(recipe, model, optimizer, scheduler, total_steps, world_size, loss, batching)
            + _data_lines(recipe, tokenizer, data))


def _objective(cfg) -> str:
    names = {"beta": "β", "label_smoothing": "label smoothing", "simpo_gamma": "γ", "orpo_lambda": "λ",
             "reference": "reference"}
    keys = [f"{label} {getattr(cfg, key)}" for key, label in names.items() if getattr(cfg, key) is not None]
    base = "; the base model's own dropout off, as TRL's disable_dropout" if cfg.objective in PREFERENCE_OBJECTIVES \
        else ""
    return cfg.objective + (": " + ", ".join(keys) if keys else "") + base


def format_block(settings: list[dict] | list[Setting]) -> str:
    rows = [s if isinstance(s, dict) else asdict(s) for s in settings]
    width = max(len(r["label"]) for r in rows)
    return "\n".join(["effective settings:"] + [f"  {r['label']:<{width}}  {r['value']}" for r in rows])


def as_records(settings: list[Setting]) -> list[dict]:
    return [{**asdict(s), "keys": list(s.keys)} for s in settings]


def explain(run_dir: str | Path) -> str:
    """`lorakit explain RUN`: the block a finished run recorded in RUN/run.json."""
    return format_block(recorded_settings(run_dir))


def recorded_settings(run_dir: str | Path) -> list[dict]:
    """The effective settings a finished run recorded in RUN/run.json ({label, value} records); exit 2 naming what
    is missing or damaged."""
    path = Path(run_dir) / "run.json"
    if Path(run_dir).is_file():  # run.json itself, or another file: not "FILE/run.json not found"
        hint = f"lorakit explain {Path(run_dir).parent}" if Path(run_dir).name == "run.json" else \
            "give the directory of a finished `lorakit train` run (its output.dir)"
        raise UsageError(f"explain: {run_dir} is a file, not a run directory; {hint}")
    if not path.is_file():
        if (run := run_around(run_dir, "run.json")) is not None:
            raise UsageError(f"explain: {path} not found; {run_dir} is a folder of the run {run}: "
                             f"lorakit explain {run}")
        if (Path(run_dir) / "recipe.yaml").is_file():
            raise UsageError(f"explain: {path} not found; the run in {run_dir} has not finished (run.json is written "
                             "when training ends)")
        raise UsageError(f"explain: {path} not found; give the directory of a finished `lorakit train` run")
    try:
        settings = read_json_object(path).get("effective_settings")
    except NotJsonObject as e:
        raise UsageError(f"explain: {e}; the run's record is damaged: rerun the training to write it again") from None
    if not settings:
        raise UsageError(f"explain: {path} has no effective settings (written by an older lorakit); rerun the "
                         "training to record them")
    if not (isinstance(settings, list) and all(isinstance(s, dict) and isinstance(s.get("label"), str) and "value" in s
                                               for s in settings)):
        raise UsageError(f"explain: {path}: effective_settings is not a list of {{label, value}} records; the run's "
                         "record is damaged: rerun the training to write it again")
    return settings
