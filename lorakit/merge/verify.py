"""Verifying a merge: the merged model and base+adapter give the same logits on a few prompts, within limits
that depend on the output dtype."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from lorakit.adapters.files import Adapter
from lorakit.errors import VerificationError
from lorakit.merge.plan import round_trip_weight
from lorakit.merge.plan import MergePlan
from lorakit.models.tokens import grow_embeddings


# Verification limits per output dtype: (max |Δlogit|, mean KL(adapter ‖ merged) in nats per token). In float32
# only summation order differs (tiny models: ~1e-7); rounding weights to 16 bits moves logits by up to ~0.1 on
# real models, so those are judged by KL alone (bf16 rounding of a 1B model costs ~1e-4..1e-3 nats).
VERIFY_LIMITS = {torch.float32: (1e-2, 1e-5), torch.bfloat16: (float("inf"), 1e-2), torch.float16: (float("inf"), 1e-3)}


VERIFY_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Translate to German: good morning, how are you?",
    "1 2 3 4 5 6 7 8 9 10 11 12",
)


def verify_merge(adapter: Adapter, base_dir: Path, merged_dir: Path, plan: MergePlan, device: str):
    """(max |Δlogit|, mean KL(adapter ‖ merged) per token) over VERIFY_PROMPTS, both models in float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    has_tokenizer = (merged_dir / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir if has_tokenizer else base_dir)
    inputs = [tokenizer(p, return_tensors="pt").input_ids.to(device) for p in VERIFY_PROMPTS]
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
        for name in plan.quantized_modules:  # the same NF4 round-trip the merge applied
            weight = model.get_submodule(name).weight
            weight.data = round_trip_weight(weight.data, adapter.record).to(device, torch.float32)
        grow_embeddings(model, plan.vocab_size or 0)  # added tokens: the adapter's rows replace the new ones
        model = PeftModel.from_pretrained(model, adapter.path).eval()
        reference = [model(ids).logits.float().cpu() for ids in inputs]
        del model
        gc.collect()
        model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).to(device).eval()
        merged = [model(ids).logits.float().cpu() for ids in inputs]
        del model
        gc.collect()
    return compare_logits(reference, merged)


def compare_logits(reference: list[torch.Tensor], other: list[torch.Tensor]) -> tuple[float, float]:
    """(max |Δlogit|, mean KL(reference ‖ other) in nats per token) over prompts' logits (1, tokens, vocab)."""
    ref, got = torch.cat([r[0] for r in reference]), torch.cat([m[0] for m in other])
    max_abs = (ref - got).abs().max().item()
    log_p, log_q = torch.log_softmax(ref.double(), -1), torch.log_softmax(got.double(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    return max_abs, kl


def check_verification(max_abs: float, kl: float, dtype: torch.dtype) -> str:
    """The verify line when the figures are within VERIFY_LIMITS for ``dtype``; VerificationError (exit 1) if not."""
    limit_abs, limit_kl = VERIFY_LIMITS.get(dtype, VERIFY_LIMITS[torch.bfloat16])
    name = str(dtype).removeprefix("torch.")
    line = (f"verify: max |Δlogit| {max_abs:.3g}, KL {kl:.3g} nats/token "
            f"(limits {limit_abs:g}, {limit_kl:g} for {name})")
    if not (max_abs <= limit_abs and kl <= limit_kl):  # NaN fails too
        raise VerificationError(f"{line}: the merged model does not reproduce the adapter; nothing was written "
                                "(rerun with --no-verify to write it anyway)")
    return line + ": ok"
