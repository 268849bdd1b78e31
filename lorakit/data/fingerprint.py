"""The content fingerprint of tokenized training examples, recorded in every checkpoint.

A resume compares it with the data it is given: an edited row (same row count, another name in it) changes the
fingerprint, where the row count alone would not. Token ids and labels are what training sees, so a change that
does not reach them (whitespace in a JSON line) does not count, and one in the tokenizer or chat template does.
The whole training set has one fingerprint, and each data.train source its own, so a resume names the source
that changed.

The definition: sha256 over every example in order of its length (8 bytes), its token ids and its labels (int64,
little-endian). It is computed over the store's arrays in blocks, never one Python object per token.
"""

from __future__ import annotations

import hashlib

import numpy as np

from lorakit.data.formats import Example

BLOCK_ROWS = 8192


def _update(digest, ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> None:
    """Hash examples ``rows`` (in that order): [length, ids..., labels...] each, as one int64 block per BLOCK_ROWS."""
    for start in range(0, len(rows), BLOCK_ROWS):
        block = rows[start : start + BLOCK_ROWS]
        first, lengths = offsets[block], offsets[block + 1] - offsets[block]
        total = int(lengths.sum())
        record = 1 + 2 * lengths  # each example's int64 count in the hashed stream
        out_start = np.cumsum(record) - record
        token_start = np.cumsum(lengths) - lengths  # where each example's tokens start in this block
        within = np.arange(total) - np.repeat(token_start, lengths)
        source = np.repeat(first, lengths) + within
        dest = np.repeat(out_start + 1, lengths) + within
        out = np.empty(int(record.sum()), dtype="<i8")
        out[out_start] = lengths
        out[dest] = ids[source]
        out[dest + np.repeat(lengths, lengths)] = labels[source]
        digest.update(out.tobytes())


def _digest(ids, labels, offsets, rows) -> str:
    digest = hashlib.sha256()
    _update(digest, ids, labels, np.asarray(offsets, dtype=np.int64), np.asarray(rows, dtype=np.int64))
    return digest.hexdigest()


def fingerprint(examples: list[Example]) -> str:
    """The fingerprint of a list of examples (the same as of a store holding them)."""
    sequences = [s for e in examples for s in e.sequences]  # a pair: chosen, then rejected
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])]).astype(np.int64)
    ids = np.fromiter((t for s in sequences for t in s.input_ids), np.int64, int(offsets[-1]))
    labels = np.fromiter((t for s in sequences for t in s.labels), np.int64, int(offsets[-1]))
    return _digest(ids, labels, offsets, np.arange(len(sequences)))


class Fingerprints:
    """The fingerprints of examples added chunk by chunk in order, for the whole set and per source: computed as the
    store is written, so the tokens are not read back (which would page the whole store into memory)."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.whole = hashlib.sha256()
        self.by_source = [hashlib.sha256() for _ in self.names]

    def add(self, ids, labels, lengths, sources) -> None:
        lengths = np.asarray(lengths, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        _update(self.whole, ids, labels, offsets, np.arange(len(lengths)))
        if len(self.names) > 1:
            sources = np.asarray(sources)
            for source in np.unique(sources):
                _update(self.by_source[int(source)], ids, labels, offsets, np.flatnonzero(sources == source))

    def result(self) -> tuple[str, dict[str, str]]:
        """(the fingerprint of all examples, {source name: the fingerprint of that source's examples})."""
        whole = self.whole.hexdigest()
        if len(self.names) == 1:
            return whole, {self.names[0]: whole}
        return whole, {name: digest.hexdigest() for name, digest in zip(self.names, self.by_source)}


def store_fingerprints(store, names: list[str]) -> tuple[str, dict[str, str]]:
    """Fingerprints of a whole store (the same as those taken while it was written)."""
    prints = Fingerprints(names)
    prints.add(store.columns["input_ids"], store.columns["labels"], store.lengths, store.sources)
    return prints.result()
