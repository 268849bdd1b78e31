"""From the recipe's data section to tokenized train/eval examples: read, split, tokenize, fit the length
policy, account for every row, cache, pack.
"""

from __future__ import annotations

import os
import random
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

from lorakit.config.schema import DataSection
from lorakit.data import cache
from lorakit.data.batching import pack_examples
from lorakit.data.fingerprint import fingerprint
from lorakit.data.formats import Example, num_targets, resolve_chat_template, tokenize_row
from lorakit.data.sources import BadRowError, Row, content_hash, read_rows
from lorakit.errors import DataError, UsageError

PROGRESS_MIN_ROWS = 2000  # a progress bar for tokenizing at least this many rows (on a terminal)


@dataclass
class DataStats:
    """What happened to every row of a split; ``summary()`` is printed at the start of a run."""

    rows: int = 0  # rows read, malformed ones included
    kept: int = 0
    truncated: int = 0  # kept, but shortened by data.truncation
    answers_cut: int = 0  # preference pairs among the truncated whose answers were cut too (the prompt was not enough)
    too_long: int = 0  # dropped: longer than data.max_seq_len under data.truncation
    unsupervised: int = 0  # dropped: no token left for the loss
    bad: int = 0  # malformed rows skipped (data.skip_bad_rows)
    no_eos: int = 0  # kept rows whose supervised tokens hold no EOS
    supervised_tokens: int = 0
    max_seq_len: int = 0
    eos_token: str | None = None
    first: dict = field(default_factory=dict)  # category -> where (and why) its first row is
    lengths: list[int] = field(default_factory=list)
    packed_rows: int = 0
    cached: bool = False

    @property
    def dropped(self) -> int:
        return self.too_long + self.unsupervised

    def note(self, category: str, message: str) -> None:
        setattr(self, category, getattr(self, category) + 1)
        self.first.setdefault(category, message)

    def summary(self) -> str:
        """One line of counts and the token-length distribution, then one line per warning."""
        cut = f", {self.answers_cut} of them in the answers" if self.answers_cut else ""
        parts = [f"rows {self.rows}: kept {self.kept} ({self.truncated} truncated{cut})"]
        if self.too_long:
            parts.append(f"dropped {self.too_long} longer than data.max_seq_len {self.max_seq_len}")
        if self.unsupervised:
            parts.append(f"dropped {self.unsupervised} with no supervised tokens")
        if self.bad:
            parts.append(f"skipped {self.bad} malformed")
        line = ", ".join(parts)
        if self.lengths:
            s = sorted(self.lengths)
            pct = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
            line += (
                f"; tokens/example min {s[0]} p50 {pct(0.5)} p90 {pct(0.9)} max {s[-1]}"
                f"; supervised tokens {self.supervised_tokens:,d}"
            )
        if self.packed_rows:
            fill = sum(self.lengths) / (self.packed_rows * self.max_seq_len)
            line += f"; packed into {self.packed_rows} rows of <= {self.max_seq_len} tokens ({fill:.0%} full)"
        if self.cached:
            line += " (tokenized data from the cache)"
        return "\n".join([line, *(f"  warning: {w}" for w in self.warnings())])

    def warnings(self) -> list[str]:
        out = []
        if self.unsupervised:
            out.append(
                f"{self.unsupervised} row(s) had no supervised token and were left out (first: "
                f"{self.first['unsupervised']}); check data.format, data.chat_template and data.max_seq_len"
            )
        if self.bad:
            out.append(f"skipped {self.bad} malformed row(s); first: {self.first['bad']}")
        if self.no_eos:
            out.append(
                f"{self.no_eos} kept row(s) never supervise the EOS token {self.eos_token!r} (first: "
                f"{self.first['no_eos']}), so the model may not learn to stop; see `lorakit preview-data`"
            )
        return out

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("lengths", "cached")}


@dataclass
class Datasets:
    train: list[Example]  # packed rows when data.packing
    eval: list[Example]
    train_stats: DataStats
    eval_stats: DataStats | None
    group_lengths: list[int] | None = None  # for StepSampler(lengths=...) when data.group_by_length
    fingerprint: str = ""  # of the train examples before packing (data.fingerprint), checked on resume
    cache_key: str | None = None  # their entry in the data cache (train.reference: precomputed stores there too)


