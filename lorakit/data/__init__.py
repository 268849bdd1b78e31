"""Training data: sources, formats, labels, the length policy, caching, packing and batching.

Reading order: sources (rows from files, directories or the hub) → chat (chat templates, assistant turn
spans) → formats (a row to token ids and labels) → stats (length policy, accounting) → encode (batched,
parallel tokenizing) → store (memory-mapped token arrays) → pipeline (split, cache, packing) → batching
(collate, data order) → fingerprint (checked on resume).
May import lorakit.config and the bottom layer (lorakit.errors, console, atomic, paths, tokens).
"""

from lorakit.data.batching import StepSampler, collate, first_fit, pack_examples
from lorakit.data.chat import named_chat_templates, resolve_chat_template
from lorakit.data.formats import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_WITH_INPUT,
    IGNORE_INDEX,
    Example,
    num_targets,
    tokenize_row,
)
from lorakit.data.pipeline import DataStats, Datasets, fit_length, load_datasets, split_eval, tokenize_rows
from lorakit.data.sources import BadRowError, Row, read_rows
from lorakit.data.store import PackedRows, TokenStore

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_WITH_INPUT",
    "IGNORE_INDEX",
    "BadRowError",
    "DataStats",
    "Datasets",
    "Example",
    "PackedRows",
    "TokenStore",
    "Row",
    "StepSampler",
    "collate",
    "first_fit",
    "fit_length",
    "load_datasets",
    "named_chat_templates",
    "num_targets",
    "pack_examples",
    "read_rows",
    "resolve_chat_template",
    "split_eval",
    "tokenize_row",
    "tokenize_rows",
]
