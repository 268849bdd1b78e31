"""What `lorakit estimate-memory` reports: settings from a recipe and flags, the full/adapter/4-bit comparison,
fit advice for a memory budget, and the text and JSON renderings of an estimate.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from lorakit.adapters.card import quantized_tag
from lorakit.config.load import flags_named
from lorakit.errors import UsageError
from lorakit.memory.activations import attn_implementation, loss_path
from lorakit.memory.activations import activation_formulas
from lorakit.memory.estimate import estimate
from lorakit.memory.lines import Estimate, Settings, gib
from lorakit.memory.profile import ModelProfile

_SIZE = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """Bytes in '24GB', '80 GiB', '24576MB'. GB reads as GiB: a '24 GB' card holds 24 GiB."""
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"--gpu-memory: cannot read {text!r}; write it like 24GB, 80GiB or 24576MB")
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "g").lower()[0]])
    if size <= 0:  # 0GB would also turn the fit advice off without a word
        raise UsageError(f"--gpu-memory {text.strip()}: must be more than 0; give one GPU's memory, like 24GB, "
                         "80GiB or 24576MB")
    return size


# ----------------------------------------------------------------------------------------------------------
# Inputs: a recipe or --model, then the flags on top


@dataclass
class Flags:
    """Command-line knobs; None means: take the recipe's value (or the schema default)."""

    model: str | None = None
    method: str | None = None  # full | lora | qlora
    r: int | None = None
    targets: str | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    optimizer: str | None = None
    gradient_checkpointing: bool | None = None
    dtype: str | None = None
    attn: str | None = None
    gpus: int = 1
    strategy: str = "ddp"
    overrides: list = field(default_factory=list)  # --set KEY=VALUE, applied before the flags
    objective: str | None = None  # sft | dpo | ipo | orpo | simpo


# The recipe key each flag sets: flag --x-y is field x_y of Flags. A problem with such a key names the flag.
FLAG_KEYS = {"model": "model.name_or_path", "r": "adapter.r", "targets": "adapter.target_modules",
             "batch_size": "train.micro_batch_size", "seq_len": "data.max_seq_len", "optimizer": "train.optimizer",
             "gradient_checkpointing": "train.gradient_checkpointing", "dtype": "model.dtype",
             "attn": "model.attn_implementation", "objective": "train.objective"}


def given_flags(flags: Flags) -> dict[str, str]:
    """{recipe key: flag} for the flags given (config.load.flags_named)."""
    return {key: "--" + attr.replace("_", "-") for attr, key in FLAG_KEYS.items() if getattr(flags, attr) is not None}


def resolve_recipe(recipe_path: Path | None, flags: Flags):
    """The recipe (or a skeleton around --model) with --set and the flags applied, validated by the recipe schema.
    The recipe's keys a flag makes moot go; a key the user sets takes effect or is refused, as validate would."""
    from lorakit.config.load import apply_overrides, check_flag_over_set, parse_recipe, read_yaml
    from lorakit.config.load import section as recipe_section

    if recipe_path is not None:
        data, source = read_yaml(recipe_path), str(recipe_path)
    elif flags.model:
        # Only model/adapter/train/data knobs matter here; data.train and train.max_steps are placeholders.
        data, source = {"data": {"train": "(none)"}, "train": {"max_steps": 1}}, "estimate-memory"
    else:
        raise UsageError("estimate-memory: give a RECIPE or --model (a preset, model dir, config.json or hub id)")
    _drop_moot_keys({name: recipe_section(data, name, source) for name in ("model", "train")}, flags)
    apply_overrides(data, flags.overrides)
    sections = {name: recipe_section(data, name, source) for name in ("model", "adapter", "data", "train")}
    for key, (value, flag) in _flag_writes(flags, sections).items():
        check_flag_over_set(data, flags.overrides, key, value, flag)
        section, name = key.split(".")
        if value is None:
            sections[section].pop(name, None)
        else:
            sections[section][name] = value
    return parse_recipe(data, source=source)


