"""`--verify`: the GGUF read back by a second, independent reader (transformers' GGUF loader, the path lorakit
uses to start from a .gguf) and compared with the Hugging Face model it came from: the same token ids for the
prompts, every weight within the rounding of the quantization, and logits within its limit.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from lorakit.errors import VerificationError
from lorakit.merge.verify import VERIFY_PROMPTS, compare_logits

# Each weight read back against the original: ||Δ|| / ||W||. Rounding costs up to ~3e-4 (f16), ~3e-3 (bf16), ~1e-2
# (q8_0) and ~0.15 (q4_0) on real weights; a weight in the wrong layout (q/k rows not regrouped for llama.cpp's
# RoPE, a transposed matrix) is off by ~1.4. This check holds however flat a model's outputs are.
WEIGHT_LIMITS = {"f16": 1e-3, "bf16": 1e-2, "q8_0": 3e-2, "q4_0": 0.3}
# Mean KL(HF ‖ GGUF) in nats per token over the prompts, for the 8- and 16-bit files (SmolLM2-135M measures 3e-6
# in f16 and 2e-3 in q8_0). 4-bit costs a model-dependent amount (0.6 nats on SmolLM2-135M, whose weights were
# already 4-bit): reported, not judged.
KL_LIMITS = {"f16": 1e-3, "bf16": 1e-2, "q8_0": 1e-2}
CHAT_PROBE = [{"role": "user", "content": "What is the capital of France?"}]


def _token_ids(tokenizer, chat: bool) -> list[list[int]]:
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in VERIFY_PROMPTS]
    if chat and tokenizer.chat_template:
        ids.append(tokenizer(tokenizer.apply_chat_template(CHAT_PROBE, tokenize=False, add_generation_prompt=True),
                             add_special_tokens=False)["input_ids"])
    return ids


def verify_gguf(gguf_file: Path, model_dir: Path, quant: str) -> tuple[float, float]:
    """(max |Δlogit|, mean KL); raises VerificationError when the tokens differ or the KL is over the limit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = {"pretrained_model_name_or_path": gguf_file.parent, "gguf_file": gguf_file.name}
    # transformers rebuilds a SentencePiece-style ("llama") GGUF tokenizer without the "▁" that llama.cpp and
    # the original put after a special token, so the chat turn (which starts with one) is compared only for
    # byte-level BPE tokenizers; tests/test_llama_cpp.py compares llama.cpp's own tokens.
    import gguf

    field = gguf.GGUFReader(gguf_file).fields[gguf.Keys.Tokenizer.MODEL]
    chat = field.contents() != "llama"
    reference_tokens = _token_ids(AutoTokenizer.from_pretrained(model_dir), chat)
    read_back = _token_ids(AutoTokenizer.from_pretrained(**where), chat)
    if read_back != reference_tokens:
        bad = next(i for i, (a, b) in enumerate(zip(reference_tokens, read_back)) if a != b)
        raise VerificationError(f"{gguf_file.name}: the GGUF's tokenizer splits prompt {bad} differently from the "
                                "model's; nothing was written")
    inputs = [torch.tensor([ids]) for ids in reference_tokens if ids]
    with torch.no_grad():
        read = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval()
        check_weights(gguf_file.name, read, model_dir, quant)
        logits = [read(ids).logits.float() for ids in inputs]
        del read
        gc.collect()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        reference = [model(ids).logits.float() for ids in inputs]
        del model
        gc.collect()
    max_abs, kl = compare_logits(reference, logits)
    if quant in KL_LIMITS and not kl <= KL_LIMITS[quant]:
        raise VerificationError(f"{gguf_file.name}: logits differ from the model's (mean KL {kl:.2e} nats/token, limit "
                                f"{KL_LIMITS[quant]:.0e} for {quant}); nothing was written")
    return max_abs, kl


def check_weights(name: str, read, model_dir: Path, quant: str) -> None:
    """Every weight of the model transformers read from the GGUF against the original, one tensor at a time."""
    from lorakit.merge.weights_io import TensorReader, list_tensors

    params = dict(read.named_parameters(remove_duplicate=False))
    with TensorReader() as reader:
        for stored in list_tensors(model_dir):
            if stored.key not in params or not stored.dtype.is_floating_point:
                continue
            original = reader.get(stored).float()
            error = (params[stored.key].float() - original).norm() / original.norm().clamp_min(1e-12)
            if not error <= WEIGHT_LIMITS[quant]:
                raise VerificationError(f"{name}: weight {stored.key} reads back {error:.2g} away from the original "
                                        f"(limit {WEIGHT_LIMITS[quant]:g} for {quant}); nothing was written")