# ----------------------------------------------------------------------------------------------------------
# Length policy and accounting


def fit_length(example: Example, section: DataSection, bos_token_id: int | None = None):
    """Apply data.truncation; returns (the example, or None when dropped; whether it was truncated)."""
    if example.rejected is not None:
        return fit_pair(example, section, bos_token_id)
    ids, labels, limit = example.input_ids, example.labels, section.max_seq_len
    if len(ids) <= limit:
        return example, False
    if section.truncation == "drop":
        return None, False
    if section.truncation == "truncate" or section.format == "text":  # text has no prompt: keep its start
        return Example(ids[:limit], labels[:limit], min(example.prompt_len, limit)), True
    # truncate_prompt: cut the oldest prompt tokens (after a leading BOS), never the response.
    keep = 1 if bos_token_id is not None and ids[0] == bos_token_id and example.prompt_len > 1 else 0
    excess = len(ids) - limit
    if excess > example.prompt_len - keep:
        return None, False  # the response alone is longer than max_seq_len
    cut = lambda seq: seq[:keep] + seq[keep + excess :]  # noqa: E731
    return Example(cut(ids), cut(labels), example.prompt_len - excess), True


def fit_pair(pair: Example, section: DataSection, bos_token_id: int | None = None):
    """data.truncation for a preference pair, both sequences together: the longer must fit max_seq_len.

    The shared prompt is trimmed first (its oldest tokens, after a leading BOS), by the same tokens in both;
    truncate_prompt drops the pair when that is not enough, truncate then cuts the ends of the answers.
    Returns (the pair or None; False, "prompt" or "answers": what was cut).
    """
    limit, longest = section.max_seq_len, max(len(pair), len(pair.rejected))
    if longest <= limit:
        return pair, False
    if section.truncation == "drop":
        return None, False
    keep = 1 if bos_token_id is not None and pair.input_ids[0] == bos_token_id and pair.prompt_len > 1 else 0
    excess = longest - limit
    if excess > pair.prompt_len - keep and section.truncation == "truncate_prompt":
        return None, False  # the answers alone are longer than max_seq_len
    trim = min(excess, pair.prompt_len - keep)
    cut = lambda seq: (seq[:keep] + seq[keep + trim:])[:limit]  # noqa: E731
    chosen, rejected = (Example(cut(e.input_ids), cut(e.labels), e.prompt_len - trim) for e in pair.sequences)
    chosen.rejected = rejected
    return chosen, "answers" if trim < excess else "prompt"


def tokenize_rows(rows: list[Row | dict], section: DataSection, tokenizer, stats: DataStats | None = None,
                  advance=None) -> tuple[list[Example], DataStats]:
    """Tokenize and fit rows (plain dicts are named "row N"); every row lands in exactly one count of the stats."""
    stats = stats or DataStats()
    stats.rows += len(rows)
    stats.max_seq_len, stats.eos_token = section.max_seq_len, tokenizer.eos_token
    examples = []
    for i, row in enumerate(rows):
        row = row if isinstance(row, Row) else Row(f"row {i + 1}", row)
        if advance:
            advance()
        try:
            example, truncated = fit_length(tokenize_row(row, section, tokenizer), section, tokenizer.bos_token_id)
        except BadRowError as e:
            if not section.skip_bad_rows:
                raise
            stats.note("bad", e.reason)
            continue
        if example is None:
            stats.note("too_long", row.where)
            continue
        targets = [num_targets(e.labels) for e in example.sequences]
        if min(targets) == 0:  # a pair needs both answers
            stats.note("unsupervised", row.where)
            continue
        if tokenizer.eos_token_id is not None and any(tokenizer.eos_token_id not in e.labels[1:]
                                                      for e in example.sequences):
            stats.note("no_eos", row.where)
        stats.kept += 1
        stats.truncated += bool(truncated)
        stats.answers_cut += truncated == "answers"
        targets = sum(targets)
        stats.lengths.append(example.num_tokens)
        stats.supervised_tokens += targets
        examples.append(example)
    return examples, stats


# ----------------------------------------------------------------------------------------------------------
# Loading


def train_sources(section: DataSection) -> list[str]:
    return [section.train] if isinstance(section.train, str) else list(section.train)


