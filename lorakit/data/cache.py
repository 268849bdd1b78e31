"""The tokenized-data cache under $LORAKIT_CACHE/data/KEY/: safetensors arrays and JSON, never pickle.

KEY hashes everything tokenization depends on: the data files' bytes, the tokenizer, the chat template
text, the recipe's data section and the lorakit version. Any change makes a new key (a rebuild).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from lorakit.atomic import publish_dir
from lorakit.config.schema import DataSection
from lorakit.data.formats import Example

CACHE_FORMAT = 1
# Keys that act after tokenization: changing them reuses the tokenized data.
_UNKEYED = {"packing", "group_by_length", "padding_free", "cache"}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, merges, normalizer, special tokens)."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            for file in sorted(Path(tmp).iterdir()):
                digest.update(file.name.encode() + b"\0" + file.read_bytes())
    specials = [type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    digest.update(json.dumps(specials, default=str).encode())
    return digest.hexdigest()


def cache_key(section: DataSection, tokenizer, template: str | None, seed: int, hashes: list[str | None]) -> str | None:
    """The cache key, or None when a source's content cannot be hashed (a hub dataset id)."""
    from lorakit import __version__

    if any(h is None for h in hashes):
        return None
    material = {
        "format": CACHE_FORMAT,
        "lorakit": __version__,
        "sources": hashes,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template": template,
        "data": section.model_dump(mode="json", exclude=_UNKEYED & set(DataSection.model_fields)),
        "seed": seed if section.eval_split else None,  # the seed only picks the eval rows
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


def cache_root() -> Path:
    from lorakit.paths import cache_dir

    return cache_dir() / "data"


def _arrays(examples: list[Example], prefix: str = "") -> dict:
    import numpy as np

    lengths = np.array([len(e) for e in examples], dtype=np.int64)
    return {
        f"{prefix}input_ids": np.array([t for e in examples for t in e.input_ids], dtype=np.int32),
        f"{prefix}labels": np.array([t for e in examples for t in e.labels], dtype=np.int32),
        f"{prefix}offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        f"{prefix}prompt_len": np.array([e.prompt_len for e in examples], dtype=np.int64),
    }


def _save_examples(path: Path, examples: list[Example]) -> None:
    from safetensors.numpy import save_file

    arrays = _arrays(examples)
    if examples and examples[0].rejected is not None:  # preference pairs: the rejected sequences alongside
        arrays.update(_arrays([e.rejected for e in examples], "rejected_"))
    save_file(arrays, str(path))


def _examples(arrays: dict, prefix: str = "") -> list[Example]:
    ids, labels = arrays[f"{prefix}input_ids"].tolist(), arrays[f"{prefix}labels"].tolist()
    offsets, prompt_lens = arrays[f"{prefix}offsets"].tolist(), arrays[f"{prefix}prompt_len"].tolist()
    return [Example(ids[a:b], labels[a:b], p) for a, b, p in zip(offsets[:-1], offsets[1:], prompt_lens)]


def _load_examples(path: Path) -> list[Example]:
    from safetensors.numpy import load_file

    arrays = load_file(str(path))
    examples = _examples(arrays)
    if "rejected_input_ids" in arrays:
        for example, rejected in zip(examples, _examples(arrays, "rejected_"), strict=True):
            example.rejected = rejected
    return examples


def load(key: str) -> dict | None:
    """{split: (examples, stats dict)} from the cache, or None on a miss (or an unreadable entry)."""
    entry = cache_root() / key
    try:
        meta = json.loads((entry / "meta.json").read_text())
        splits = meta["splits"].items()
        return {split: (_load_examples(entry / f"{split}.safetensors"), stats) for split, stats in splits}
    except Exception:  # a missing, partial or foreign entry is a miss: the data is tokenized again
        return None


def save(key: str, splits: dict) -> None:
    """Write {split: (examples, stats dict)} atomically: a half-written entry is never read."""
    root = cache_root()
    entry, tmp = root / key, root / f".{key}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, (examples, _) in splits.items():
        _save_examples(tmp / f"{split}.safetensors", examples)
    (tmp / "meta.json").write_text(json.dumps({"splits": {s: stats for s, (_, stats) in splits.items()}}))
    try:
        publish_dir(tmp, entry)
    except OSError:  # a cache that cannot be written is not an error: the data is tokenized again next time
        pass


def load_reference(key: str, model_key: str) -> dict | None:
    """{split: [(chosen, rejected), ...]}: reference log-probs stored beside the tokenized pairs (train.reference:
    precomputed), or None."""
    from safetensors.numpy import load_file

    try:
        arrays = load_file(str(cache_root() / key / f"reference-{model_key}.safetensors"))
    except Exception:  # missing or unreadable: computed again
        return None
    return {split: [tuple(row) for row in values.tolist()] for split, values in arrays.items()}


def save_reference(key: str, model_key: str, splits: dict) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    entry = cache_root() / key
    if not entry.is_dir():
        return
    arrays = {split: np.array(pairs, dtype=np.float32).reshape(-1, 2) for split, pairs in splits.items()}
    tmp = entry / f".reference-{model_key}.tmp{os.getpid()}"
    try:
        save_file(arrays, str(tmp))
        os.replace(tmp, entry / f"reference-{model_key}.safetensors")
    except OSError:
        tmp.unlink(missing_ok=True)
