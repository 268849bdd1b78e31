"""Training data: read rows, render them in the recipe's format, tokenize with labels, plan batches.

Labels are -100 wherever the loss must not look: prompt tokens (unless train_on_inputs) and padding.
The end-of-sequence / end-of-turn token of every response is always supervised.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import DataError
from lorakit.recipe import DataSection

IGNORE_INDEX = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

# Fields each format reads; data.fields maps them to the dataset's column names.
FORMAT_FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages",),
    "text": ("text",),
    "completion": ("prompt", "completion"),
}
OPTIONAL_FIELDS = {"input"}


# ----------------------------------------------------------------------------------------------------------
# Reading rows


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}); fix or remove the line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            row["_lorakit_source"] = f"{path}:{lineno}"
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"train": [...]} style
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects (or use .jsonl, one object per line)")
    rows = []
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: item {i}: expected a JSON object, got {type(row).__name__}")
        rows.append({**row, "_lorakit_source": f"{path}[{i}]"})
    return rows


def _read_with_datasets(source: str) -> list[dict]:
    import datasets

    path = Path(source)
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"]
        elif path.suffix in (".csv", ".parquet"):
            ds = datasets.load_dataset(path.suffix[1:], data_files=str(path), split="train")
        else:
            ds = datasets.load_dataset(source, split="train")
    except FileNotFoundError as e:
        raise DataError(f"data: {source!r} not found ({e})") from None
    except Exception as e:  # datasets raises many types for unreachable ids and unreadable files
        raise DataError(f"data: cannot load {source!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return [{**row, "_lorakit_source": f"{source}[{i}]"} for i, row in enumerate(ds)]


def read_rows(source: str) -> list[dict]:
    """Rows of one data source, each tagged with where it came from (file:line) for error messages."""
    path = Path(source)
    if path.suffix in (".jsonl", ".json", ".csv", ".parquet") and not path.exists():
        raise DataError(f"data: file {source!r} not found")
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        return _read_json(path)
    return _read_with_datasets(source)


# ----------------------------------------------------------------------------------------------------------
# Rendering and tokenizing


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class DataStats:
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    lengths: list[int] = field(default_factory=list)
    supervised_tokens: int = 0

    def summary(self) -> str:
        if not self.lengths:
            return f"rows {self.rows}: kept 0, truncated {self.truncated}, dropped {self.dropped}"
        s = sorted(self.lengths)
        pct = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
        return (
            f"rows {self.rows}: kept {self.kept}, truncated {self.truncated}, dropped {self.dropped}; "
            f"tokens/example min {s[0]} p50 {pct(0.5)} p90 {pct(0.9)} max {s[-1]}; "
            f"supervised tokens {self.supervised_tokens:,d}"
        )


def _field(row: dict, name: str, section: DataSection, kind=str):
    column = section.fields.get(name, name)
    where = row.get("_lorakit_source", "?")
    if column not in row or row[column] is None:
        if name in OPTIONAL_FIELDS:
            return ""
        hint = f" (mapped from {name!r} by data.fields)" if column != name else ""
        present = ", ".join(k for k in row if k != "_lorakit_source")
        raise DataError(
            f"{where}: missing field {column!r}{hint} for data.format {section.format}; the row has {present}; "
            f"map columns with data.fields"
        )
    value = row[column]
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {column!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _ids(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _prompt_response(prompt_ids: list[int], response_ids: list[int], train_on_inputs: bool) -> Example:
    prompt_labels = list(prompt_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)
    return Example(list(prompt_ids) + list(response_ids), prompt_labels + list(response_ids))


def _chat_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def tokenize_chat(tokenizer, messages: list[dict], train_on_inputs: bool, where: str) -> Example:
    """Render with the tokenizer's chat template; supervise every assistant turn (its end-of-turn included).

    Turn boundaries come from rendering growing prefixes of the conversation, so any template whose
    rendering of a prefix is a prefix of the full rendering (ChatML, Llama-3, Mistral, ...) works.
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: every message needs string 'role' and 'content', got {m!r:.80}")
    full = _chat_ids(tokenizer, messages)
    labels = list(full) if train_on_inputs else [IGNORE_INDEX] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_chat_ids(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        end = len(_chat_ids(tokenizer, messages[: i + 1]))
        if _chat_ids(tokenizer, messages[: i + 1]) != full[:end]:
            raise DataError(f"{where}: the chat template does not render turn prefixes consistently; set data.chat_template")
        labels[start:end] = full[start:end]
    return Example(full, labels)


def tokenize_row(row: dict, section: DataSection, tokenizer) -> Example:
    where = row.get("_lorakit_source", "?")
    fmt = section.format
    if fmt == "chat":
        return tokenize_chat(tokenizer, _field(row, "messages", section, list), section.train_on_inputs, where)
    if fmt == "text":
        ids = _ids(tokenizer, _field(row, "text", section), True) + _eos(tokenizer)
        return Example(ids, list(ids))
    if fmt == "alpaca":
        instruction, inp = _field(row, "instruction", section), _field(row, "input", section)
        template = ALPACA_PROMPT_WITH_INPUT if inp.strip() else ALPACA_PROMPT
        prompt = template.format(instruction=instruction, input=inp)
        response = _field(row, "output", section)
    else:  # completion
        prompt, response = _field(row, "prompt", section), _field(row, "completion", section)
    return _prompt_response(
        _ids(tokenizer, prompt, True), _ids(tokenizer, response, False) + _eos(tokenizer), section.train_on_inputs
    )


def fit_length(example: Example, section: DataSection) -> tuple[Example | None, bool]:
    """Apply data.truncation; returns (example or None if dropped, was_truncated)."""
    n, limit = len(example.input_ids), section.max_seq_len
    if n <= limit:
        return example, False
    if section.truncation == "drop":
        return None, False
    if section.truncation == "truncate":
        return Example(example.input_ids[:limit], example.labels[:limit]), True
    # truncate_prompt: cut unsupervised tokens from the left; never the response.
    prompt_len = 0
    while prompt_len < n and example.labels[prompt_len] == IGNORE_INDEX:
        prompt_len += 1
    excess = n - limit
    if excess > prompt_len or prompt_len == 0:
        return None, False  # the response alone is too long
    return Example(example.input_ids[excess:], example.labels[excess:]), True


def tokenize_rows(rows: list[dict], section: DataSection, tokenizer) -> tuple[list[Example], DataStats]:
    stats = DataStats(rows=len(rows))
    examples = []
    for row in rows:
        example, truncated = fit_length(tokenize_row(row, section, tokenizer), section)
        if example is None:
            stats.dropped += 1
            continue
        if example.num_supervised == 0:
            stats.dropped += 1  # nothing to learn from; counted, never trained on silently
            continue
        stats.truncated += truncated
        stats.kept += 1
        stats.lengths.append(len(example.input_ids))
        stats.supervised_tokens += example.num_supervised
        examples.append(example)
    return examples, stats


@dataclass
class Datasets:
    train: list[Example]
    eval: list[Example]
    train_stats: DataStats
    eval_stats: DataStats | None


def load_datasets(section: DataSection, tokenizer, seed: int) -> Datasets:
    """Tokenized train/eval examples; exit 3 when nothing is left to train on."""
    import random

    sources = [section.train] if isinstance(section.train, str) else list(section.train)
    rows = [row for source in sources for row in read_rows(source)]
    eval_rows: list[dict] = []
    if section.eval:
        eval_rows = read_rows(section.eval)
    elif section.eval_split:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(rows) * section.eval_split)) if len(rows) > 1 else 0
        held = set(order[:n_eval])
        eval_rows = [r for i, r in enumerate(rows) if i in held]
        rows = [r for i, r in enumerate(rows) if i not in held]
    train, train_stats = tokenize_rows(rows, section, tokenizer)
    if not train:
        why = "is empty" if not rows else f"has no usable rows ({train_stats.summary()})"
        raise DataError(
            f"data.train: {', '.join(sources)} {why}; check data.format, data.max_seq_len and data.truncation"
        )
    evals, eval_stats = tokenize_rows(eval_rows, section, tokenizer) if eval_rows else ([], None)
    return Datasets(train, evals, train_stats, eval_stats)