def _drop_moot_keys(recipe: dict, flags: Flags) -> None:
    """The recipe's own keys that --objective or --method leave without effect (before --set: the user's stay)."""
    if flags.objective is not None:
        from lorakit.config.schema import OBJECTIVE_KEYS

        for key in ("beta", "label_smoothing", "reference", "simpo_gamma", "orpo_lambda"):
            if key not in OBJECTIVE_KEYS.get(flags.objective, {}):  # an unknown objective: the schema says so
                recipe["train"].pop(key, None)
    if flags.method in ("lora", "full"):  # the recipe's quantization keys go with its quantization
        for key in ("double_quant", "upcast_unquantized"):
            recipe["model"].pop(key, None)


def _flag_writes(flags: Flags, sections: dict) -> dict[str, tuple]:
    """{recipe key: (value, flag)} the flags write, None for a key they remove: each flag's own key, and what
    --method (the base's quantization) and --objective (data.format) imply."""
    from lorakit.config.load import parse_targets

    writes = {}
    for attr, key in FLAG_KEYS.items():
        value, name = getattr(flags, attr), "--" + attr.replace("_", "-")
        if isinstance(value, bool):
            writes[key] = (value, name if value else f"--no-{name[2:]}")
        elif value is not None:
            writes[key] = (parse_targets(value) if attr == "targets" else value, f"{name} {value}")
    if flags.objective is not None and flags.objective != "sft":
        writes["data.format"] = ("preference", f"--objective {flags.objective}")
    elif flags.objective == "sft" and sections["data"].get("format") == "preference":
        writes["data.format"] = (None, "--objective sft")
    if flags.method in ("lora", "full"):
        writes["model.quantization"] = ("none", f"--method {flags.method}")
    elif flags.method == "qlora" and sections["model"].get("quantization") not in ("nf4", "fp4"):
        writes["model.quantization"] = ("nf4", "--method qlora")
    return writes


def settings_from(recipe, flags: Flags) -> Settings:
    if flags.method not in (None, "full", "lora", "qlora"):
        raise UsageError(f"--method: must be full, lora or qlora; got {flags.method!r}")
    if flags.strategy not in ("ddp", "fsdp"):
        raise UsageError(f"--strategy: must be ddp or fsdp; got {flags.strategy!r}")
    if flags.gpus < 1:
        raise UsageError(f"--gpus: must be >= 1, got {flags.gpus}")
    if flags.strategy == "fsdp" and flags.gpus == 1:  # one GPU holds everything: nothing to shard
        raise UsageError("--strategy fsdp shards over several GPUs; add --gpus N (N above 1) or drop --strategy")
    dtype = recipe.model.dtype if recipe.model.dtype != "auto" else "bfloat16"  # auto: bf16 on a GPU that has it
    virtual = (recipe.adapter.model_extra or {}).get("num_virtual_tokens") or 0
    return Settings(
        method="full" if flags.method == "full" else "lora",
        quantization=recipe.model.quantization,
        double_quant=recipe.model.double_quant,
        upcast_unquantized=recipe.model.upcast_unquantized,
        dtype=dtype,
        batch_size=recipe.train.micro_batch_size,
        seq_len=recipe.data.max_seq_len,
        gradient_checkpointing=recipe.train.gradient_checkpointing,
        optimizer=recipe.train.optimizer,
        attn_implementation=recipe.model.attn_implementation,
        lora_dropout=recipe.adapter.lora_dropout or 0.0,  # None: the method has no LoRA dropout
        chunked_loss=recipe.train.chunked_loss,
        gpus=flags.gpus,
        strategy=flags.strategy,
        objective=recipe.train.objective,
        reference=recipe.train.reference,
        prompt_tokens=virtual if recipe.adapter.method == "prompt" else 0,
        prefix_tokens=virtual if recipe.adapter.method == "prefix" else 0,
    )


# ----------------------------------------------------------------------------------------------------------
# Comparison and fit advice


