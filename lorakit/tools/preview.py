"""`lorakit preview-data`: the first rows exactly as the model will see them. Nothing is trained.

Supervised tokens (the ones the loss is computed on) are highlighted, masked ones dimmed; on a non-terminal
the supervised spans are written between [[ and ]]. Rows with no supervised token or no supervised EOS are
flagged, because a wrong chat template or a lost EOS is otherwise invisible until the model misbehaves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.config.schema import DataSection, Recipe
from lorakit.data.chat import rendering_with
from lorakit.data.formats import IGNORE_INDEX, Example, num_targets, tokenize_row
from lorakit.data.pipeline import fit_length, load_datasets, source_sections, train_sources
from lorakit.data.sources import BadRowError, read_rows

SUPERVISED_STYLE, MASKED_STYLE = "bold green", "dim"
PLAIN_OPEN, PLAIN_CLOSE = "[[", "]]"


@dataclass
class PreviewRow:
    where: str
    status: str  # kept | truncated | dropped: ... | skipped: ...
    example: Example | None = None
    warnings: list[str] = field(default_factory=list)


def preview_rows(section: DataSection, tokenizer, n: int) -> list[PreviewRow]:
    """The first ``n`` training rows, tokenized and fitted as in training (each with its source's format, fields
    and chat template), dropped ones included."""
    rows = []
    for source, own in zip(train_sources(section), source_sections(section, tokenizer)):
        rows += [(row, own) for row in read_rows(source, section.skip_bad_rows, section.split, section.subset).rows]
        if len(rows) >= n:
            break
    out = []
    for row, (own, template, key) in rows[:n]:
        try:
            with rendering_with(tokenizer, template, key):
                example = tokenize_row(row, own, tokenizer)
            example, truncated = fit_length(example, own, tokenizer.bos_token_id)
        except BadRowError as e:
            if not section.skip_bad_rows:
                raise
            out.append(PreviewRow(row.where, f"skipped: {e.reason.split(': ', 1)[-1]}"))
            continue
        if example is None:
            out.append(PreviewRow(row.where, f"dropped: longer than data.max_seq_len {section.max_seq_len}"))
            continue
        shown = PreviewRow(row.where, "truncated" if truncated else "kept", example)
        if min(supervised for _, supervised in counts(example)) == 0:  # a pair: either sequence
            shown.status = "dropped: no supervised tokens"
            shown.warnings.append("no supervised tokens: this row teaches nothing")
        elif tokenizer.eos_token_id is not None and any(tokenizer.eos_token_id not in e.labels[1:]
                                                        for e in example.sequences):
            shown.warnings.append(f"no supervised EOS ({tokenizer.eos_token}): the model may not learn to stop")
        out.append(shown)
    return out


def spans(example: Example, tokenizer) -> list[tuple[str, bool]]:
    """(text, supervised) runs of consecutive tokens, each run decoded as a whole (keeps multi-byte text intact)."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(example.input_ids, example.labels):
        supervised = label != IGNORE_INDEX
        if runs and runs[-1][1] == supervised:
            runs[-1][0].append(token)
        else:
            runs.append(([token], supervised))
    return [
        (tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False), supervised)
        for ids, supervised in runs
    ]


def counts(example: Example) -> list[tuple[int, int]]:
    """(tokens, supervised) of each sequence: the example's, or a pair's chosen then rejected one."""
    return [(len(e), num_targets(e.labels)) for e in example.sequences]


def header(index: int, row: PreviewRow) -> str:
    if row.example is None:
        return f"example {index}  {row.where}  {row.status}"
    tokens, supervised = (" + ".join(map(str, column)) for column in zip(*counts(row.example)))  # chosen + rejected
    return f"example {index}  {row.where}  {tokens} tokens, {supervised} supervised  {row.status}"


def views(example: Example) -> list[tuple[str, Example]]:
    """What to show of an example: itself, or a preference pair's chosen and rejected sequences, each labelled."""
    if example.rejected is None:
        return [("", example)]
    return [("chosen: ", example), ("rejected: ", example.rejected)]


def render_plain(index: int, row: PreviewRow, tokenizer) -> str:
    lines = [header(index, row)]
    for label, example in views(row.example) if row.example is not None else []:
        lines.append(label + "".join(f"{PLAIN_OPEN}{t}{PLAIN_CLOSE}" if s else t for t, s in spans(example, tokenizer)))
    lines += [f"  warning: {w}" for w in row.warnings]
    return "\n".join(lines)


def render_rich(index: int, row: PreviewRow, tokenizer):
    from rich.console import Group
    from rich.text import Text

    parts = [Text(header(index, row), style="bold")]
    for label, example in views(row.example) if row.example is not None else []:
        body = Text(label, style="bold")
        for text, supervised in spans(example, tokenizer):
            body.append(text, style=SUPERVISED_STYLE if supervised else MASKED_STYLE)
        parts.append(body)
    parts += [Text(f"  warning: {w}", style="yellow") for w in row.warnings]
    return Group(*parts)


def preview_data(recipe: Recipe, n: int, stats: bool = True) -> None:
    """Print the first ``n`` rows as the model sees them, then (with ``stats``) the whole dataset's summary."""
    from lorakit.console import emit, get_console, is_json, warner
    from lorakit.models.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(recipe.model, resolve_model_path(recipe.model))
    rows = preview_rows(recipe.data, tokenizer, n)
    console = get_console()
    if is_json():
        for i, row in enumerate(rows, 1):  # tokens, supervised, spans: of the sequence, or a pair's chosen one
            shown = views(row.example) if row.example is not None else []
            (tokens, supervised), *rejected = counts(row.example) if shown else [(0, 0)]
            extra = {"rejected_tokens": rejected[0][0], "rejected_supervised": rejected[0][1],
                     "rejected_spans": [[t, s] for t, s in spans(shown[1][1], tokenizer)]} if rejected else {}
            emit("preview", index=i, where=row.where, status=row.status, tokens=tokens, supervised=supervised,
                 warnings=row.warnings, spans=[[t, s] for t, s in spans(shown[0][1], tokenizer)] if shown else [],
                 **extra)
    elif console.is_terminal:
        console.print(legend(), soft_wrap=False)
        for i, row in enumerate(rows, 1):
            console.print(render_rich(i, row, tokenizer), soft_wrap=False)
            console.print()
    else:
        console.print(f"supervised tokens are shown {PLAIN_OPEN}like this{PLAIN_CLOSE}; the rest is masked (-100)\n",
                      markup=False)
        for i, row in enumerate(rows, 1):
            console.print(render_plain(i, row, tokenizer) + "\n", markup=False)
    if stats or not rows:  # no row to show: loading says why (an empty file is exit 3), even with --no-stats
        data = load_datasets(recipe.data, tokenizer, recipe.train.seed)
        for name, split in (("train", data.train_stats), ("eval", data.eval_stats)):
            if split is None:
                continue
            if is_json():  # the summary as a "data" event, its warnings as "warning" events
                emit("data", split=name, summary=split.summary())
                for warning in split.warnings():
                    warner(True)(f"{name} data: {warning}")
            else:
                split.show(name, lambda line: console.print(line, markup=False), warner(True))


def legend():
    from rich.text import Text

    text = Text()
    text.append("supervised tokens", style=SUPERVISED_STYLE)
    text.append(" are highlighted, ")
    text.append("masked ones (-100) dimmed", style=MASKED_STYLE)
    return text