# ----------------------------------------------------------------------------------------------------------
# Batching


def collate(examples: list[Example], tokenizer):
    """Pad to the longest example of the micro-batch (labels padded with -100) via transformers' collator."""
    from transformers import DataCollatorForSeq2Seq

    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
    return collator([{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)} for e in examples])


@dataclass
class StepSampler:
    """Which examples each rank sees at each optimizer step: deterministic from (seed, step) alone.

    An epoch is a seeded permutation; optimizer step s of the epoch takes the next
    micro_batch_size × grad_accum × world_size examples, split into micro-batches dealt round-robin to
    ranks. Two ranks with grad_accum k thus see exactly the examples one rank with 2k sees, and a
    resumed run needs only the step number to continue where it stopped.
    """

    num_examples: int
    micro_batch_size: int
    grad_accum: int
    seed: int
    world_size: int = 1
    rank: int = 0
    _orders: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.global_batch)

    def epoch_order(self, epoch: int) -> list[int]:
        import torch

        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._orders = {epoch: torch.randperm(self.num_examples, generator=generator).tolist()}
        return self._orders[epoch]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's micro-batches (lists of example indices) for optimizer step ``step`` (0-based)."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        chunk = order[offset * self.global_batch : (offset + 1) * self.global_batch]
        micro = [chunk[i : i + self.micro_batch_size] for i in range(0, len(chunk), self.micro_batch_size)]
        return micro[self.rank :: self.world_size]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch
