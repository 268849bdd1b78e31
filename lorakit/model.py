"""Base model, tokenizer, quantization and adapter: recipe sections in, library objects out.

Each builder takes one typed recipe section and returns a transformers/PEFT object; the training loop
never branches on the method or the precision.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import torch

from lorakit.errors import SafetyError, UsageError
from lorakit.recipe import AdapterSection, ModelSection, Recipe

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def cache_dir() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))


# ----------------------------------------------------------------------------------------------------------
# Where the weights come from


def gguf_to_hf_dir(gguf_path: str | Path) -> Path:
    """Dequantize a .gguf file once into a cached Hugging Face safetensors directory and return it.

    transformers dequantizes GGUF on every load (~20 s for 135M params); the cache makes later loads fast.
    The key covers the file's path, size and modification time, so a replaced file is converted again.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    kwargs = {"gguf_file": gguf_path.name}
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # The dequantized weights are plain fp32: drop the GGUF quantizer so transformers will serialize them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs).save_pretrained(tmp)
    tmp.rename(out)
    return out


def resolve_model_path(section: ModelSection) -> str:
    """A local HF directory for a .gguf file; a local directory or hub id otherwise."""
    path = Path(section.name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"model.name_or_path: GGUF file {str(path)!r} not found")
        return str(gguf_to_hf_dir(path))
    if path.exists():
        if path.is_file():
            raise UsageError(
                f"model.name_or_path: {str(path)!r} is a file; give a model directory, a hub id or a .gguf file"
            )
        if not (path / "config.json").is_file():
            raise UsageError(f"model.name_or_path: {str(path)!r} has no config.json; is it a Hugging Face model dir?")
        return str(path)
    if section.name_or_path.startswith((".", "/", "~")) or section.name_or_path.count("/") > 1:
        raise UsageError(f"model.name_or_path: {section.name_or_path!r} not found")
    return section.name_or_path


def check_weights_safe(path: str, allow_pickle: bool = False) -> None:
    """Refuse pickle checkpoints (arbitrary code on load) unless explicitly allowed."""
    p = Path(path)
    if not p.is_dir() or allow_pickle:
        return
    if any(p.glob("*.safetensors")):
        return
    pickles = [f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise SafetyError(
            f"model.name_or_path: {path!r} holds pickle weights ({', '.join(sorted(pickles)[:3])}), which can run "
            "code when loaded; convert them to safetensors or pass --allow-pickle if you trust the source"
        )


def _hub_kwargs(section: ModelSection) -> dict:
    kwargs: dict = {"trust_remote_code": section.trust_remote_code}
    if section.revision:
        kwargs["revision"] = section.revision
    return kwargs


def load_tokenizer(section: ModelSection, model_path: str | None = None):
    from transformers import AutoTokenizer

    source = section.tokenizer or model_path or resolve_model_path(section)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_hub_kwargs(section))
    except (OSError, ValueError) as e:
        raise UsageError(f"model.tokenizer: cannot load a tokenizer from {source!r}: {_first_line(e)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # labels are masked explicitly, so pad == eos is safe
    tokenizer.padding_side = "right"
    return tokenizer


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ----------------------------------------------------------------------------------------------------------
# Builders


def build_quant_config(section: ModelSection, compute_dtype: torch.dtype):
    """bitsandbytes config for the frozen base, or None for a full-precision base."""
    if section.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if section.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=section.quantization,
        bnb_4bit_use_double_quant=section.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype,
    )


def load_base_model(section: ModelSection, model_path: str, allow_pickle: bool = False):
    from transformers import AutoModelForCausalLM

    check_weights_safe(model_path, allow_pickle)
    dtype = resolve_dtype(section.dtype)
    kwargs = _hub_kwargs(section)
    quant = build_quant_config(section, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if section.attn_implementation != "auto":
        kwargs["attn_implementation"] = section.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise UsageError(f"model.name_or_path: cannot load {model_path!r}: {_first_line(e)}") from None
    model.config.use_cache = False  # the KV cache only costs memory during training
    return model


def linear_module_names(model) -> list[str]:
    """Short names of the linear layers an adapter can target (the LM head excluded)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = []
    output_layer = model.get_output_embeddings()
    for full_name, module in model.named_modules():
        if module is output_layer or isinstance(module, BaseTunerLayer):
            continue
        if isinstance(module, torch.nn.Linear) or "Linear" in type(module).__name__:
            short = full_name.rsplit(".", 1)[-1]
            if short not in names:
                names.append(short)
    return names


def check_targets(model, target_modules) -> None:
    """Exit 2 naming the model's linear modules when a target matches nothing."""
    if target_modules == "all-linear":
        return
    available = linear_module_names(model)
    module_names = [n for n, _ in model.named_modules()]
    if isinstance(target_modules, str):
        if not any(re.fullmatch(target_modules, n) for n in module_names):
            raise UsageError(
                f"adapter.target_modules: regex {target_modules!r} matches no module; "
                f"linear modules are {', '.join(available)}"
            )
        return
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in module_names)]
    if missing:
        import difflib

        hints = [difflib.get_close_matches(m, available, n=1) for m in missing]
        hint = "".join(f" (did you mean {h[0]}?)" for h in hints if h)
        raise UsageError(
            f"adapter.target_modules: {', '.join(repr(m) for m in missing)} matches no module{hint}; "
            f"linear modules are {', '.join(available)}"
        )


def build_peft_config(section: AdapterSection):
    """The PEFT config for the recipe's adapter section; pass-through keys go to PEFT's own class."""
    from peft import LoraConfig, TaskType

    extras = dict(section.model_extra or {})
    if section.method in ("lora", "dora"):
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=section.r,
            lora_alpha=section.lora_alpha,
            lora_dropout=section.lora_dropout,
            target_modules=section.target_modules,
            use_dora=section.method == "dora",
            **extras,
        )
    raise UsageError(f"adapter.method: {section.method!r} is not supported yet; use lora")


def apply_adapter(model, section: AdapterSection):
    from peft import get_peft_model

    check_targets(model, section.target_modules)
    try:
        return get_peft_model(model, build_peft_config(section))
    except (TypeError, ValueError) as e:
        raise UsageError(f"adapter: PEFT rejected the adapter config: {_first_line(e)}") from None


def trainable_summary(model) -> str:
    """PEFT's own line: ``trainable params: N || all params: M || trainable%: P``."""
    trainable, total = model.get_nb_trainable_parameters()
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def enable_activation_checkpointing(model) -> None:
    # transformers 5 renamed gradient checkpointing to activation checkpointing; 5.0 has only the old name.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_model(recipe: Recipe, model_path: str | None = None, allow_pickle: bool = False):
    """The base model with the recipe's adapter applied, ready to train."""
    model_path = model_path or resolve_model_path(recipe.model)
    model = load_base_model(recipe.model, model_path, allow_pickle)
    if recipe.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return apply_adapter(model, recipe.adapter)
