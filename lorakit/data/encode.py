"""Tokenizing many rows fast: chunks of rows through batched tokenizer calls, on ``data.num_proc`` processes,
appended in row order to a token store. The result does not depend on the number of processes or chunks.

Workers are forked, so they share the rows read by the parent and are handed only chunk bounds; each sends back
flat arrays and its chunk's counts. Forked workers keep the tokenizer single-threaded (TOKENIZERS_PARALLELISM),
so N processes use N cores; one process lets the fast tokenizer spread each batch over every core in Rust.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple

import numpy as np

from lorakit.config.schema import DataSection
from lorakit.data.chat import rendering_with
from lorakit.data.formats import IGNORE_INDEX, Example, nothing_to_learn, tokenize_batch
from lorakit.data.sources import BadRowError, Row
from lorakit.data.stats import ROWS_NAMED, DataStats, fit_length


class SourceSection(NamedTuple):
    """How one source's rows are tokenized: its data section (format, fields), the chat template text its chat
    and preference rows render with (None: the tokenizer's as it is) and the recipe key that chose it."""

    section: DataSection
    template: str | None = None
    key: str = "data.chat_template"


CHUNK_ROWS = 1000  # rows per batched tokenizer call
MIN_PARALLEL_ROWS = 8 * CHUNK_ROWS  # fewer rows are tokenized in this process: starting workers would cost more


@dataclass
class Chunk:
    """A chunk's kept examples as flat arrays, and what happened to each of its rows."""

    lengths: np.ndarray
    input_ids: np.ndarray
    labels: np.ndarray
    prompt_len: np.ndarray
    source: np.ndarray
    stats: DataStats
    rejected: "Chunk | None" = None  # preference pairs: the rejected sequences, as a chunk of their own

    def columns(self) -> dict:
        out = {"input_ids": self.input_ids, "labels": self.labels, "prompt_len": self.prompt_len, "source": self.source}
        if self.rejected is not None:
            out["rejected"] = {"lengths": self.rejected.lengths, **self.rejected.columns()}
        return out

    def sequences(self) -> tuple:
        """(ids, labels, lengths, sources) of every sequence in order, a pair's chosen then rejected: what the
        fingerprint hashes."""
        if self.rejected is None:
            return self.input_ids, self.labels, self.lengths, self.source
        r = self.rejected
        both = [(self.input_ids, self.labels, self.lengths), (r.input_ids, r.labels, r.lengths)]
        bounds = [np.concatenate([[0], np.cumsum(lengths)]) for _, _, lengths in both]
        ids, labels = [], []
        for k in range(len(self.lengths)):
            for (i, l, _), b in zip(both, bounds):
                ids.append(i[b[k] : b[k + 1]])
                labels.append(l[b[k] : b[k + 1]])
        lengths = np.stack([self.lengths, r.lengths], axis=1).reshape(-1)
        cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int32)  # noqa: E731
        return cat(ids), cat(labels), lengths, np.repeat(self.source, 2)


def _flat(kept: list[tuple[Example, int]], stats: DataStats) -> Chunk:
    lengths = np.fromiter((len(e) for e, _ in kept), dtype=np.int64, count=len(kept))
    total = int(lengths.sum())
    flat = lambda name: np.fromiter(chain.from_iterable(getattr(e, name) for e, _ in kept), np.int32, total)  # noqa
    return Chunk(lengths, flat("input_ids"), flat("labels"),
                 np.fromiter((e.prompt_len for e, _ in kept), np.int32, len(kept)),
                 np.fromiter((s for _, s in kept), np.int16, len(kept)), stats)


