"""Tokenized examples on disk, opened memory-mapped: flat token arrays plus an offsets index, one folder per split.

A store is a folder of raw little-endian arrays (``NAME.bin``) described by ``store.json``: token columns
(``input_ids``, ``labels``, and any other per-token column a format adds) are concatenated over all examples and
cut by one ``offsets`` array (int64, rows + 1); row columns (``prompt_len``, ``source``, ...) hold one value per
example. Opening a store maps the files: the operating system pages tokens in as batches touch them, so the
memory a run holds for its data is the offsets index (8 bytes a row), not the tokens. No pickle anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from lorakit.data.formats import Example

TOKEN_COLUMNS = ("input_ids", "labels")
ROW_COLUMNS = {"prompt_len": "<i4", "source": "<i2"}  # the per-example columns every store has
TOKEN_DTYPE = "<i4"
META = "store.json"


class StoreWriter:
    """Appends examples, chunk by chunk, to a new store folder; ``close()`` writes ``store.json`` last."""

    def __init__(self, folder: Path, pairs: bool = False):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.rows, self.tokens = folder, 0, 0
        self.files = {name: (folder / f"{name}.bin").open("wb") for name in (*TOKEN_COLUMNS, "offsets", *ROW_COLUMNS)}
        self.files["offsets"].write(np.zeros(1, "<i8").tobytes())
        # Preference pairs: each example's rejected sequence, a second store in the subfolder "rejected".
        self.rejected = StoreWriter(folder / "rejected") if pairs else None

    def add(self, lengths, columns: dict) -> None:
        """Append examples: their ``lengths``, the flat token columns and the row columns (array-likes)."""
        lengths = np.asarray(lengths, dtype="<i8")
        if not len(lengths):
            return
        offsets = self.tokens + np.cumsum(lengths)
        for name in TOKEN_COLUMNS:
            data = np.asarray(columns[name], dtype=TOKEN_DTYPE)
            assert len(data) == int(offsets[-1] - self.tokens), name
            self.files[name].write(data.tobytes())
        for name, dtype in ROW_COLUMNS.items():
            self.files[name].write(np.asarray(columns[name], dtype=dtype).tobytes())
        self.files["offsets"].write(offsets.astype("<i8").tobytes())
        self.rows, self.tokens = self.rows + len(lengths), int(offsets[-1])
        if self.rejected is not None:
            self.rejected.add(columns["rejected"]["lengths"], columns["rejected"])

    def close(self, **info) -> None:
        for f in self.files.values():
            f.close()
        if self.rejected is not None:
            self.rejected.close()
        meta = {"rows": self.rows, "tokens": self.tokens, "token_columns": list(TOKEN_COLUMNS),
                "row_columns": ROW_COLUMNS, "token_dtype": TOKEN_DTYPE, "pairs": self.rejected is not None, **info}
        (self.folder / META).write_text(json.dumps(meta))


def write_examples(folder: Path, examples: list[Example], source: int = 0) -> None:
    """A store of ``examples`` (tests, and stores built from a list)."""
    writer = StoreWriter(folder)
    writer.add([len(e) for e in examples], {
        "input_ids": [t for e in examples for t in e.input_ids], "labels": [t for e in examples for t in e.labels],
        "prompt_len": [e.prompt_len for e in examples], "source": [source] * len(examples)})
    writer.close()


def _map(path: Path, dtype: str, count: int) -> np.ndarray:
    if count == 0:  # an empty file cannot be mapped
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


class _Rows(Sequence):
    """Indexing (negative indices, slices as lists) and equality with any sequence of examples."""

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._row(int(index))

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None


class TokenStore(_Rows):
    """The examples of one store folder, memory-mapped; ``store[i]`` is an Example with Python lists."""

    def __init__(self, folder: Path):
        self.folder, self.keep_alive = Path(folder), None  # keep_alive: a TemporaryDirectory the store lives in
        self.ref_logps = None  # preference pairs' reference log-probs (train.reference), [rows, 2], set after loading
        self.meta = json.loads((self.folder / META).read_text())
        rows, tokens = self.meta["rows"], self.meta["tokens"]
        # A pair store missing its rejected half must fail to open (a cache miss): opened as plain examples, the
        # preference loss would pair each chosen sequence with another row's.
        pairs = self.meta.get("pairs") or (self.folder / "rejected").exists()
        self.rejected = TokenStore(self.folder / "rejected") if pairs else None
        if self.rejected is not None and len(self.rejected) != rows:
            raise ValueError(f"{self.folder}: damaged store ({len(self.rejected)} rejected sequences for {rows} rows)")
        self.offsets = _map(self.folder / "offsets.bin", "<i8", rows + 1) if rows else np.zeros(1, "<i8")
        self.columns = {name: _map(self.folder / f"{name}.bin", self.meta["token_dtype"], tokens)
                        for name in self.meta["token_columns"]}
        self.row_columns = {name: _map(self.folder / f"{name}.bin", dtype, rows)
                            for name, dtype in self.meta["row_columns"].items()}
        if len(self.offsets) != rows + 1 or (rows and int(self.offsets[-1]) != tokens):
            raise ValueError(f"{self.folder}: damaged store (offsets do not match store.json)")

    def __len__(self) -> int:
        return self.meta["rows"]

    def _row(self, index: int) -> Example:
        a, b = int(self.offsets[index]), int(self.offsets[index + 1])
        example = Example(self.columns["input_ids"][a:b].tolist(), self.columns["labels"][a:b].tolist(),
                          int(self.row_columns["prompt_len"][index]))
        if self.rejected is not None:
            example.rejected = self.rejected[index]
            if self.ref_logps is not None:
                example.ref_logps = tuple(float(v) for v in self.ref_logps[index])
        return example

    @cached_property
    def lengths(self) -> np.ndarray:
        """Tokens per example (int64), from the offsets index."""
        return np.diff(np.asarray(self.offsets))

    @cached_property
    def num_tokens(self) -> np.ndarray:
        """Tokens a forward runs on per example: both sequences of a preference pair."""
        return self.lengths if self.rejected is None else self.lengths + self.rejected.lengths

    @cached_property
    def longest(self) -> np.ndarray:
        """Tokens of each example's longest sequence (a pair's longer one): what data.max_seq_len bounds."""
        return self.lengths if self.rejected is None else np.maximum(self.lengths, self.rejected.lengths)

    @property
    def sources(self) -> np.ndarray:
        return self.row_columns["source"]


def example_lengths(examples: Sequence) -> np.ndarray:
    """Tokens per example: a store's offsets index, or each example's length where ``examples`` is a list."""
    if hasattr(examples, "lengths"):
        return np.asarray(examples.lengths)
    return np.array([len(e) for e in examples], dtype=np.int64)


class PackedRows(_Rows):
    """Packed rows over a store without copying tokens: row r holds the examples ``members[bounds[r]:bounds[r+1]]``."""

    def __init__(self, store: Sequence, members: np.ndarray, bounds: np.ndarray):
        self.store, self.members, self.bounds = store, members, bounds

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def _row(self, index: int) -> Example:
        parts = [self.store[int(m)] for m in self.members[self.bounds[index]:self.bounds[index + 1]]]
        return Example([t for p in parts for t in p.input_ids], [t for p in parts for t in p.labels],
                       seq_lens=[len(p) for p in parts])

    @property
    def lengths(self) -> np.ndarray:
        sizes = example_lengths(self.store)[self.members]
        return np.add.reduceat(sizes, self.bounds[:-1]) if len(self) else np.zeros(0, np.int64)