def _read(sources: list[str], section: DataSection, stats: DataStats) -> list[Row]:
    rows = []
    for source in sources:
        got = read_rows(source, section.skip_bad_rows)
        for message in got.bad:
            stats.note("bad", message)
        stats.rows += len(got.bad)
        rows.extend(got.rows)
    return rows


def split_eval(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """(train, eval): a seeded random ``fraction`` of the rows held out, file order kept within each."""
    if len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, round(len(rows) * fraction))])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _tokenize_splits(section: DataSection, tokenizer, seed: int) -> dict:
    train_stats, eval_stats = DataStats(), DataStats()
    rows = _read(train_sources(section), section, train_stats)
    eval_rows = _read([section.eval], section, eval_stats) if section.eval else []
    if section.eval_split:
        read = len(rows)
        rows, eval_rows = split_eval(rows, section.eval_split, seed)
        if read and not rows:
            raise UsageError(f"data.eval_split: {section.eval_split} holds out all {read} rows of data.train, "
                             "leaving none to train on; use a smaller fraction (e.g. 0.1) or a separate data.eval")
    with _progress(len(rows) + len(eval_rows)) as advance:
        train, train_stats = tokenize_rows(rows, section, tokenizer, train_stats, advance)
        evals, eval_stats = tokenize_rows(eval_rows, section, tokenizer, eval_stats, advance)
    splits = {"train": (train, train_stats)}
    if section.eval or section.eval_split:
        splits["eval"] = (evals, eval_stats)
    return splits


def _check_not_empty(key: str, names: list[str], examples: list[Example], stats: DataStats) -> None:
    if examples:
        return
    why = "is empty" if stats.rows == 0 else f"has no usable rows ({'; '.join(stats.summary().splitlines())})"
    raise DataError(
        f"data.{key}: {', '.join(names)} {why}; check data.format, data.fields, data.max_seq_len and data.truncation"
    )


def load_datasets(section: DataSection, tokenizer, seed: int) -> Datasets:
    """Tokenized train/eval examples (cached); exit 3 when nothing is left to train or evaluate on."""
    template = resolve_chat_template(section, tokenizer)
    sources = train_sources(section) + ([section.eval] if section.eval else [])
    hashes = [content_hash(s) for s in sources] if section.cache else [None]
    key = cache.cache_key(section, tokenizer, template, seed, hashes)
    stored = cache.load(key) if key else None
    if stored is not None:
        splits = {name: (examples, _stats_from(raw, examples)) for name, (examples, raw) in stored.items()}
    else:
        splits = _tokenize_splits(section, tokenizer, seed)
        _check_not_empty("train", train_sources(section), *splits["train"])
        if section.eval:
            _check_not_empty("eval", [section.eval], *splits["eval"])
        if key:
            cache.save(key, {name: (examples, stats.to_json()) for name, (examples, stats) in splits.items()})
    train, train_stats = splits["train"]
    evals, eval_stats = splits.get("eval", ([], None))
    group_lengths = [e.num_tokens for e in train] if section.group_by_length and not section.packing else None
    content = fingerprint(train)
    if section.packing:
        train = pack_examples(train, section.max_seq_len, seed)
        train_stats.packed_rows = len(train)
    return Datasets(train, evals, train_stats, eval_stats, group_lengths, content, key)


def _stats_from(raw: dict, examples: list[Example]) -> DataStats:
    stats = DataStats(**{k: v for k, v in raw.items() if k in DataStats.__dataclass_fields__})
    stats.lengths, stats.cached = [e.num_tokens for e in examples], True
    return stats


@contextmanager
def _progress(total: int):
    """A transient rich progress bar for tokenizing large datasets on a terminal (main process only)."""
    from lorakit.console import get_console, is_json, is_quiet

    console = get_console()
    shown = total >= PROGRESS_MIN_ROWS and console.is_terminal and not (is_quiet() or is_json())
    if not shown or os.environ.get("RANK", "0") != "0":
        yield None
        return
    from rich.errors import LiveError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("tokenizing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    progress = Progress(*columns, console=console, transient=True)
    task = progress.add_task("tokenize", total=total)
    try:
        progress.start()
    except LiveError:  # rich < 14 cannot nest it inside a running status spinner: go without the bar
        yield None
        return
    try:
        yield lambda: progress.advance(task)
    finally:
        progress.stop()