def compare_methods(p: ModelProfile, s: Settings) -> list[tuple[str, Estimate]]:
    """Full fine-tuning (fp32 and bf16) and the recipe's adapter method over a model.dtype and a 4-bit base, for
    the same model, batch, sequence and optimizer. The adapter rows are labelled with the method the profile
    was built for (its trainable parameters are that method's): lora/qlora, dora/qdora, ia3, prefix, ..."""
    four_bit = s.quantization if s.quantization in ("nf4", "fp4") else "nf4"
    method = p.adapter_method
    rows = [
        ("full (float32)", replace(s, method="full", quantization="none", dtype="float32")),
        ("full (bfloat16)", replace(s, method="full", quantization="none", dtype="bfloat16")),
        (f"{method} ({s.dtype})", replace(s, method="lora", quantization="none")),
        (f"{quantized_tag(method, True)} ({four_bit})", replace(s, method="lora", quantization=four_bit)),
    ]
    return [(label, estimate(p, settings)) for label, settings in rows]


def largest(fits, hi: int) -> int:
    """The largest n in [1, hi] with fits(n), for fits monotone (True then False); 0 when even 1 does not fit."""
    if not fits(1):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


@dataclass
class FitAdvice:
    budget: int
    per_device_bytes: int
    fits: bool
    max_batch_size: int
    max_seq_len: int
    changes: list  # (what to change, per-device bytes after it, fits)


def fit_advice(p: ModelProfile, s: Settings, budget: int) -> FitAdvice:
    def need(settings: Settings) -> int:
        return estimate(p, settings).per_device_bytes

    max_seq = p.geometry.max_positions or 1 << 20
    max_batch = largest(lambda b: need(replace(s, batch_size=b)) <= budget, 4096)
    max_len = largest(lambda n: need(replace(s, seq_len=n)) <= budget, max(max_seq, s.seq_len))
    candidates = []  # cheapest first: the same optimisation, then slower, then approximate, then less context
    if 0 < max_batch < s.batch_size:
        accum = math.ceil(s.batch_size / max_batch)
        what = f"micro_batch_size {max_batch} (and grad_accum x{accum} to keep the batch)"
        candidates.append((what, {"batch_size": max_batch}))
    if s.gpus > 1 and s.strategy == "ddp":
        candidates.append((f"FSDP over the {s.gpus} GPUs", {"strategy": "fsdp"}))
    if not s.gradient_checkpointing:
        candidates.append(("gradient_checkpointing: true (~30% slower)", {"gradient_checkpointing": True}))
    if s.optimizer == "adamw":
        candidates.append(("optimizer: paged_adamw_8bit", {"optimizer": "paged_adamw_8bit"}))
    if attn_implementation(p, s) == "eager":
        what = "attn_implementation: flash_attention_2 (no s² scores; needs the flash-attn package)"
        candidates.append((what, {"attn_implementation": "flash_attention_2"}))
    if s.quantization == "none":
        candidates.append(("4-bit base (--method qlora)", {"method": "lora", "quantization": "nf4"}))
    if 0 < max_len < s.seq_len:
        candidates.append((f"max_seq_len {max_len}", {"seq_len": max_len}))
    changes = [(what, need(replace(s, **update)), need(replace(s, **update)) <= budget) for what, update in candidates]
    keeps_data = [fits for (_, update), (_, _, fits) in zip(candidates, changes) if "seq_len" not in update]
    if candidates and not any(keeps_data):  # combine the changes that keep the data as it is, in cost order
        combined, whats = s, []
        for what, update in candidates:
            if "batch_size" in update or "seq_len" in update:
                continue
            combined, whats = replace(combined, **update), whats + [what]
            b = largest(lambda n: need(replace(combined, batch_size=n)) <= budget, s.batch_size)
            if b:  # a smaller micro-batch (more accumulation) is cheaper than the next change
                if b < s.batch_size:
                    combined, whats = replace(combined, batch_size=b), whats + [f"micro_batch_size {b}"]
                break
        changes.append(("together: " + " + ".join(whats), need(combined), need(combined) <= budget))
    total = need(s)
    return FitAdvice(budget, total, total <= budget, max_batch, max_len, changes)


