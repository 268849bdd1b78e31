"""Trainable token rows in a merge (PEFT's trainable_token_indices, lorakit's adapter.trainable_tokens).

PEFT saves the trained rows' values, not a delta. Merging writes each embedding matrix they sit on whole: the
base's rows, grown to the vocabulary the adapter was trained with (model.add_tokens), with the saved rows in
place. A tied LM head stays tied to the grown embedding, as PEFT's forward ties it.
"""

from __future__ import annotations

import torch

from lorakit.errors import CheckpointError
from lorakit.merge.weights_io import StoredTensor, TensorReader

SUFFIX = ".token_adapter.trainable_tokens_delta"


def is_token_rows(key: str) -> bool:
    return key.endswith(SUFFIX)


def _indices(adapter, model, module: str) -> list[int]:
    """The row indices PEFT trained on ``module``: a list applies to the input embedding, a dict names modules."""
    spec = adapter.config.get("trainable_token_indices")
    if isinstance(spec, dict):
        key = next((k for k in spec if module == k or module.endswith("." + k)), None)
        if key is not None:
            return list(spec[key])
    elif spec is not None and model.get_input_embeddings() is model.get_submodule(module):
        return list(spec)
    raise CheckpointError(f"{adapter.path}: trainable token rows for {module} but adapter_config.json's "
                          "trainable_token_indices does not name it; the adapter is inconsistent")


def grown_embeddings(adapter, model, sources: dict[str, StoredTensor]) -> dict[str, torch.Tensor]:
    """{weight key: the whole merged embedding matrix} for every module with trainable token rows."""
    vocab = int(adapter.record.get("vocab_size") or 0)
    out = {}
    with TensorReader() as reader:
        for key, values in adapter.tensors.items():
            if not is_token_rows(key):
                continue
            module = key[: -len(SUFFIX)]
            stored = sources.get(f"{module}.weight")
            if stored is None:
                raise CheckpointError(f"{adapter.path}: trainable token rows for {module}, which the base does not have")
            base = reader.get(stored)
            rows = max(vocab, base.shape[0])
            index = torch.tensor(_indices(adapter, model, module))
            missing = sorted(set(range(base.shape[0], rows)) - set(index.tolist()))
            if missing:
                raise CheckpointError(f"{adapter.path}: rows {missing[0]}..{missing[-1]} of {module} were added to the "
                                      "vocabulary but not trained, so the adapter holds no values for them")
            grown = torch.cat([base, base.new_zeros(rows - base.shape[0], *base.shape[1:])])
            out[f"{module}.weight"] = grown.index_copy(0, index, values.to(grown.dtype))
    return out
