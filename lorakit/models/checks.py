"""Model and adapter files checked before anything loads them: a damaged file is named, with the fix, in one line.

safetensors files are checked from their header alone (length, JSON, every tensor's byte range inside the
file), so a truncated download, a garbage file or an absurd declared header length never reaches the loader.
JSON files must hold an object. ``shape_problem`` compares the weights' shapes with the config's model (built
on the meta device), ``vocab_problem`` the tokenizer's size with the vocabulary.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from lorakit.console import warner
from lorakit.errors import UsageError
from lorakit.text import json_object_problem
from lorakit.models.meta import build_meta_model

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file, or None."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path} is truncated ({size} bytes)"
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER, size - 8):
            return (f"{path} declares a {length:,}-byte header in a {size:,}-byte file: truncated, or not a "
                    "safetensors file")
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            return f"{path} has no readable header: not a safetensors file"
    if not isinstance(header, dict):
        return f"{path} has no readable header: not a safetensors file"
    data = size - 8 - length
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"{path}: tensor {key} has no valid byte range: a damaged file"
        if offsets[1] > data:
            return f"{path} is truncated: tensor {key} ends at byte {offsets[1]:,} of the data, the file holds {data:,}"
    return None


def folder_problem(folder: Path, json_names: tuple[str, ...]) -> str | None:
    """The first damaged file among ``folder``'s safetensors and the named JSON files."""
    for name in json_names:
        if (folder / name).is_file() and (problem := json_object_problem(folder / name)):
            return problem
    for path in sorted(folder.glob("*.safetensors")):
        if problem := safetensors_problem(path):
            return problem
    return None


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header, byte offset of the data section): the format's 8-byte little-endian length, then JSON."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def stored_shapes(model_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, file name)} from the headers of the folder's safetensors files (checked first)."""
    shapes = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        shapes.update({k: (tuple(v["shape"]), path.name) for k, v in read_safetensors_header(path)[0].items()})
    return shapes


SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files in index order: safetensors if any, else pickle (.bin)."""
    for index, single in ((SAFETENSORS_INDEX, "model.safetensors"), (PICKLE_INDEX, "pytorch_model.bin")):
        if (model_dir / index).is_file():
            names = json.loads((model_dir / index).read_text())["weight_map"].values()
            return [model_dir / n for n in dict.fromkeys(names)]
        if (model_dir / single).is_file():
            return [model_dir / single]
    return sorted(model_dir.glob("*.safetensors"))


FINGERPRINT_BYTES = 64  # of each tensor: a fine-tune, or a LoRA merged in, changes the first row of what it trains


def weights_fingerprint(model_dir: Path) -> str | None:
    """A cheap identity of a model directory's weights: sha256 over each tensor's name, dtype, shape and first
    64 bytes (one small read per tensor; the same for any sharding). Two checkpoints of one architecture differ
    in it; so does the same model saved in another dtype. None without safetensors files (pickle weights are not
    opened here) or when one is damaged."""
    import hashlib

    files = weight_files(Path(model_dir))  # what the model loads: a folder may hold others (Mistral's consolidated.*)
    try:
        if not files or any(path.suffix != ".safetensors" or safetensors_problem(path) for path in files):
            return None
        samples = []
        for path in files:
            header, start = read_safetensors_header(path)
            with open(path, "rb") as f:
                for name, entry in header.items():
                    begin, end = entry["data_offsets"]
                    f.seek(start + begin)
                    samples.append((name, entry["dtype"], entry["shape"], f.read(min(FINGERPRINT_BYTES, end - begin))))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    digest = hashlib.sha256()
    for name, dtype, shape, sample in sorted(samples):
        digest.update(json.dumps([name, dtype, shape]).encode() + sample)
    return digest.hexdigest()[:16]


def shape_problem(model_dir: Path, config) -> str | None:
    """The first weight whose stored shape differs from the model config.json describes (meta device: no
    memory), or None. Keys named differently in the checkpoint (converted on load) are not compared."""
    if getattr(config, "quantization_config", None) or any(model_dir.glob("*.bin")):
        return None  # pre-quantized weights are stored packed, in other shapes; pickles are not opened here
    expected = {k: tuple(v.shape) for k, v in build_meta_model(config).state_dict().items()}
    for key, (shape, file) in stored_shapes(model_dir).items():
        want = expected.get(key)
        if want is not None and want != shape:
            return (f"{file}: {key} is {list(shape)} but config.json describes {list(want)}; the config and the "
                    "weights come from different models")
    return None


