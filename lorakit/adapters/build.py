"""Building an adapter onto a base model and loading a saved one: PEFT's tuners, or lorakit's bottleneck."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lorakit.compat import dora_int8_broken_on_cpu, prefix_training_breaks
from lorakit.config.methods import build_peft_config, ia3_default_modules
from lorakit.config.schema import AdapterSection, Recipe
from lorakit.config.schema_train import PREFERENCE_OBJECTIVES
from lorakit.errors import CheckpointError, UsageError, first_line
from lorakit.config.tokens import tokens_to_train
from lorakit.models.loading import (
    enable_activation_checkpointing, linear_module_names, load_base_model, load_tokenizer, prepare_kbit_base,
    resolve_model_path,
)
from lorakit.models.tokens import grow_embeddings, recorded_vocab, token_indices, trainable_token_ids


def check_targets(model, target_modules, feedforward_modules=None) -> None:
    """Exit 2 naming the model's linear modules when a target (a name or a regex) matches nothing.

    None (the method's default) and 'all-linear' always match. IA3's feedforward modules must also match.
    """
    available = linear_module_names(model)
    module_names = [n for n, _ in model.named_modules()]
    if isinstance(target_modules, str) and target_modules != "all-linear":
        try:
            matched = any(re.fullmatch(target_modules, n) for n in module_names)
        except re.error as e:
            raise UsageError(f"adapter.target_modules: {target_modules!r} is not a valid regex ({e})") from None
        if not matched:
            parts = re.split(r"[,\s]+", target_modules.strip())
            as_list = (f"; a list is written [{', '.join(parts)}] (--set 'adapter.target_modules=[{', '.join(parts)}]')"
                       if len(parts) > 1 and set(parts) <= set(available) else "")
            raise UsageError(
                f"adapter.target_modules: regex {target_modules!r} matches no module (it must match the full "
                f"name, e.g. model.layers.0.self_attn.q_proj); linear modules are {', '.join(available)}{as_list}"
            )
    for key, names in (("target_modules", target_modules), ("feedforward_modules", feedforward_modules)):
        if not isinstance(names, (list, tuple, set)):
            continue
        missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in module_names)]
        if missing:
            import difflib

            hints = [difflib.get_close_matches(m, available, n=1) for m in missing]
            hint = "".join(f" (did you mean {h[0]}?)" for h in hints if h)
            raise UsageError(
                f"adapter.{key}: {', '.join(repr(m) for m in missing)} matches no module{hint}; "
                f"linear modules are {', '.join(available)}"
            )


def apply_adapter(model, section: AdapterSection, *, tokenizer_path: str | None = None,
                  low_cpu_mem_usage: bool = False, token_rows: dict[str, list[int]] | None = None):
    """The model with the recipe's adapter: a PeftModel, or a BottleneckModel for method bottleneck."""
    model_type = model.config.model_type
    if section.method == "ia3" and section.target_modules is None and ia3_default_modules(model_type) is None:
        raise UsageError(
            f"adapter.target_modules: PEFT has no default IA3 modules for model type {model_type!r}; name them "
            f"(and feedforward_modules); linear modules are {', '.join(linear_module_names(model))}"
        )
    if section.method == "dora" and dora_int8_broken_on_cpu(model):
        raise UsageError(
            "adapter.method: dora on an int8 base does not run on CPU (PEFT loses the int8 scales after the first "
            "step); use model.quantization: nf4, method lora, or a GPU"
        )
    if section.method == "prefix" and prefix_training_breaks():
        import peft
        import transformers

        raise UsageError(
            f"adapter.method: prefix tuning with peft {peft.__version__} under transformers "
            f"{transformers.__version__}: PEFT before 0.22 hands the prefix to the model under a name transformers "
            "5.40 no longer reads, so the model would never see it; pip install 'peft>=0.22'"
        )
    if (section.model_extra or {}).get("init_lora_weights") == "loftq" and not torch.cuda.is_available():
        raise UsageError(
            "adapter.init_lora_weights: loftq runs PEFT's LoftQ decomposition on a CUDA GPU and none is available "
            "(PEFT 0.21 computes it on cuda/xpu only, replace_lora_weights_loftq too); use gaussian, pissa or the "
            "default here"
        )
    config = build_peft_config(section, model_type=model_type, tokenizer_path=tokenizer_path, token_rows=token_rows)
    check_targets(model, getattr(config, "target_modules", None), getattr(config, "feedforward_modules", None))
    if section.method == "bottleneck":
        from lorakit.adapters.bottleneck import BottleneckModel

        return BottleneckModel(model, config)
    from peft import get_peft_model

    try:
        return get_peft_model(model, config, low_cpu_mem_usage=low_cpu_mem_usage)
    except (TypeError, ValueError) as e:
        raise UsageError(f"adapter: PEFT rejected the adapter config: {first_line(e)}") from None


def build_model(recipe: Recipe, model_path: str | None = None, allow_pickle: bool = False, tokenizer=None):
    """The base model with the recipe's adapter applied, ready to train. ``tokenizer``: the run's (with
    model.add_tokens), loaded here when new or trainable tokens need it and none is given."""
    model_path = model_path or resolve_model_path(recipe.model)
    model = load_base_model(recipe.model, model_path, allow_pickle)
    if recipe.model.quantization != "none" and recipe.model.upcast_unquantized:
        model = prepare_kbit_base(model)
    token_rows = None
    if tokens_to_train(recipe):
        tokenizer = tokenizer or load_tokenizer(recipe.model, model_path)
        grow_embeddings(model, len(tokenizer))
        token_rows = token_indices(model, trainable_token_ids(tokenizer, tokens_to_train(recipe)))
    if recipe.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if recipe.train.objective in PREFERENCE_OBJECTIVES:
        disable_base_dropout(model)
    model = apply_adapter(model, recipe.adapter, tokenizer_path=recipe.model.tokenizer or model_path,
                          token_rows=token_rows)
    if recipe.output.save != "adapter" and (recipe.adapter.model_extra or {}).get("lora_bias"):
        check_bias_mergeable(model, recipe.output.save)
    return model


def disable_base_dropout(model) -> int:
    """The base model's own dropout off (GPT-2's 0.1, OPT's, Phi's resid_pdrop), as TRL's preference trainers
    do by default (disable_dropout): the loss compares the policy's log-probs with the reference's, which runs
    without dropout, so base dropout in the policy's forward shifts every margin (a DPO run on GPT-2 started at
    losses 0.667-0.696 instead of ln 2). Before the adapter exists: its own dropout (adapter.lora_dropout,
    adapter.dropout) is the recipe's. The number of modules set to 0."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p, changed = 0.0, changed + 1
        rate = getattr(module, "attention_dropout", None)  # transformers' attention classes read it as a float
        if isinstance(rate, float) and rate > 0:
            module.attention_dropout, changed = 0.0, changed + 1
    return changed


def lora_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, layer) of every PEFT LoRA layer holding lorakit's adapter ("default")."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "r", {})]


def check_bias_mergeable(model, save: str) -> None:
    """adapter.lora_bias on a layer without a bias trains a bias the merge has nowhere to put: with output.save
    merged/both the run would fail at its end (lorakit merge refuses it), so it is exit 2 before training."""
    for name, module in model.named_modules():
        if any(getattr(module, "lora_bias", {}).values()) and module.get_base_layer().bias is None:
            short = name.removeprefix("base_model.model.")
            raise UsageError(f"adapter.lora_bias: {short} has no bias in the base model, so the bias lora_bias trains "
                             f"cannot be merged into it (output.save: {save}); set output.save: adapter, or remove "
                             "adapter.lora_bias")


def load_adapter(base_model, adapter_dir, is_trainable: bool = False):
    """A ready model from any adapter directory lorakit writes: PEFT's (adapter_config.json) or bottleneck."""
    from lorakit.adapters.bottleneck import is_bottleneck_dir, load_bottleneck

    adapter_dir = Path(adapter_dir)
    if is_bottleneck_dir(adapter_dir):
        return load_bottleneck(base_model, adapter_dir, is_trainable=is_trainable)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise CheckpointError(
            f"{str(adapter_dir)!r} holds no adapter (neither adapter_config.json nor bottleneck_config.json)"
        )
    from peft import PeftModel

    grow_embeddings(base_model, recorded_vocab(adapter_dir))  # trained with model.add_tokens: the same vocabulary
    try:
        return PeftModel.from_pretrained(base_model, adapter_dir, is_trainable=is_trainable)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{str(adapter_dir)!r}: cannot load the adapter: {first_line(e)}") from None


# Initialisations that read the base weights (SVD, quantization, data): the count is the same with the default.
_WEIGHT_READING_INITS = ("pissa", "loftq", "olora", "eva", "corda", "orthogonal")


def counting_section(adapter: AdapterSection) -> AdapterSection:
    """The same adapter with initialisations that need real weights (or a tokenizer) swapped for the default."""
    data = adapter.model_dump()
    if data.get("init_lora_weights") in _WEIGHT_READING_INITS:
        data["init_lora_weights"] = True
        data.pop("loftq_config", None)
    if adapter.method == "prompt":
        for key in ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"):
            data.pop(key, None)
    return AdapterSection.model_validate(data)


def continue_from(model, section: AdapterSection, allow_pickle: bool = False) -> Path:
    """adapter.init_from: the freshly built adapter takes a saved adapter's weights (continued training, e.g. DPO
    after SFT). Rank, alpha, method and the adapted modules must agree, else exit 4 naming the difference."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from lorakit.adapters.files import find_adapter_dir, load_adapter_tensors, read_config

    path = find_adapter_dir(section.init_from, "adapter.init_from")
    saved, ours = read_config(path), model.peft_config["default"]
    for key, label in (("r", "adapter.r"), ("lora_alpha", "adapter.lora_alpha"), ("use_dora", "adapter.method dora"),
                       ("use_rslora", "adapter.use_rslora")):
        if saved.get(key, False) != getattr(ours, key, False):
            raise CheckpointError(f"adapter.init_from: {path} was trained with {key} {saved.get(key)!r}, the recipe "
                                  f"has {getattr(ours, key)!r}; set {label} to match it")
    tensors = load_adapter_tensors(path, allow_pickle)
    expected = {k.removeprefix("base_model.model.") for k in get_peft_model_state_dict(model)}
    if set(tensors) != expected:
        differ = sorted(set(tensors) ^ expected)
        raise CheckpointError(f"adapter.init_from: {path} adapts other modules than the recipe ({len(differ)} tensors "
                              f"differ, first {differ[0]}); set adapter.target_modules as it was trained")
    try:
        set_peft_model_state_dict(model, {f"base_model.model.{k}": v for k, v in tensors.items()})
    except RuntimeError as e:  # shapes: another base model
        raise CheckpointError(f"adapter.init_from: {path} does not fit this base model: {first_line(e)}") from None
    return path
