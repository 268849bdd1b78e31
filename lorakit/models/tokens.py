"""New tokens (model.add_tokens) and trainable token rows (adapter.trainable_tokens).

New tokens go into the tokenizer and grow the model's embedding (and untied LM head). Their rows train through
PEFT's trainable_token_indices, which saves only those rows (the values, not a delta), so the adapter stays
small and loads on any base grown to the same vocabulary: the base's own rows are untouched, the new ones are
replaced by the saved values. The tokenizer with the new tokens is saved with the adapter.
"""

from __future__ import annotations

from lorakit.errors import UsageError


def add_new_tokens(tokenizer, tokens: list[str]) -> int:
    """Add ``tokens`` to the tokenizer (as added tokens, never split); returns how many were new."""
    return tokenizer.add_tokens(list(tokens)) if tokens else 0


def grow_embeddings(model, vocab_size: int) -> bool:
    """Resize the input (and output) embeddings to ``vocab_size`` when smaller; True when resized.

    No mean-resizing: every new row is an added token's row, which trains and is saved (the recipe check makes
    every added token trainable), so its initial value matters only as the start of training, drawn from the
    seeded model init instead of an extra multivariate-normal fit over the old rows.
    """
    if model.get_input_embeddings().num_embeddings >= vocab_size:
        return False
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    return True


def recorded_vocab(adapter_dir) -> int:
    """The vocabulary size an adapter was trained with (lorakit.json; 0 when not recorded)."""
    import json
    from pathlib import Path

    record = Path(adapter_dir) / "lorakit.json"
    return (json.loads(record.read_text()).get("vocab_size") or 0) if record.is_file() else 0


def trainable_token_ids(tokenizer, tokens: list[str]) -> list[int]:
    """The ids of ``tokens``, each of which must be one token of the tokenizer."""
    ids = []
    for token in tokens:
        encoded = tokenizer.encode(token, add_special_tokens=False)
        if len(encoded) != 1:
            raise UsageError(
                f"adapter.trainable_tokens: {token!r} is {len(encoded)} tokens for this tokenizer, not one; list "
                "single tokens, or add it as a new token with model.add_tokens"
            )
        ids.append(encoded[0])
    return ids


def token_indices(model, ids: list[int]) -> dict[str, list[int]]:
    """PEFT's trainable_token_indices: the rows on the input embedding, and on an untied LM head too (its new
    rows would otherwise keep their random init, unsaved). A tied head follows the embedding in PEFT itself."""
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    indices = {names[id(model.get_input_embeddings())]: list(ids)}
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        indices[names[id(head)]] = list(ids)
    return indices