# ----------------------------------------------------------------------------------------------------------
# Rendering


def describe(est: Estimate) -> str:
    s, p = est.settings, est.profile
    if s.method == "full":
        what = f"full fine-tuning in {s.dtype}"
    else:
        base = s.dtype if s.quantization == "none" else s.quantization
        if s.double_quant and s.quantization in ("nf4", "fp4"):
            base += " + double quant"
        ranks = sorted({m.r for m in p.lora_modules})
        names = sorted({m.name.rsplit(".", 1)[-1] for m in p.lora_modules})
        rank = "/".join(map(str, ranks))
        what = f"{p.adapter_method} r={rank} on {', '.join(names)}" if ranks else f"{p.adapter_method} adapter"
        what += f" over a {base} base"
    gc = "gradient checkpointing" if s.gradient_checkpointing else "no checkpointing"
    batch = f"micro-batch {s.batch_size}"
    if s.objective != "sft":
        reference = f", reference {s.reference}" if s.reference else ""
        batch = (f"{s.objective}{reference}; micro-batch {s.batch_size} pairs ({2 * s.batch_size} sequences: chosen "
                 "and rejected)")
    return (
        f"{what}; {batch} × {s.seq_len:,} tokens, {attn_implementation(p, s)} attention, "
        f"{loss_path(p, s)} loss, {s.optimizer}, {gc}"
    )


def render_text(est: Estimate, explain: bool, comparison: list | None, advice: FitAdvice | None) -> str:
    p, s = est.profile, est.settings
    pct = 100 * est.trainable_params / est.total_params
    out = [
        f"{p.name} ({p.source})",
        describe(est),
        f"trainable params: {est.trainable_params:,d} || all params: {est.total_params:,d} || trainable%: {pct:.4f}",
        "",
    ]
    for line in est.lines:
        out.append(f"  {line.label:<22} {gib(line.bytes):>14}")
        if explain:
            out.append(f"      = {line.formula}")
            if line.key == "activations":
                out.extend(f"        {f}" for f in activation_formulas(p, s))
    out.append(f"  {'total peak':<22} {gib(est.total_bytes):>14}")
    if explain:
        out.append(f"      = {est.peak_formula}")
    if s.gpus > 1:
        out.append(f"  {'per GPU (' + s.strategy + ')':<22} {gib(est.per_device_bytes):>14}")
        if explain:
            out.append(f"      = {est.per_device_formula}")
    out.extend(f"note: {n}" for n in est.notes)
    if comparison:
        out += ["", *comparison_table(comparison)]
    if advice:
        out += ["", *advice_lines(advice, s)]
    return "\n".join(out)


def comparison_table(rows: list[tuple[str, Estimate]]) -> list[str]:
    out = [
        "Comparison (same model, micro-batch, sequence and optimizer):",
        f"  {'method':<18}{'trainable':>16}{'weights':>14}{'train state':>14}{'activ/step':>14}{'per GPU':>14}"
        f"{'B/param':>9}",
    ]
    for label, est in rows:
        b = {line.key: line.bytes for line in est.lines}
        states = b["adapter_weights"] + b["gradients"] + b["optimizer_states"]
        dyn = est.per_device_bytes - b["weights"] - states - b["framework_overhead"]
        per_param = (b["weights"] + states) / est.profile.base_params
        out.append(
            f"  {label:<18}{est.trainable_params:>16,}{gib(b['weights']):>14}{gib(states):>14}{gib(dyn):>14}"
            f"{gib(est.per_device_bytes):>14}{per_param:>9.2f}"
        )
    out += [
        "  train state: adapter + gradients + optimizer states. activ/step: activations and loss buffers, or the",
        "  optimizer step's temporaries when larger. B/param: weights + train state per base parameter.",
        "  full (float32) with AdamW is 16 B/param (4 weight + 4 gradient + 8 moments): ~1.1 TB for a 70B model.",
        "  full (bfloat16): torch AdamW keeps its moments in bf16 (8 B/param); mixed precision with fp32 master",
        "  weights is 16 B/param again. Adapter rows (the recipe's method, over a model.dtype and a 4-bit base):",
        "  adapters, their gradients and moments are fp32 (PEFT), and a 4-bit base runs activations in model.dtype",
        "  (in fp32 with model.upcast_unquantized, as PEFT's prepare_model_for_kbit_training upcasts embeddings,",
        "  norms and head).",
    ]
    return out


