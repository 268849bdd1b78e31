"""vLLM's rules for serving a LoRA adapter (its documented LoRA support: docs features/lora; its PEFTHelper and
LoRAModel loader): plain LoRA (rsLoRA too) on the linear layers of the attention and MLP blocks, the embeddings and
the LM head, rank at most --max-lora-rank (16 unless raised, to one of its allowed sizes); no DoRA, no LoRA bias, no
modules_to_save copies or trainable tokens, no prompt-style methods. Read by `lorakit export --check vllm`
(lorakit.export.vllm) and by `lorakit train`'s warning, without vLLM installed.
"""

from __future__ import annotations

from typing import Callable

from lorakit.config.methods import REGISTRY, UNSUPPORTED_LORA_OPTIONS

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


def warn_if_not_servable(section, warn: Callable[[str], None], modules: set[str] | None = None) -> None:
    """`lorakit train`: one warning, once the adapter is built and before training, when the recipe's adapter will
    not load in vLLM as saved. ``modules``: the short names of the modules the adapter sits on (the recipe's list
    when not given; a regular expression says nothing until PEFT resolves it)."""
    config = {**(section.model_extra or {}), "peft_type": REGISTRY[section.method].peft_type,
              "use_dora": section.method == "dora", "r": section.r or 0}
    targets = section.target_modules
    if modules is None and isinstance(targets, list):
        modules = {t.rsplit(".", 1)[-1] for t in targets}
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
