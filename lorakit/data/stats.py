"""What happens to each row: the length policy (data.truncation) and the accounting of a split, per source."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable

import numpy as np

from lorakit.config.schema import DataSection
from lorakit.data.formats import Example

COUNTS = ("rows", "kept", "truncated", "too_long", "unsupervised", "bad")  # per source
ROWS_NAMED = 3  # rows a warning names of those it counts
# Truncating a few rows (a long chat's oldest turns) is routine; when this share of the kept rows or more was cut,
# max_seq_len is likely too small for the data, and a warning says so with the longest row's length.
TRUNCATED_WARN = 0.1


@dataclass
class DataStats:
    """What happened to every row of a split; ``show()`` prints it at the start of a run."""

    rows: int = 0  # rows read, malformed ones included
    kept: int = 0
    truncated: int = 0  # kept, but shortened by data.truncation
    answers_cut: int = 0  # preference pairs among the truncated whose answers were cut too (the prompt was not enough)
    too_long: int = 0  # dropped: longer than data.max_seq_len under data.truncation
    unsupervised: int = 0  # dropped: no token left for the loss
    bad: int = 0  # malformed rows skipped (data.skip_bad_rows)
    no_eos: int = 0  # kept rows whose supervised tokens hold no EOS
    empty_answers: int = 0  # kept rows whose answer has no text: only its end-of-turn (special) tokens supervised
    identical: int = 0  # kept preference pairs whose chosen and rejected sequences are the same tokens
    identical_rows: list = field(default_factory=list)  # where the first ROWS_NAMED of them are
    supervised_tokens: int = 0
    longest: int = 0  # tokens of the longest row read, before data.truncation (a pair's longer sequence)
    max_seq_len: int = 0
    truncation: str = ""  # data.truncation, for the warning
    eos_token: str | None = None
    first: dict = field(default_factory=dict)  # category -> where (and why) its first row is
    lengths: np.ndarray | list = field(default_factory=list)  # tokens per kept example (a pair's longer sequence)
    packed_rows: int = 0
    cached: bool = False
    sources: list[str] = field(default_factory=list)  # data.train's sources, in order
    per_source: dict = field(default_factory=dict)  # source index -> {count: n} for COUNTS

    @property
    def dropped(self) -> int:
        return self.too_long + self.unsupervised

    def count(self, source: int | None, key: str, n: int = 1) -> None:
        if source is not None:
            counts = self.per_source.setdefault(source, dict.fromkeys(COUNTS, 0))
            counts[key] += n

    def note(self, category: str, message: str, source: int | None = None) -> None:
        setattr(self, category, getattr(self, category) + 1)
        self.first.setdefault(category, message)
        if category in COUNTS:
            self.count(source, category)

    def merge(self, other: "DataStats") -> None:
        """Add the counts of ``other`` (a later chunk of the same split): its first rows come after ours."""
        for name in (*COUNTS, "no_eos", "empty_answers", "supervised_tokens", "answers_cut", "identical"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.identical_rows = (self.identical_rows + other.identical_rows)[:ROWS_NAMED]
        self.longest = max(self.longest, other.longest)
        for category, message in other.first.items():
            self.first.setdefault(category, message)
        for source, counts in other.per_source.items():
            for key, n in counts.items():
                self.count(source, key, n)

    def source_counts(self) -> dict[str, dict]:
        """{source: rows, kept, truncated, dropped (too long + no supervised token), bad} (the summary, run.json)."""
        out = {}
        for index, name in enumerate(self.sources):
            c = self.per_source.get(index, dict.fromkeys(COUNTS, 0))
            out[name] = {"rows": c["rows"], "kept": c["kept"], "truncated": c["truncated"],
                         "dropped": c["too_long"] + c["unsupervised"], "bad": c["bad"]}
        return out

    def summary(self) -> str:
        """One line of counts and the token-length distribution, then one line per source (several)."""
        cut = f", {self.answers_cut} of them in the answers" if self.answers_cut else ""
        parts = [f"rows {self.rows}: kept {self.kept} ({self.truncated} truncated{cut})"]
        if self.too_long:
            parts.append(f"dropped {self.too_long} longer than data.max_seq_len {self.max_seq_len}")
        if self.unsupervised:
            parts.append(f"dropped {self.unsupervised} with no supervised tokens")
        if self.bad:
            parts.append(f"skipped {self.bad} malformed")
        line = ", ".join(parts)
        if len(self.lengths):
            s = np.sort(np.asarray(self.lengths))
            pct = lambda q: int(s[min(len(s) - 1, int(q * len(s)))])  # noqa: E731
            line += (
                f"; tokens/example min {int(s[0])} p50 {pct(0.5)} p90 {pct(0.9)} max {int(s[-1])}"
                f"; supervised tokens {self.supervised_tokens:,d}"
            )
        if self.packed_rows:
            fill = int(np.sum(self.lengths)) / (self.packed_rows * self.max_seq_len)
            line += f"; packed into {self.packed_rows} rows of <= {self.max_seq_len} tokens ({fill:.0%} full)"
        if self.cached:
            line += " (tokenized data from the cache)"
        lines = [line]
        if len(self.sources) > 1:
            lines += [f"  {name}: rows {c['rows']}, kept {c['kept']} ({c['truncated']} truncated), dropped "
                      f"{c['dropped']}, skipped {c['bad']} malformed" for name, c in self.source_counts().items()]
        return "\n".join(lines)

    def show(self, split: str, say: Callable[[str], None], warn: Callable[[str], None]) -> None:
        """The summary at the start of a run (``split``: train, eval), and each warning through ``warn``, named
        by its split as the summary is."""
        say(f"{split} data: {self.summary()}")
        for warning in self.warnings():
            warn(f"{split} data: {warning}")

    def warnings(self) -> list[str]:
        out = []
        if self.unsupervised:
            out.append(
                f"{self.unsupervised} row(s) had no supervised token and were left out (first: "
                f"{self.first['unsupervised']}); check data.format, data.chat_template and data.max_seq_len"
            )
        if self.bad:
            out.append(f"skipped {self.bad} malformed row(s); first: {self.first['bad']}")
        if self.kept and self.truncated >= TRUNCATED_WARN * self.kept:
            longest = f"the longest row has {self.longest:,d} tokens: " if self.longest else ""
            out.append(
                f"{self.truncated} of {self.kept} kept rows ({self.truncated / self.kept:.0%}) were longer than "
                f"data.max_seq_len {self.max_seq_len} and were cut (data.truncation: {self.truncation or '?'}; first: "
                f"{self.first.get('truncated', '?')}); {longest}raise data.max_seq_len, or set data.truncation: drop "
                "to leave such rows out"
            )
        if self.identical:
            more = ", ..." if self.identical > len(self.identical_rows) else ""
            out.append(f"{self.identical} preference pair(s) have the same chosen and rejected answer and teach no "
                       f"preference (zero gradient of the preference loss): {', '.join(self.identical_rows)}{more}; "
                       "give them a rejected answer that differs, or remove them")
        if self.empty_answers:
            out.append(
                f"{self.empty_answers} kept row(s) have an empty answer (first: {self.first['empty_answers']}): they "
                "teach the model to end its turn at once; give them an answer, or remove them"
            )
        if self.no_eos:
            out.append(
                f"{self.no_eos} kept row(s) never supervise the EOS token {self.eos_token!r} (first: "
                f"{self.first['no_eos']}), so the model may not learn to stop; see `lorakit preview-data`"
            )
        return out

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("lengths", "cached", "per_source", "sources")}
        out["per_source"] = self.source_counts()
        return out

    @classmethod
    def from_json(cls, raw: dict, sources: list[str]) -> "DataStats":
        """The stats ``to_json`` wrote (a cached split); lengths come from the store."""
        stats = cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__ and k != "per_source"})
        stats.sources = list(sources)
        for index, name in enumerate(sources):
            counts = raw.get("per_source", {}).get(name)
            if counts is not None:
                stats.per_source[index] = dict.fromkeys(COUNTS, 0) | {
                    k: counts[k] for k in ("rows", "kept", "truncated", "bad")} | {"too_long": counts["dropped"]}
        return stats


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
    truncate_prompt drops the pair when that is not enough. truncate then keeps the prompt's newest tokens, up to
    half of max_seq_len (TRL's former default max_prompt_length 512 of max_length 1024), and cuts the ends of the
    answers: a pair never loses its whole prompt to a long answer.
    Returns (the pair or None; False, "prompt" or "answers": what was cut).
    """
    limit, longest = section.max_seq_len, max(len(pair), len(pair.rejected))
    if longest <= limit:
        return pair, False
    if section.truncation == "drop":
        return None, False
    keep = 1 if bos_token_id is not None and pair.input_ids[0] == bos_token_id and pair.prompt_len > 1 else 0
    excess = longest - limit
    trim = excess
    if excess > pair.prompt_len - keep:  # the answers alone are longer than max_seq_len
        if section.truncation == "truncate_prompt":
            return None, False
        trim = max(0, pair.prompt_len - max(limit // 2, keep))
    cut = lambda seq: (seq[:keep] + seq[keep + trim:])[:limit]  # noqa: E731
    chosen, rejected = (Example(cut(e.input_ids), cut(e.labels), e.prompt_len - trim) for e in pair.sequences)
    chosen.rejected = rejected
    return chosen, "answers" if trim < excess else "prompt"
