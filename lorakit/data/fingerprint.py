"""The content fingerprint of tokenized training examples, recorded in every checkpoint.

A resume compares it with the data it is given: an edited row (same row count, another name in it) changes the
fingerprint, where the row count alone would not. Token ids and labels are what training sees, so a change that
does not reach them (whitespace in a JSON line) does not count, and one in the tokenizer or chat template does.
"""

from __future__ import annotations

import hashlib
from array import array

from lorakit.data.formats import Example


def fingerprint(examples: list[Example]) -> str:
    """sha256 over every example's token ids and labels, in order (the order is seeded and part of the data)."""
    digest = hashlib.sha256()
    for sequence in (s for example in examples for s in example.sequences):  # a pair: chosen, then rejected
        ids = array("q", sequence.input_ids)
        digest.update(len(ids).to_bytes(8, "little"))
        digest.update(ids.tobytes())
        digest.update(array("q", sequence.labels).tobytes())
    return digest.hexdigest()