@contextmanager
def gc_paused():
    """The cyclic garbage collector off for a block that allocates many acyclic lists and tuples (token ids,
    offsets): each collection would traverse all of them, about a quarter of chat tokenization's time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def encode_chunk(rows: list[Row], sources, section: DataSection, tokenizer, template: str | None = None,
                 key: str = "data.chat_template") -> Chunk:
    """Tokenize and fit ``rows`` (``sources``: each row's source index) with chat ``template`` (None: the
    tokenizer's), which recipe ``key`` chose; every row lands in exactly one count."""
    with gc_paused(), rendering_with(tokenizer, template, key):
        return _encode_chunk(rows, sources, section, tokenizer)


# Answers of at most this many supervised tokens are decoded to see whether they hold any text: an end-of-turn is
# a few tokens in every template, and decoding only such short answers costs nothing on real data.
EMPTY_TARGETS = 8


def _empty_answer(labels: list[int], tokenizer) -> bool:
    """Whether the supervised tokens hold no text: an empty answer ("output": "") leaves only the end-of-turn."""
    ids = [t for t in labels[1:] if t != IGNORE_INDEX]
    return not tokenizer.decode(ids, skip_special_tokens=True).strip()


def _encode_chunk(rows: list[Row], sources, section: DataSection, tokenizer) -> Chunk:
    stats = DataStats()
    stats.rows += len(rows)
    eos = tokenizer.eos_token_id
    kept: list[tuple[Example, int]] = []
    for row, source, result in zip(rows, sources, tokenize_batch(rows, section, tokenizer)):
        source = int(source)
        stats.count(source, "rows")
        if isinstance(result, BadRowError):
            if not section.skip_bad_rows:
                raise result
            stats.note("bad", result.reason, source)
            continue
        stats.longest = max(stats.longest, *(len(s) for s in result.sequences))
        example, truncated = fit_length(result, section, tokenizer.bos_token_id)
        if example is None:
            stats.note("too_long", row.where, source)
            continue
        # formats.num_targets, inlined on lists; a pair needs both answers supervised
        targets = [len(s.labels) - 1 - s.labels[1:].count(IGNORE_INDEX) for s in example.sequences]
        if min(targets) <= 0:
            stats.note("unsupervised", f"{row.where}{nothing_to_learn(row, section)}", source)
            continue
        if min(targets) <= EMPTY_TARGETS and any(_empty_answer(s.labels, tokenizer) for s in example.sequences):
            stats.note("empty_answers", row.where, source)
        if eos is not None and any(eos not in s.labels[1:] for s in example.sequences):
            stats.note("no_eos", row.where, source)
        stats.count(source, "kept")
        if truncated:
            stats.count(source, "truncated")
            stats.first.setdefault("truncated", row.where)
        stats.kept += 1
        stats.truncated += bool(truncated)
        stats.answers_cut += truncated == "answers"
        stats.supervised_tokens += sum(targets)
        if example.rejected is not None and example.input_ids == example.rejected.input_ids:
            stats.identical += 1
            stats.identical_rows = (stats.identical_rows + [row.where])[:ROWS_NAMED]
        kept.append((example, source))
    chunk = _flat(kept, stats)
    if section.format == "preference":
        chunk.rejected = _flat([(e.rejected, s) for e, s in kept], DataStats())
    return chunk


_JOB: tuple | None = None  # (rows, sources, sections, tokenizer), inherited by forked workers


def _run(bounds: tuple[int, int]) -> Chunk:
    rows, sources, sections, tokenizer = _JOB
    a, b = bounds
    return _encode_rows(rows, sources, a, b, sections, tokenizer)


def _encode_rows(rows, sources, a: int, b: int, sections: list[SourceSection], tokenizer) -> Chunk:
    """Rows a..b (one source's) tokenized as their source says."""
    section, template, key = sections[int(sources[a])]
    return encode_chunk(rows[a:b], sources[a:b], section, tokenizer, template, key)


def chunk_bounds(sources: np.ndarray) -> list[tuple[int, int]]:
    """Chunks of at most CHUNK_ROWS rows, none across two sources (each source has its own format)."""
    cuts = [0, *(np.flatnonzero(np.diff(sources)) + 1).tolist(), len(sources)]
    return [(a, min(a + CHUNK_ROWS, end)) for start, end in zip(cuts, cuts[1:]) for a in range(start, end, CHUNK_ROWS)]


def encode_rows(rows: list[Row], sources: np.ndarray, sections: list[SourceSection], tokenizer, num_proc: int):
    """Chunks of ``rows`` tokenized in order (row i with ``sections[sources[i]]``), on ``num_proc`` forked
    processes when there are enough rows."""
    global _JOB
    bounds = chunk_bounds(np.asarray(sources))
    workers = min(num_proc, len(bounds))
    if workers < 2 or len(rows) < MIN_PARALLEL_ROWS or "fork" not in multiprocessing.get_all_start_methods():
        for a, b in bounds:
            yield _encode_rows(rows, sources, a, b, sections, tokenizer)
        return
    _JOB = (rows, sources, sections, tokenizer)
    try:
        with _single_threaded_tokenizers():
            pool = multiprocessing.get_context("fork").Pool(workers)
        with pool:
            yield from pool.imap(_run, bounds)
    finally:
        _JOB = None


@contextmanager
def _single_threaded_tokenizers():
    """Workers forked inside this block tokenize on one thread each (the parent keeps its own setting).

    Setting the variable before the fork also spares the children the tokenizers library's warning about a
    fork after its thread pool was used."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
