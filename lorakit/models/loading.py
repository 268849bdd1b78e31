"""Base model, tokenizer, quantization and adapter: recipe sections in, library objects out.

Each builder takes one typed recipe section and returns a transformers/PEFT object; the training loop
never branches on the method or the precision.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
from pathlib import Path

import torch

from lorakit.atomic import publish_dir
from lorakit.compat import keep_bnb_4bit_layout
from lorakit.config.schema import ModelSection
from lorakit.errors import SafetyError, UsageError, first_line
from lorakit.models.checks import folder_problem
from lorakit.paths import cache_dir, is_gguf, is_local, require_hub
from lorakit.models.tokens import add_new_tokens

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def resolve_device(name: str | None, default: str | None = None) -> str:
    """--device (eval, generate, merge): cpu, cuda or cuda:N, or when not given ``default`` (None: cuda where torch
    sees a GPU, else cpu); exit 2 for another name or a GPU torch cannot see here, before any model loads."""
    if name is None:
        return default or ("cuda" if torch.cuda.is_available() else "cpu")
    kind, colon, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (colon and (kind == "cpu" or not index.isdigit())):
        raise UsageError(f"--device {name}: choose cpu or cuda (cuda:N for one GPU of several)")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {name}: torch sees no CUDA GPU on this machine; use --device cpu")
        if colon and int(index) >= count:
            raise UsageError(f"--device {name}: torch sees {count} GPU(s) here, cuda:0 to cuda:{count - 1}")
    return name


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
    publish_dir(tmp, out_dir)
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
    if is_gguf(path):
        if not path.is_file():
            raise UsageError(f"model.name_or_path: GGUF file {str(path)!r} not found")
        try:
            return str(gguf_to_hf_dir(path))
        except (ValueError, KeyError, OSError, struct.error) as e:  # the GGUF reader's errors for a damaged file
            raise UsageError(f"model.name_or_path: {str(path)!r} is not a readable GGUF file ({first_line(e)}); "
                             "re-download it") from None
    if path.exists():
        if path.is_file():
            raise UsageError(
                f"model.name_or_path: {str(path)!r} is a file; give a model directory, a hub id or a .gguf file"
            )
        if not (path / "config.json").is_file():
            raise UsageError(f"model.name_or_path: {str(path)!r} has no config.json; is it a Hugging Face model dir?")
        if problem := folder_problem(path, ("config.json", "generation_config.json")):
            raise UsageError(f"model.name_or_path: {problem}; re-download or re-convert the model")
        return str(path)
    if is_local(section.name_or_path):
        raise UsageError(f"model.name_or_path: {section.name_or_path!r} not found")
    check_remote_code(section)  # a refusal for safety does not wait on the network
    require_hub("model.name_or_path", section.name_or_path, section.revision)
    return section.name_or_path


def model_dir_on_disk(model_path: str, revision: str | None = None) -> Path | None:
    """The folder resolve_model_path's answer is read from: the directory itself, or a hub id's snapshot in the
    Hugging Face cache; None when there is none."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model_path, "config.json", revision=revision)
    except ValueError:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


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
    key = "model.tokenizer" if section.tokenizer else "model.name_or_path"  # where the user named the source
    if section.tokenizer and is_local(section.tokenizer):
        if not Path(section.tokenizer).expanduser().exists():
            raise UsageError(f"model.tokenizer: {section.tokenizer!r} not found")
    elif section.tokenizer:
        require_hub(key, section.tokenizer, section.revision, "tokenizer_config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_hub_kwargs(section))
    except (OSError, ValueError) as e:
        raise UsageError(f"{key}: cannot load a tokenizer from {source!r}: {first_line(e)}") from None
    add_new_tokens(tokenizer, section.add_tokens)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # labels are masked explicitly, so pad == eos is safe
    tokenizer.padding_side = "right"
    return tokenizer


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


# Attention implementations that need a package transformers does not bring: (import name, pip name).
ATTENTION_PACKAGES = {"flash_attention_2": ("flash_attn", "flash-attn")}


def check_attention_package(section: ModelSection) -> None:
    """Exit 2 naming the package when model.attn_implementation needs one that is not installed."""
    import importlib.util

    module, package = ATTENTION_PACKAGES.get(section.attn_implementation, (None, None))
    if module is not None and importlib.util.find_spec(module) is None:
        raise UsageError(f"model.attn_implementation: {section.attn_implementation} needs the {package} package, "
                         f"which is not installed; pip install {package} (CUDA only), or use sdpa")


def load_base_model(section: ModelSection, model_path: str, allow_pickle: bool = False):
    from transformers import AutoModelForCausalLM

    check_weights_safe(model_path, allow_pickle)
    check_attention_package(section)
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
        raise UsageError(f"model.name_or_path: cannot load {model_path!r}: {first_line(e)}") from None
    model.config.use_cache = False  # the KV cache only costs memory during training
    if section.quantization in ("nf4", "fp4"):
        keep_bnb_4bit_layout(model)
    return model


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


def enable_activation_checkpointing(model) -> None:
    # transformers 5 renamed gradient checkpointing to activation checkpointing; 5.0 has only the old name.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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


def trainable_summary(model) -> str:
    """PEFT's own line: ``trainable params: N || all params: M || trainable%: P``."""
    trainable, total = model.get_nb_trainable_parameters()
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