def advice_lines(a: FitAdvice, s: Settings) -> list[str]:
    verdict = "fits" if a.fits else "does not fit"
    out = [
        f"Fit in {gib(a.budget)} per GPU: {verdict} (needs {gib(a.per_device_bytes)}).",
        f"  largest micro-batch at {s.seq_len:,} tokens: {a.max_batch_size or 'none (even 1 does not fit)'}",
        f"  longest sequence at micro-batch {s.batch_size}: {a.max_seq_len or 'none'}",
    ]
    if not a.fits:
        out.append("  changes, cheapest first:")
        for what, need, fits in a.changes:
            out.append(f"    {'fits' if fits else 'no  '}  {what}: {gib(need)}")
    return out


def to_json(est: Estimate, comparison: list | None, advice: FitAdvice | None) -> dict:
    p, s = est.profile, est.settings
    data = {
        "model": p.name,
        "source": p.source,
        "settings": {**s.__dict__, "attn_implementation": attn_implementation(p, s), "adapter": p.adapter_method,
                     "loss": loss_path(p, s)},
        "total_params": est.total_params,
        "trainable_params": est.trainable_params,
        "base_params": p.base_params,
        "bytes": {line.key: line.bytes for line in est.lines},
        "parts": {line.key: line.parts for line in est.lines if line.parts},
        "formulas": {line.key: line.formula for line in est.lines},
        "activation_formulas": activation_formulas(p, s),
        "total_bytes": est.total_bytes,
        "per_device_bytes": est.per_device_bytes,
        "peak_formula": est.peak_formula,
        "per_device_formula": est.per_device_formula,
        "notes": est.notes,
    }
    if comparison:
        data["comparison"] = [
            {"method": label, "trainable_params": e.trainable_params, "total_bytes": e.total_bytes,
             "per_device_bytes": e.per_device_bytes, "bytes": {line.key: line.bytes for line in e.lines}}
            for label, e in comparison
        ]
    if advice:
        data["fit"] = {
            "budget_bytes": advice.budget, "fits": advice.fits, "max_batch_size": advice.max_batch_size,
            "max_seq_len": advice.max_seq_len,
            "changes": [{"change": w, "per_device_bytes": n, "fits": f} for w, n, f in advice.changes],
        }
    return data


def report(recipe_path: Path | None, flags: Flags, gpu_memory: str | None, explain: bool) -> tuple[str, dict]:
    """The whole command: inputs → profile → estimate, comparison, advice → (text, JSON document)."""
    from lorakit.memory.profile import add_token_rows, inspect_model
    from lorakit.models.presets import load_model_config

    budget = parse_size(gpu_memory) if gpu_memory is not None else None  # '' is refused, not ignored
    with flags_named(given_flags(flags)):
        recipe = resolve_recipe(recipe_path, flags)
        settings = settings_from(recipe, flags)
        config, source = load_model_config(recipe.model.name_or_path)
        profile = inspect_model(config, recipe.adapter, recipe.model.name_or_path, source)
    profile = add_token_rows(config, profile, recipe)
    est = estimate(profile, settings)
    comparison = compare_methods(profile, settings)
    advice = fit_advice(profile, settings, budget) if budget else None
    return render_text(est, explain, comparison, advice), to_json(est, comparison, advice)
