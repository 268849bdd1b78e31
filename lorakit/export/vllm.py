"""`--check vllm`: would vLLM's LoRA loader accept this adapter as saved? And the warning `lorakit train` gives at
start when the recipe will produce one it cannot serve.

The rules are vLLM's documented LoRA support (docs: features/lora; its PEFTHelper and LoRAModel loader): plain
LoRA (rsLoRA too) on the linear layers of the attention and MLP blocks, the embeddings and the LM head, rank at
most --max-lora-rank (16 unless raised, to one of its allowed sizes); no DoRA, no LoRA bias, no
modules_to_save copies or trainable tokens, no prompt-style methods. vLLM itself is not needed to run the check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from lorakit.config.methods import REGISTRY, UNSUPPORTED_LORA_OPTIONS
from lorakit.errors import CheckpointError
from lorakit.export.target import display_name
from lorakit.paths import is_gguf

VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values --max-lora-rank accepts
# Module names vLLM's LoRA layers wrap in Llama/Mistral/Qwen2-style models (qkv_proj/gate_up_proj are its fused
# names for the same weights).
VLLM_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
                     "gate_up_proj", "embed_tokens", "lm_head"}


def vllm_problems(config: dict, modules: set[str] | None, max_lora_rank: int | None = None) -> list[str]:
    """Why vLLM would refuse an adapter with this adapter_config.json whose LoRA sits on ``modules`` (short
    names; None when not known yet). Empty: it loads."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        return [f"peft_type {peft_type}: vLLM serves LoRA adapters only"]
    problems = []
    if config.get("use_dora"):
        problems.append("use_dora: vLLM has no DoRA kernels; merge the adapter (lorakit merge) and serve the model")
    if config.get("lora_bias"):
        problems.append("lora_bias: vLLM's LoRA layers add no bias")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']}: vLLM loads no fully trained module copies; "
                        "merge the adapter and serve the merged model")
    if config.get("trainable_token_indices"):
        problems.append("trainable_token_indices: vLLM loads no trained token rows")
    if replication := config.get("layer_replication"):
        # PEFT's replicate_layers rebuilds the decoder from these ranges (sharing the base's weights) and saves
        # LoRA weights for every new layer; vLLM builds the base's own layers and has no such step
        layers = sum(end - start for start, end in replication)
        problems.append(f"layer_replication {replication}: the adapter belongs to a {layers}-layer model that PEFT "
                        "stacks from the base's layers at load, which vLLM does not do (it serves the base's own)")
    unknown = sorted((modules or set()) - VLLM_LORA_MODULES)
    if unknown:
        problems.append(f"LoRA on {', '.join(unknown)}: vLLM has no LoRA layer for them; it supports "
                        f"{', '.join(sorted(VLLM_LORA_MODULES))}")
    rank = max([config.get("r", 8), *(config.get("rank_pattern") or {}).values()])
    limit = max_lora_rank or VLLM_DEFAULT_MAX_LORA_RANK
    if rank > VLLM_LORA_RANKS[-1]:
        problems.append(f"rank {rank}: above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]})")
    elif max_lora_rank is not None and rank > limit:
        problems.append(f"rank {rank} is above --max-lora-rank {limit}; serve with --max-lora-rank {serving_rank(rank)}")
    return problems


def serving_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds ``rank``."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])


def run_vllm_check(target: Path, max_lora_rank: int | None, *, base: str | None, say: Callable[[str], None]) -> None:
    """Print the verdict and the `vllm serve` command; exit 4 (adapter) when vLLM would refuse it."""
    from lorakit.adapters.files import check_recorded_base, find_adapter_dir, read_config, read_record, require_weights

    path = find_adapter_dir(target, "TARGET")
    require_weights(path, "TARGET")
    config = read_config(path)
    record = read_record(path)
    if base is not None:
        check_recorded_base(record, base, "--base")
    problems = vllm_problems(config, _lora_modules(path), max_lora_rank)
    dtypes = _saved_dtypes(path)
    if dtypes - {"F16", "BF16", "F32"}:
        problems.append(f"adapter weights stored as {', '.join(sorted(dtypes))}; vLLM loads float weights only")
    base_model = base or _served_base(record) or config.get("base_model_name_or_path") or "BASE"
    if problems:
        raise CheckpointError(f"{path}: vLLM's LoRA loader would refuse this adapter: " + "; ".join(problems))
    rank = max([config.get("r", 8), *(config.get("rank_pattern") or {}).values()])
    name = display_name(path)
    say(f"{path}: vLLM can serve this adapter (LoRA rank {rank} on {', '.join(sorted(_lora_modules(path)))}; "
        f"weights {', '.join(sorted(dtypes))}, cast to the model's dtype by vLLM)")
    say(f"vllm serve {base_model} --enable-lora --lora-modules {name}={path.resolve()} "
        f"--max-lora-rank {max_lora_rank or serving_rank(rank)}")


def _served_base(record: dict) -> str | None:
    """The base for `vllm serve`: a local model directory by the absolute path the run resolved (the command then
    works from any directory, as the adapter's absolute path does; the recipe may have named it relative to
    where training ran), anything else (a hub id, a .gguf file) as the recipe named it."""
    name, resolved = record.get("base_model"), record.get("base_model_path")
    if name and resolved and not is_gguf(name) and Path(resolved).is_absolute() and Path(resolved).is_dir():
        return resolved  # a hub id is recorded as itself, a .gguf base as the folder lorakit converted it into
    return name


def _header(path: Path) -> dict:
    from lorakit.models.checks import read_safetensors_header

    file = path / "adapter_model.safetensors"
    return read_safetensors_header(file)[0] if file.is_file() else {}


def _saved_dtypes(path: Path) -> set[str]:
    return {v["dtype"] for v in _header(path).values()}


def _lora_modules(path: Path) -> set[str]:
    """Short names of the modules the saved adapter holds LoRA weights for (what vLLM's loader checks)."""
    keys = [k for k in _header(path) if ".lora_" in k]
    return {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys}


def warn_if_not_servable(section, warn: Callable[[str], None]) -> None:
    """`lorakit train`: one warning at start when the recipe's adapter will not load in vLLM as saved (known from
    the recipe's adapter section, before PEFT resolves its targets)."""
    config = {**(section.model_extra or {}), "peft_type": REGISTRY[section.method].peft_type,
              "use_dora": section.method == "dora", "r": section.r or 0}
    targets = section.target_modules
    modules = {t.rsplit(".", 1)[-1] for t in targets} if isinstance(targets, list) else None  # regex: unknown yet
    problems = vllm_problems(config, modules)
    if not problems:
        return
    method = REGISTRY[section.method]
    options = [k for k in UNSUPPORTED_LORA_OPTIONS if config.get(k)]
    if method.mergeable and not options:
        then = "llama.cpp/Ollama and transformers will, and `lorakit merge` gives a model vLLM serves"
    else:  # nothing merges it, so neither a merged model nor a GGUF file can hold it
        why = method.not_mergeable or f"{', '.join(options)}: not a plain weight update"
        then = (f"nor will a merged model or llama.cpp/Ollama ({why}); `lorakit generate` and `lorakit eval` load it "
                "beside its base")
    warn(f"vLLM will not serve this adapter as saved ({'; '.join(problems)}); {then}. See docs/serving.md")
