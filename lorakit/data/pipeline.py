"""From the recipe's data section to tokenized train/eval examples: read, split, tokenize (encode), fit the length
policy, account for every row, store (memory-mapped, cached), pack.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorakit.config.schema import CHAT_FORMATS, DataSection
from lorakit.cpus import usable_cpus
from lorakit.data import cache
from lorakit.data.batching import epoch_draws, pack_examples
from lorakit.data.encode import SourceSection, encode_chunk, encode_rows
from lorakit.data.fingerprint import Fingerprints
from lorakit.data.chat import chat_template_text, resolve_chat_template
from lorakit.data.formats import Example
from lorakit.data.sources import Row, check_exists, content_hash, iter_rows
from lorakit.data.stats import DataStats, fit_length
from lorakit.data.store import StoreWriter, TokenStore
from lorakit.errors import DataError, UsageError

__all__ = ["DataStats", "Datasets", "fit_length", "load_datasets", "source_sections", "split_eval", "tokenize_rows",
           "train_sources"]

PROGRESS_MIN_ROWS = 2000  # a progress bar for tokenizing at least this many rows (on a terminal)
WINDOW_ROWS = 65_536  # rows read ahead of tokenizing: what a first run holds of a .jsonl file at once


@dataclass
class Datasets:
    train: Sequence[Example]  # a TokenStore (memory-mapped), or PackedRows over it when data.packing
    eval: Sequence[Example]
    train_stats: DataStats
    eval_stats: DataStats | None
    group_lengths: np.ndarray | None = None  # for StepSampler(lengths=...) when data.group_by_length
    fingerprint: str = ""  # of the train examples before packing (data.fingerprint), checked on resume
    source_fingerprints: dict = field(default_factory=dict)  # {data.train source: fingerprint of its examples}
    sources: np.ndarray | None = None  # each train example's source index (StepSampler's weights)
    weights: list[float] | None = None  # data.train[i].weight
    cache_key: str | None = None  # their entry in the data cache (train.reference: precomputed stores there too)
    # the mean reference log-probs of the train pairs' chosen and rejected answers (train.reference precomputed or
    # init_from), checked on resume: a reference adapter or base changed since the checkpoint changes them
    reference: list[float] | None = None

    def identity(self) -> dict:
        """What a checkpoint records of the data and a resume compares (lorakit.data.fingerprint)."""
        identity = {"fingerprint": self.fingerprint, "sources": dict(self.source_fingerprints)}
        return identity if self.reference is None else {**identity, "reference": self.reference}


def tokenize_rows(rows: list[Row | dict], section: DataSection, tokenizer, stats: DataStats | None = None,
                  advance=None) -> tuple[list[Example], DataStats]:
    """Tokenize and fit rows in memory (plain dicts are named "row N"); every row lands in exactly one count."""
    stats = stats or DataStats()
    stats.max_seq_len, stats.eos_token = section.max_seq_len, tokenizer.eos_token
    stats.truncation = section.truncation
    rows = [row if isinstance(row, Row) else Row(f"row {i + 1}", row) for i, row in enumerate(rows)]
    chunk = encode_chunk(rows, [0] * len(rows), section, tokenizer)
    stats.merge(chunk.stats)
    if advance:
        advance(len(rows))
    examples = _examples(chunk)
    if chunk.rejected is not None:
        for example, rejected in zip(examples, _examples(chunk.rejected), strict=True):
            example.rejected = rejected
    stats.lengths = [e.longest for e in examples]
    return examples, stats


def _examples(chunk) -> list[Example]:
    bounds = np.concatenate([[0], np.cumsum(chunk.lengths)])
    return [Example(chunk.input_ids[a:b].tolist(), chunk.labels[a:b].tolist(), int(p))
            for a, b, p in zip(bounds[:-1], bounds[1:], chunk.prompt_len)]


# ----------------------------------------------------------------------------------------------------------
# Loading


def train_sources(section: DataSection) -> list[str]:
    return section.train_paths()


def _stream(sources: list[str], section: DataSection, stats: DataStats, window: int = 0):
    """Windows of (rows, each row's source index) in order, ``window`` rows each (0: one window of all rows).
    .jsonl files are read as they are tokenized, so a first run holds one window of rows, not all of them; their
    lines are parsed by the processes tokenizing them (sources.JsonLine), except for a single window (eval_split
    counts the rows that parse)."""
    for source in sources:
        check_exists(source)  # a missing file is exit 3 before anything is tokenized
    rows, owner = [], []
    for index, source in enumerate(sources):
        for item in iter_rows(source, section.skip_bad_rows, section.split, section.subset, lazy=window > 0):
            if isinstance(item, str):  # a malformed row skipped while reading
                stats.note("bad", item, index)
                stats.count(index, "rows")
                stats.rows += 1
                continue
            rows.append(item)
            owner.append(index)
            if len(rows) == window:
                yield rows, np.array(owner, dtype=np.int16)
                rows, owner = [], []
    if rows or not window:
        yield rows, np.array(owner, dtype=np.int16)


def held_out(count: int, fraction: float, seed: int) -> set[int]:
    """The indices data.eval_split holds out of ``count`` rows: a seeded random ``fraction``."""
    if count < 2:
        return set()
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return set(order[: max(1, round(count * fraction))])


def split_eval(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """(train, eval): a seeded random ``fraction`` of the rows held out, file order kept within each."""
    held = held_out(len(rows), fraction, seed)
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def source_sections(section: DataSection, tokenizer) -> list[SourceSection]:
    """How each train source is tokenized: the data section with its own format and fields where it sets them, and
    the chat template its chat/preference rows render with (its own chat_template, else data.chat_template or the
    tokenizer's). data.chat_template is set on the tokenizer (the template saved with the adapter); a source's own
    template is only read (encode.encode_chunk lends it to the tokenizer for that source's rows)."""
    out, shared = [], False
    for i, source in enumerate(section.sources()):
        own = section.model_copy(update={"format": source.format or section.format,
                                         "fields": section.fields if source.fields is None else source.fields})
        if source.chat_template is None:
            out.append(SourceSection(own, resolve_chat_template(own, tokenizer)))
            shared = shared or own.format in CHAT_FORMATS
        else:
            key = f"data.train[{i}].chat_template"
            out.append(SourceSection(own, chat_template_text(own.format, source.chat_template, tokenizer, key), key))
    if section.chat_template is not None and not shared:  # every chat source has its own template
        resolve_chat_template(section.model_copy(update={"format": "chat"}), tokenizer)  # still the adapter's
    return out


def _read_splits(section: DataSection, sections: list[SourceSection], eval_template: str | None, seed: int) -> dict:
    """{split: (windows of (rows, each row's source), sections by source, stats)}: what to tokenize, in order."""
    names = train_sources(section)
    train_stats = DataStats(sources=names)
    if not section.eval_split:
        splits = {"train": (_stream(names, section, train_stats, WINDOW_ROWS), sections, train_stats)}
        if section.eval:
            check_exists(section.eval)  # before the training rows are tokenized
            eval_stats = DataStats(sources=[section.eval])
            splits["eval"] = (_stream([section.eval], section, eval_stats, WINDOW_ROWS),
                              [SourceSection(section, eval_template)], eval_stats)
        return splits
    # The held-out rows depend on how many rows there are: everything is read first.
    ((rows, owner),) = _stream(names, section, train_stats)
    held = held_out(len(rows), section.eval_split, seed)
    if rows and len(held) == len(rows):
        raise UsageError(f"data.eval_split: {section.eval_split} holds out all {len(rows)} rows of data.train, "
                         "leaving none to train on; use a smaller fraction (e.g. 0.1) or a separate data.eval")
    keep = np.array([i not in held for i in range(len(rows))], dtype=bool)
    eval_stats = DataStats(sources=names)
    return {"train": ([([r for r, k in zip(rows, keep) if k], owner[keep])], sections, train_stats),
            "eval": ([([r for r, k in zip(rows, keep) if not k], owner[~keep])], sections, eval_stats)}


def _build(folder: Path, section: DataSection, tokenizer, seed: int, sections: list[SourceSection],
           eval_template: str | None) -> dict:
    """Tokenize every split into ``folder``/SPLIT stores; returns the entry's meta (stats, fingerprints)."""
    splits = _read_splits(section, sections, eval_template, seed)
    num_proc = section.num_proc or usable_cpus()
    meta = {"splits": {}}
    total = None if not section.eval_split else sum(len(w[0][0]) for w, *_ in splits.values())
    prints = Fingerprints(train_sources(section))
    with _progress(total) as advance:
        for name, (windows, sections, stats) in splits.items():
            stats.max_seq_len, stats.eos_token = section.max_seq_len, tokenizer.eos_token
            stats.truncation = section.truncation
            writer = StoreWriter(folder / name, pairs=any(s.section.format == "preference" for s in sections))
            for rows, owner in windows:
                for chunk in encode_rows(rows, owner, sections, tokenizer, num_proc):
                    writer.add(chunk.lengths, chunk.columns())
                    if name == "train":
                        prints.add(*chunk.sequences())
                    stats.merge(chunk.stats)
                    advance(int(chunk.stats.rows))
            writer.close()
            if name == "train" or section.eval:
                _check_not_empty(name, stats.sources, writer.rows, stats)
                _check_pairs_differ(name, stats)
            meta["splits"][name] = stats.to_json()
    # One empty file of a list (alone it is refused above): most likely the wrong file. data.eval_split deals a
    # source's rows to both splits.
    counted = [stats for name, (_, _, stats) in splits.items() if name == "train" or section.eval_split]
    for i, source in enumerate(train_sources(section)):
        if not any(stats.per_source.get(i, {}).get("rows") for stats in counted):
            raise DataError(f"data.train[{i}]: {source} is empty: it holds no rows; fill it or remove it from "
                            "data.train")
    meta["fingerprint"], meta["source_fingerprints"] = prints.result()
    return meta


def _check_not_empty(key: str, names: list[str], rows: int, stats: DataStats) -> None:
    if rows:
        return
    if stats.rows == 0:
        raise DataError(f"data.{key}: {', '.join(names)} is empty: it holds no rows")
    counts = "; ".join(line.strip() for line in stats.summary().splitlines())
    # the no-supervised-token warning names its own checks; the others say what happened, not what to change
    remedy = [] if stats.unsupervised else ["check data.format, data.fields, data.max_seq_len and data.truncation"]
    raise DataError(f"data.{key}: {', '.join(names)} has no usable rows ({counts}); "
                    f"{'; '.join([*stats.warnings(), *remedy])}")


def _check_pairs_differ(key: str, stats: DataStats) -> None:
    """Exit 3 when every preference pair's chosen and rejected answers are the same tokens: nothing to learn."""
    if stats.kept and stats.identical == stats.kept:
        raise DataError(f"data.{key}: {', '.join(stats.sources)}: every preference pair ({stats.kept}) has the same "
                        f"chosen and rejected answer (first: {stats.identical_rows[0]}), so none teaches a preference; "
                        "give rejected answers that differ from the chosen ones")


def load_datasets(section: DataSection, tokenizer, seed: int) -> Datasets:
    """Tokenized train/eval examples, memory-mapped from the store (cached); exit 3 when nothing is left to train
    or evaluate on."""
    sections = source_sections(section, tokenizer)
    eval_template = resolve_chat_template(section, tokenizer) if section.eval else None
    sources = train_sources(section) + ([section.eval] if section.eval else [])
    for source in sources:  # missing or unreadable: exit 3 before hashing reads them
        check_exists(source)
    hashes = [content_hash(s) for s in sources] if section.cache else [None]
    templates = [s.template for s in sections] + ([eval_template] if section.eval else [])
    key = cache.cache_key(section, tokenizer, templates, seed, hashes)
    build = lambda folder: _build(folder, section, tokenizer, seed, sections, eval_template)  # noqa: E731
    if key:
        folder, meta, cached, keep_alive = cache.open_or_build(key, build)
    else:  # not cacheable: a private store, deleted once the run no longer holds it
        keep_alive = tempfile.TemporaryDirectory(prefix="lorakit-data-")
        folder, cached = Path(keep_alive.name), False
        meta = build(folder)
    data = _open(folder, meta, section, seed, cached, keep_alive)
    data.cache_key = key
    return data


def _open(folder: Path, meta: dict, section: DataSection, seed: int, cached: bool, keep_alive) -> Datasets:
    names = train_sources(section)
    train = TokenStore(folder / "train")
    train_stats = DataStats.from_json(meta["splits"]["train"], names)
    train_stats.lengths, train_stats.cached = train.longest, cached
    evals, eval_stats = [], None
    if "eval" in meta["splits"]:
        evals = TokenStore(folder / "eval")
        eval_stats = DataStats.from_json(meta["splits"]["eval"], [section.eval] if section.eval else names)
        eval_stats.lengths, eval_stats.cached = evals.longest, cached
    group_lengths = train.num_tokens if section.group_by_length and not section.packing else None
    for store in (train, evals):  # a private store's folder is deleted when no store maps it any more
        if isinstance(store, TokenStore):
            store.keep_alive = keep_alive
    data = Datasets(train, evals, train_stats, eval_stats, group_lengths, meta["fingerprint"],
                    meta["source_fingerprints"], np.asarray(train.sources), [s.weight for s in section.sources()])
    epoch_draws(data.sources, data.weights, names)  # before the model loads: the sampler draws the same
    if section.packing:
        data.train = pack_examples(train, section.max_seq_len, seed)
        train_stats.packed_rows = len(data.train)
    return data


@contextmanager
def _progress(total: int):
    """A transient rich progress bar for tokenizing large datasets on a terminal (main process only); yields
    ``advance(rows)``. ``total`` None: rows read as they are tokenized, their number unknown ahead."""
    from lorakit.console import get_console, is_json, is_quiet

    console = get_console()
    shown = (total is None or total >= PROGRESS_MIN_ROWS) and console.is_terminal and not (is_quiet() or is_json())
    if not shown or os.environ.get("RANK", "0") != "0":
        yield lambda n: None
        return
    from rich.errors import LiveError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("tokenizing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    progress = Progress(*columns, console=console, transient=True)
    task = progress.add_task("tokenize", total=total)
    try:
        progress.start()
    except LiveError:  # rich < 14 cannot nest it inside a running status spinner: go without the bar
        yield lambda n: None
        return
    try:
        yield lambda n: progress.advance(task, n)
    finally:
        progress.stop()
