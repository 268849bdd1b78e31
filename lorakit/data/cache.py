"""The tokenized-data cache under $LORAKIT_CACHE/data/KEY/: token stores (raw arrays, store.py) and JSON, never
pickle.

KEY hashes everything tokenization depends on: the data files' bytes, the tokenizer, each source's chat
template text, the recipe's data section, the lorakit version and the source of the code that tokenizes
(``code_fingerprint``: every dev commit is version 0.1.0, and a rule changed there must not be outlived by entries
built under the old one). Any change makes a new key (a rebuild).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lorakit.atomic import publish_dir
from lorakit.config.schema import DataSection
from lorakit.data.store import TokenStore

CACHE_FORMAT = 2  # 2: memory-mapped token stores (store.py)
# The code that decides what an entry holds (the rows read, their tokens and labels, the counts, bad rows and
# fingerprints in meta.json), relative to the lorakit package. Batching, packing and sampling act on an entry
# afterwards, cache.py's layout is CACHE_FORMAT's, and the recipe's values are keyed as they are (_keyed); a test
# checks that every module the pipeline imports is listed here or named there with why.
TOKENIZING_CODE = ("text.py", "paths.py", "data/sources.py", "data/chat.py", "data/turns.py", "data/chat_templates",
                   "data/formats.py", "data/encode.py", "data/stats.py", "data/store.py", "data/fingerprint.py",
                   "data/pipeline.py")
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # lorakit/, in a checkout or an installed wheel alike
# Keys that act after tokenization (or do not change its result): changing them reuses the tokenized data.
_UNKEYED = {"packing", "group_by_length", "padding_free", "cache", "num_proc"}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, merges, normalizer, special tokens)."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            for file in sorted(Path(tmp).iterdir()):
                digest.update(file.name.encode() + b"\0" + file.read_bytes())
    specials = [type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    digest.update(json.dumps(specials, default=str).encode())
    return digest.hexdigest()


def code_fingerprint(root: Path = PACKAGE_ROOT, files: tuple[str, ...] = TOKENIZING_CODE) -> str:
    """sha256 of the ``files`` (a folder: each file in it) under ``root``. One that cannot be read counts as
    missing (an install without sources: its version still tells it apart)."""
    digest = hashlib.sha256()
    for name in files:
        path = root / name
        for file in sorted(path.iterdir()) if path.is_dir() else [path]:
            try:
                content = file.read_bytes()
            except OSError:
                content = b"\0missing"
            digest.update(f"{file.relative_to(root).as_posix()}\0{len(content)}\0".encode() + content)
    return digest.hexdigest()


@functools.cache
def this_code() -> str:
    """code_fingerprint of the running lorakit, read once per process."""
    return code_fingerprint()


def cache_key(section: DataSection, tokenizer, templates: list[str | None], seed: int,
              hashes: list[str | None], code: str | None = None) -> str | None:
    """The cache key, or None when a source's content cannot be hashed (a hub dataset id). ``templates``: the chat
    template text each source renders with (the train sources', then data.eval's); ``code``: the tokenizing code's
    fingerprint (default: this lorakit's)."""
    from lorakit import __version__

    if any(h is None for h in hashes):
        return None
    material = {
        "format": CACHE_FORMAT,
        "lorakit": __version__,
        "code": code or this_code(),
        "sources": hashes,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template": templates,
        "data": _keyed(section),
        "seed": seed if section.eval_split else None,  # the seed only picks the eval rows
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


def _keyed(section: DataSection) -> dict:
    data = section.model_dump(mode="json", exclude=_UNKEYED & set(DataSection.model_fields))
    for source in data["train"] if isinstance(data["train"], list) else []:
        if isinstance(source, dict):
            source.pop("weight", None)  # weights choose rows per epoch; the tokens are the same
    return data


def cache_root() -> Path:
    from lorakit.paths import cache_dir

    return cache_dir() / "data"


def read_entry(entry: Path) -> dict | None:
    """The meta of a complete, readable entry, else None (missing, partial, damaged or foreign: a miss)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if not isinstance(meta.get("fingerprint"), str) or not isinstance(meta.get("source_fingerprints"), dict):
            return None  # what a run reads of it besides the splits: without them, a foreign or edited entry
        for split in meta["splits"]:
            TokenStore(entry / split)  # maps every column: a truncated file fails here
        return meta
    except Exception:  # whatever is wrong with an entry, the data is tokenized again
        return None


@contextmanager
def _locked(f):
    """An exclusive lock on the open file ``f`` (flock: released by the kernel when the holder dies)."""
    import fcntl

    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _private(build):
    """A cache that cannot be written is not an error: tokenize into a private store, deleted after use."""
    keep_alive = tempfile.TemporaryDirectory(prefix="lorakit-data-")
    return Path(keep_alive.name), build(Path(keep_alive.name)), False, keep_alive


def open_or_build(key: str, build):
    """(folder, meta, cached, keep_alive) of the entry KEY, built by ``build(folder) -> meta`` when missing.

    Two processes building the same entry (two runs, or the ranks of one) take turns on a lock: the second
    finds the first one's entry. The entry is written under a temporary name and renamed into place whole, so
    a reader never sees part of one, and where locks do not work (some network file systems) the first rename
    wins and the other copy is dropped. A cache that cannot be written gives a private temporary store, built
    without the lock (``keep_alive`` holds it until the data is no longer used).
    """
    root = cache_root()
    entry = root / key
    meta = read_entry(entry)
    if meta is not None:
        return entry, meta, True, None
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = (root / f".{key}.lock").open("a")
    except OSError:
        return _private(build)
    with _locked(lock):
        meta = read_entry(entry)
        if meta is not None:  # built by another process while this one waited
            return entry, meta, True, None
        unique = f"{socket.gethostname()}-{os.getpid()}"
        tmp = root / f".{key}.tmp-{unique}"
        try:
            if entry.exists():  # damaged: set aside, not overwritten in place (a run may still map its files)
                aside = root / f".{key}.damaged-{unique}"
                entry.rename(aside)
                shutil.rmtree(aside, ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError:  # a cache this process may read but not write (read-only, another user's)
            tmp = None
        if tmp is not None:
            try:
                meta = build(tmp)
                (tmp / "meta.json").write_text(json.dumps(meta))  # last: an entry without it is a miss
                publish_dir(tmp, entry)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return entry, meta, False, None
    # Built privately once the lock is let go: runs that cannot publish have nothing to wait for from each other.
    return _private(build)


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
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    entry = cache_root() / key
    if not entry.is_dir():
        return
    arrays = {split: np.array(pairs, dtype=np.float32).reshape(-1, 2) for split, pairs in splits.items()}
    tmp = entry / f".reference-{model_key}.tmp{os.getpid()}"
    try:
        save_file(arrays, str(tmp))
        os.replace(tmp, entry / f"reference-{model_key}.safetensors")
    except (OSError, SafetensorError):  # a cache this process cannot write (read-only): computed again next time
        tmp.unlink(missing_ok=True)
