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

from lorakit.errors import CheckpointError, SafetyError, UsageError
from lorakit.config.schema import AdapterSection, ModelSection, Recipe

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


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantize a .gguf file into a Hugging Face safetensors model directory (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    kwargs = {"gguf_file": gguf_path.name}
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # The dequantized weights are plain fp32: drop the GGUF quantizer so transformers will serialize them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs).save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def gguf_to_hf_dir(gguf_path: str | Path) -> Path:
    """The cached Hugging Face directory for a .gguf file, converting it on first use.

    transformers dequantizes GGUF on every load (~20 s for 135M params); the cache makes later loads fast.
    The key covers the file's path, size and modification time, so a replaced file is converted again.
    """
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return convert_gguf(gguf_path, out)


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


def check_remote_code(section: ModelSection) -> None:
    """trust_remote_code runs the repository's Python: only from a commit that cannot change under the user."""
    if not section.trust_remote_code or Path(section.name_or_path).expanduser().exists():
        return  # a local directory's code is the code on this disk; a hub revision means nothing there
    if not re.fullmatch(r"[0-9a-f]{40}", section.revision or ""):
        raise SafetyError(
            f"model.trust_remote_code: true runs code from the hub repository {section.name_or_path!r}; pin "
            f"model.revision to a full 40-character commit hash (got {section.revision!r}) so that code cannot "
            "change under you, or set model.trust_remote_code: false"
        )


def _hub_kwargs(section: ModelSection) -> dict:
    check_remote_code(section)
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
    if section.quantization in ("nf4", "fp4"):
        keep_bnb_4bit_layout(model)
    return model


def keep_bnb_4bit_layout(model) -> None:
    """Stop bitsandbytes (0.49+, on CPUs with AVX512-BF16) from repacking 4-bit weights in place at the first
    eval-mode forward. Only its inference kernel reads the repacked layout: after it, the backward pass (QLoRA
    gradients after an evaluation) and PEFT's dequantization (DoRA, merging) read it as the standard layout and
    compute wrong numbers. tests/adapters/test_methods.py::test_bnb_cpu_repacking_still_breaks_qlora fails once
    bitsandbytes no longer does this; then remove this function.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of decoder layers: the ModuleList with one entry per hidden layer."""
    n = model.config.get_text_config().num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise UsageError(f"model type {model.config.model_type!r}: cannot find its {n} decoder layers")


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
            raise UsageError(
                f"adapter.target_modules: regex {target_modules!r} matches no module (it must match the full "
                f"name, e.g. model.layers.0.self_attn.q_proj); linear modules are {', '.join(available)}"
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


def check_feedforward(target_modules, feedforward_modules) -> None:
    """IA3: every feedforward module must also be a target (PEFT requires it; checked here to say so clearly)."""
    if not isinstance(target_modules, (list, tuple, set)) or not isinstance(feedforward_modules, (list, tuple, set)):
        return
    outside = [m for m in feedforward_modules if m not in target_modules]
    if outside:
        raise UsageError(
            f"adapter.feedforward_modules: {', '.join(outside)} not in adapter.target_modules "
            f"({', '.join(target_modules)}); IA3 scales the input of a feedforward module, so each must also be a "
            "target: add it to target_modules or remove it from feedforward_modules"
        )


def ia3_default_modules(model_type: str) -> tuple[list[str], list[str]] | None:
    """PEFT's own per-architecture IA3 (target, feedforward) modules, or None when PEFT has none."""
    from peft.utils import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
    )

    if model_type not in TARGETS:
        return None
    return list(TARGETS[model_type]), list(FEEDFORWARD.get(model_type, []))


def build_peft_config(section: AdapterSection, *, model_type: str | None = None, tokenizer_path: str | None = None):
    """The adapter config of the recipe's adapter section: PEFT's class for the method (lorakit's
    BottleneckConfig for bottleneck), with the pass-through keys handed to that class unchanged.

    model_type selects IA3's per-architecture default modules; tokenizer_path is what prompt tuning's text
    init tokenizes with unless the recipe names tokenizer_name_or_path.
    """
    from lorakit.config.schema import peft_config_class

    cls = peft_config_class(section.method)
    extras = dict(section.model_extra or {})
    kwargs: dict = {}
    if section.method in ("lora", "dora"):
        kwargs = dict(r=section.r, lora_alpha=section.lora_alpha, lora_dropout=section.lora_dropout,
                      target_modules=section.target_modules, use_dora=section.method == "dora")
    elif section.method == "ia3":
        kwargs["target_modules"] = section.target_modules
        defaults = ia3_default_modules(model_type) if section.target_modules is None and model_type else None
        if defaults is not None:
            kwargs["target_modules"] = defaults[0]
            extras.setdefault("feedforward_modules", defaults[1])
        check_feedforward(kwargs["target_modules"], extras.get("feedforward_modules"))
    elif section.method == "prompt":
        extras.update(_prompt_init(extras, tokenizer_path))
    elif section.method == "bottleneck":
        kwargs["r"] = section.r
    if section.method != "bottleneck":
        from peft import TaskType

        kwargs["task_type"] = TaskType.CAUSAL_LM
    try:
        return cls(**kwargs, **extras)
    except (TypeError, ValueError) as e:
        message = _first_line(e)
        if message.startswith("adapter."):
            raise UsageError(message) from None
        raise UsageError(f"adapter: {cls.__name__} rejects these options: {message}") from None
    except ImportError as e:  # e.g. scipy for init_lora_weights: loftq (the lorakit[loftq] extra)
        raise UsageError(f"adapter: {cls.__name__} needs a package for these options: {_first_line(e)}") from None


def _prompt_init(extras: dict, tokenizer_path: str | None) -> dict:
    """prompt_tuning_init as PEFT spells it (TEXT, SAMPLE_VOCAB, RANDOM); text given implies TEXT init."""
    from peft import PromptTuningInit

    init = extras.get("prompt_tuning_init")
    if init is None and extras.get("prompt_tuning_init_text") is not None:
        init = "TEXT"
    if init is None:
        return {}
    choices = [m.value for m in PromptTuningInit]
    if str(init).upper() not in choices:
        raise UsageError(f"adapter.prompt_tuning_init: must be one of {', '.join(choices)}, got {init!r}")
    update = {"prompt_tuning_init": str(init).upper()}
    if update["prompt_tuning_init"] == "TEXT" and not extras.get("tokenizer_name_or_path"):
        update["tokenizer_name_or_path"] = tokenizer_path
    return update


def apply_adapter(model, section: AdapterSection, *, tokenizer_path: str | None = None,
                  low_cpu_mem_usage: bool = False):
    """The model with the recipe's adapter: a PeftModel, or a BottleneckModel for method bottleneck."""
    model_type = model.config.model_type
    if section.method == "ia3" and section.target_modules is None and ia3_default_modules(model_type) is None:
        raise UsageError(
            f"adapter.target_modules: PEFT has no default IA3 modules for model type {model_type!r}; name them "
            f"(and feedforward_modules); linear modules are {', '.join(linear_module_names(model))}"
        )
    if section.method == "dora" and getattr(model, "is_loaded_in_8bit", False) and model.device.type == "cpu":
        # PEFT 0.21's DoRA re-wraps the int8 weight on CPU and drops its scales: the second forward fails.
        # tests/adapters/test_methods.py::test_peft_dora_int8_cpu_still_broken fails once PEFT fixes it.
        raise UsageError(
            "adapter.method: dora on an int8 base does not run on CPU (PEFT loses the int8 scales after the first "
            "step); use model.quantization: nf4, method lora, or a GPU"
        )
    if (section.model_extra or {}).get("init_lora_weights") == "loftq" and not torch.cuda.is_available():
        raise UsageError(
            "adapter.init_lora_weights: loftq runs PEFT's LoftQ decomposition on a CUDA GPU and none is available; "
            "use gaussian, pissa or the default here"
        )
    config = build_peft_config(section, model_type=model_type, tokenizer_path=tokenizer_path)
    check_targets(model, getattr(config, "target_modules", None), getattr(config, "feedforward_modules", None))
    if section.method == "bottleneck":
        from lorakit.adapters.bottleneck import BottleneckModel

        return BottleneckModel(model, config)
    from peft import get_peft_model

    try:
        return get_peft_model(model, config, low_cpu_mem_usage=low_cpu_mem_usage)
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
    if recipe.model.quantization != "none" and recipe.model.upcast_unquantized:
        model = prepare_kbit_base(model)
    if recipe.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return apply_adapter(model, recipe.adapter, tokenizer_path=recipe.model.tokenizer or model_path)


def prepare_kbit_base(model):
    """PEFT's k-bit preparation of a bitsandbytes base (model.upcast_unquantized): frozen, the weights left
    unquantized (embeddings, norms, head) in fp32, which makes the residual stream fp32 too. Without it the
    base is frozen by the adapter's wrapper and computes like a LoRA base in model.dtype.

    Checkpointing is left to enable_activation_checkpointing, as for every base: it is non-reentrant, so it
    needs none of the input-gradient hook PEFT adds for the reentrant kind (and avoids transformers 5's
    deprecated gradient_checkpointing_enable).
    """
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


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

    try:
        return PeftModel.from_pretrained(base_model, adapter_dir, is_trainable=is_trainable)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{str(adapter_dir)!r}: cannot load the adapter: {_first_line(e)}") from None


def load_model_config(name_or_path: str, trust_remote_code: bool = False):
    """The transformers config of a local dir, a .gguf file (its metadata only) or a hub id."""
    from transformers import AutoConfig

    path = Path(name_or_path).expanduser()
    try:
        if path.suffix == ".gguf":
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        return AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UsageError(
            f"model.name_or_path: cannot read a model config from {name_or_path!r}: {_first_line(e)}"
        ) from None


def build_meta_model(config_or_path, trust_remote_code: bool = False):
    """The causal LM of a config (or of a model dir/.gguf/hub id) on the meta device: shapes only, no memory."""
    from transformers import AutoModelForCausalLM, PretrainedConfig

    config = config_or_path
    if not isinstance(config, PretrainedConfig):
        config = load_model_config(str(config_or_path), trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
