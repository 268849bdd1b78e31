"""A Hugging Face fast tokenizer as GGUF metadata: vocabulary, token types, merges, special ids, chat template.

llama.cpp rebuilds the tokenizer from these keys (its convert_hf_to_gguf.py is the reference for their meaning):
a byte-level BPE (Llama 3, Qwen2, SmolLM) is tokenizer model "gpt2" with the merges and the name of its
pre-tokenizer's split rules; a SentencePiece-style BPE with byte fallback (Llama 2, Mistral 7B) is model
"llama" with <0xNN> byte tokens and scores. Every stop token is a control token and named in the metadata, so
llama.cpp and Ollama end generation on the template's end-of-turn token as well as on the EOS.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lorakit.data.stop_tokens import stop_token_ids
from lorakit.errors import UsageError

# The split regexes of the tokenizers lorakit's architectures ship, by the names llama.cpp gives their rules.
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def pre_tokenizer_name(spec: dict) -> str | None:
    """llama.cpp's name for the tokenizer.json pre-tokenizer ``spec``, or None when it has none."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = parts[0].get("pattern", {}).get("Regex")
        return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(pattern)
    return None


def _prepends_space(spec: dict) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" before the text (a Prepend normalizer or Metaspace)."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"Prepend"' in text or ('"Metaspace"' in text and '"prepend_scheme": "never"' not in text)


def add_tokenizer(writer, tokenizer_dir: Path, n_vocab: int, log) -> list[int]:
    """Write the tokenizer in ``tokenizer_dir`` into ``writer``; returns the stop token ids it names."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(f"{tokenizer_dir}: a slow (Python) tokenizer; GGUF export needs tokenizer.json")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise UsageError(f"{tokenizer_dir}/tokenizer.json: a {spec['model']['type']} tokenizer; lorakit exports BPE "
                         "tokenizers (byte-level or SentencePiece-style) to GGUF")
    byte_fallback = bool(spec["model"].get("byte_fallback"))
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise UsageError(f"{tokenizer_dir}: the tokenizer has ids up to {max(vocab.values())} but the model's "
                         f"embedding has {n_vocab} rows; resize the embeddings before exporting")
    stops = stop_token_ids(tokenizer)
    added = tokenizer.added_tokens_decoder
    types = gguf.TokenType
    tokens, kinds = [f"[PAD{i}]" for i in range(n_vocab)], [types.UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        if byte_fallback and _BYTE_TOKEN.fullmatch(text):
            kinds[i] = types.BYTE
        elif i in added:
            kinds[i] = types.CONTROL if added[i].special or i in stops else types.USER_DEFINED
        else:
            kinds[i] = types.NORMAL
    for i in stops:
        kinds[i] = types.CONTROL  # llama.cpp ends generation only on control tokens

    if byte_fallback:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(_prepends_space(spec))
        # SentencePiece BPE keeps pieces in merge order, so a lower id is an earlier (higher-scoring) merge.
        writer.add_token_scores([-float(i) if k == types.NORMAL else 0.0 for i, k in enumerate(kinds)])
    else:
        pre = pre_tokenizer_name(spec)
        if pre is None:
            log("tokenizer: llama.cpp has no name for this pre-tokenizer; it will split text by its default rules "
                "(check the tokens with --verify)")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)

    special = gguf.SpecialVocab(tokenizer_dir, load_merges=not byte_fallback, n_vocab=n_vocab)
    if tokenizer.eos_token_id is not None:
        special.special_token_ids["eos"] = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = bos is not None and bool(ids) and ids[0] == bos
    special.add_special_token["eos"] = bool(ids) and ids[-1] == tokenizer.eos_token_id
    if tokenizer.chat_template and isinstance(tokenizer.chat_template, str):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
    # llama.cpp reads one end-of-turn and one end-of-message id besides the EOS; every stop token above is also
    # a control token, which llama.cpp and Ollama stop on when its text marks an end of turn.
    others = [i for i in stops if i != tokenizer.eos_token_id]
    if others:
        writer.add_eot_token_id(others[0])
    if len(others) > 1:
        writer.add_eom_token_id(others[1])
    return stops