def vocab_problem(tokenizer, config, added: list[str] = ()) -> str | None:
    """A tokenizer that can produce ids the model's embedding has no row for, or None. The ``added`` tokens
    (model.add_tokens) are exempt: the embedding grows to hold them (lorakit.models.tokens)."""
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    grows = sum(1 for i in tokenizer.convert_tokens_to_ids(list(added)) if vocab and i >= vocab)
    if vocab and len(tokenizer) - grows > vocab:
        return (f"the tokenizer has {len(tokenizer):,} tokens but the model's vocabulary is {vocab:,}: ids past it "
                "have no embedding; use the model's own tokenizer")
    return None


def position_limit(config) -> int | None:
    """The size of the position table a model indexes (GPT-2's and OPT's learned embeddings, GPT-J's sin/cos
    table), or None where any position works: RoPE models, which carry rope_parameters, and models without
    max_position_embeddings (ALiBi)."""
    text = config.get_text_config()
    positions = getattr(text, "max_position_embeddings", None)
    if not isinstance(positions, int) or getattr(text, "rope_parameters", None) is not None:
        return None
    return positions


def new_token_room(model, prompt_tokens: int, max_new_tokens: int, adapter_on: bool = True) -> int:
    """``max_new_tokens``, cut to what the model's position table leaves after a prompt of ``prompt_tokens`` (and
    an active prompt/prefix adapter's virtual tokens): past it generate() fails with an IndexError. UsageError when
    the prompt alone fills the table."""
    config = getattr(model, "config", None)
    positions = position_limit(config) if config is not None else None
    if positions is None:
        return max_new_tokens
    peft_config = getattr(model, "active_peft_config", None) if adapter_on else None
    virtual = peft_config.num_virtual_tokens if getattr(peft_config, "is_prompt_learning", False) else 0
    room = positions - prompt_tokens - virtual
    after = f"a prompt of {prompt_tokens} tokens" + (f" and {virtual} virtual tokens" if virtual else "")
    where = f"the {positions} positions this {config.get_text_config().model_type} model has (max_position_embeddings)"
    if room < 1:
        raise UsageError(f"{after} fills {where}, leaving none to generate; shorten the prompt")
    if room < max_new_tokens:
        # generation runs in one process (train.eval_generate: the main one only)
        warner(True)(f"generation: {max_new_tokens} new tokens cut to {room}, what {after} leaves of {where}")
    return min(room, max_new_tokens)


def positions_problem(config, max_seq_len: int, virtual_tokens: int = 0) -> str | None:
    """data.max_seq_len beyond a table of positions the model indexes (GPT-2's and OPT's learned embeddings,
    GPT-J's sin/cos table: an IndexError mid-run at the first longer row), or None. RoPE models, which carry
    rope_parameters, compute any position, and models without max_position_embeddings (ALiBi) have no table.
    ``virtual_tokens``: prompt/prefix tuning's adapter.num_virtual_tokens, which take the first positions of
    every sequence (prompt tuning's embeddings, prefix tuning's cached keys/values)."""
    positions = position_limit(config)
    if positions is None or max_seq_len + virtual_tokens <= positions:
        return None
    text = config.get_text_config()
    if virtual_tokens:
        return (f"data.max_seq_len: {max_seq_len} plus adapter.num_virtual_tokens {virtual_tokens} (placed before "
                f"every sequence) is more than the {positions} positions this {text.model_type} model has a "
                f"position table for (max_position_embeddings); set data.max_seq_len: "
                f"{max(positions - virtual_tokens, 0)} or less, or fewer adapter.num_virtual_tokens")
    return (f"data.max_seq_len: {max_seq_len} is more than the {positions} positions this {text.model_type} model "
            f"has a position table for (max_position_embeddings); set data.max_seq_len: {positions} or less")
