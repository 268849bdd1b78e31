"""Answer scoring shared by `lorakit eval` and train.eval_generate: rows → prompts rendered as training renders
them, greedy batched generation with left padding, and the metrics (exact, contains, regex, rouge-l).

The prompt is the row's token ids before its last response, cut from the very Example training builds
(data.formats.tokenize_row), so a template, field map or truncation rule can never differ between the two.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

from lorakit.compat import adapter_generate, prompt_learning_uncached
from lorakit.config.schema import EVAL_METRICS as METRICS
from lorakit.config.schema import DataSection, Recipe
from lorakit.data.formats import IGNORE_INDEX, Example, answer_of, num_targets, through_last_answer, tokenize_row
from lorakit.data.pipeline import fit_length, split_eval, train_sources
from lorakit.data.sources import BadRowError, Row, read_rows
from lorakit.errors import DataError, UsageError
from lorakit.models.checks import new_token_room, position_limit


@dataclass
class EvalItem:
    where: str  # file:line of the row
    example: Example  # what the loss is computed on: the response tokens only (train_on_inputs off)
    prompt_ids: list[int] | None  # everything before the last response; None for text rows (loss only)
    answer: str | None
    pair: Example | None = None  # a preference row: its chosen and rejected sequences, cut as training cuts them


def eval_items(rows: list[Row], section: DataSection, tokenizer) -> tuple[list[EvalItem], list[str]]:
    """(items, why each skipped row was skipped): rows rendered with the recipe's format, fields, template and
    length rule; only the response is supervised, so the loss is the answer's loss whatever train_on_inputs (a
    preference pair's: the chosen answer's, the rejected one left out)."""
    section = section.model_copy(update={"train_on_inputs": False})
    items, skipped = [], []
    for row in rows:
        try:
            cut = through_last_answer(row, section)
            if cut is None:  # as training does: a row with nothing to supervise is left out, and said so
                skipped.append(f"{row.where}: no assistant turn to score against")
                continue
            row = cut
            example, _ = fit_length(tokenize_row(row, section, tokenizer), section, tokenizer.bos_token_id)
        except BadRowError as e:
            raise DataError(f"{e.reason} (lorakit eval reads rows as the run's data.format {section.format})") from None
        if example is None or not num_targets(example.labels):
            skipped.append(f"{row.where}: longer than data.max_seq_len {section.max_seq_len} or no answer token left")
            continue
        pair = None
        if example.rejected is not None:  # a pair, cut as training cuts it: its chosen answer is the one scored
            pair, example = example, Example(example.input_ids, example.labels, example.prompt_len)
        answer = answer_of(row, section)
        prompt = example.input_ids[: last_response_start(example.labels)] if answer is not None else None
        items.append(EvalItem(row.where, example, prompt, answer, pair))
    return items, skipped


def last_response_start(labels: list[int]) -> int:
    """Index of the first token of the last supervised run: where the last response begins."""
    k = len(labels)
    while k and labels[k - 1] == IGNORE_INDEX:
        k -= 1
    while k and labels[k - 1] != IGNORE_INDEX:
        k -= 1
    return k


# ----------------------------------------------------------------------------------------------------------
# Generation


def check_new_tokens(model, max_new_tokens: int) -> None:
    """Exit 2 when --max-new-tokens alone reaches past the context of a model that computes any position (RoPE:
    max_position_embeddings, the prompt included), where transformers would only warn and generate past the
    positions the model was trained on. A model with a table of positions has the new tokens cut to it instead
    (new_token_room): past the table there is nothing to compute."""
    if position_limit(model.config) is not None:
        return
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and max_new_tokens >= context:
        raise UsageError(f"--max-new-tokens {max_new_tokens:,d}: the model's context is {context:,d} tokens "
                         f"(max_position_embeddings), the prompt included; give fewer than {context:,d}")


def generate_greedy(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int,
                    adapter_on: bool = True) -> list[str]:
    """Greedy completions of token-id prompts, ``batch_size`` at a time, left-padded so every row's new tokens
    start at the same column. Prompts are batched in order of length (less padding) and returned in input order.
    ``adapter_on=False`` under the model's disable_adapter(): the base's own generate() (lorakit.compat's prefix
    path would bring the prefix back)."""
    import torch
    from transformers import GenerationConfig

    batch_size = generation_batch_size(model, batch_size, adapter_on)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # use_cache: load_base_model turns the model's off for training (adapter_generate may turn it off again)
    if prompts:  # the longest prompt sets what a model with a position table leaves to generate
        max_new_tokens = new_token_room(model, max(map(len, prompts)), max_new_tokens, adapter_on)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                              eos_token_id=model.generation_config.eos_token_id, use_cache=True)
    generate = partial(adapter_generate, model) if adapter_on else model.generate
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = [[pad] * (width - len(prompts[i])) + prompts[i] for i in chunk]
        mask = [[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk]
        with torch.no_grad():
            generated = generate(input_ids=torch.tensor(ids, device=device),
                                 attention_mask=torch.tensor(mask, device=device), generation_config=config)
        for i, row in zip(chunk, generated[:, width:].tolist()):
            out[i] = tokenizer.decode(row, skip_special_tokens=True)
    return out


def generation_batch_size(model, batch_size: int, adapter_on: bool = True, peft_version: str | None = None) -> int:
    """``batch_size``, or 1 where the adapter generates without the KV cache (compat.prompt_learning_uncached; PEFT
    before 0.22): its virtual tokens sit before the left padding, so a padded row would see them at another
    distance. The base under disable_adapter() (``adapter_on=False``) generates as any model, in batches."""
    return 1 if adapter_on and prompt_learning_uncached(model, peft_version) else batch_size


# ----------------------------------------------------------------------------------------------------------
# Metrics


def normalize(text: str) -> str:
    """Whitespace collapsed and case folded: formatting is not what a score should measure."""
    return " ".join(text.split()).casefold()


def score(output: str, answer: str, metric: str, where: str = "") -> float:
    """1.0/0.0 for exact, contains and regex (the answer is the pattern, searched in the output); the
    ROUGE-L F1 of whitespace tokens for rouge-l."""
    if metric == "exact":
        return float(normalize(output) == normalize(answer))
    if metric == "contains":
        return float(normalize(answer) in normalize(output))
    if metric == "regex":
        return float(_pattern(answer, where).search(output) is not None)
    return rouge_l(normalize(output).split(), normalize(answer).split())


def _pattern(answer: str, where: str) -> re.Pattern:
    try:
        return re.compile(answer, flags=re.IGNORECASE)
    except re.error as e:
        raise DataError(f"{where}: the answer {answer!r:.60} is not a regular expression ({e}); --metric regex "
                        "reads each row's answer as a pattern") from None


def check_answers(items: list[EvalItem], metric: str, option: str, instead: str) -> None:
    """Exit 3 at load for an answer the metric cannot score: an empty (or blank) one under contains or regex,
    which every output matches, and under regex one that is no pattern. ``option`` and ``instead`` name the
    metric's flag or key as given and the same set to exact, for the message."""
    if metric not in ("contains", "regex"):
        return
    for item in items:
        if item.answer is not None and not item.answer.strip():
            raise DataError(f"{item.where}: the answer is empty, and under {option} an empty answer matches every "
                            f"output; give the row its answer, or score with {instead}")
        if item.answer is not None and metric == "regex":
            _pattern(item.answer, item.where)


def rouge_l(candidate: list[str], reference: list[str]) -> float:
    """ROUGE-L F1: the longest common subsequence against both lengths."""
    if not candidate or not reference:
        return float(candidate == reference)
    previous = [0] * (len(reference) + 1)
    for token in candidate:
        current = [0]
        for j, ref in enumerate(reference):
            current.append(previous[j] + 1 if token == ref else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return round(2 * precision * recall / (precision + recall), 6)


def score_items(model, tokenizer, items: list[EvalItem], metric: str, *, max_new_tokens: int,
                batch_size: int, adapter_on: bool = True) -> tuple[list[str], list[float]]:
    """(outputs, scores) of the items that have an answer, in order (``adapter_on``: as generate_greedy's)."""
    scored = [item for item in items if item.answer is not None]
    outputs = generate_greedy(model, tokenizer, [item.prompt_ids for item in scored],
                              max_new_tokens=max_new_tokens, batch_size=batch_size, adapter_on=adapter_on)
    return outputs, [score(o, item.answer, metric, item.where) for o, item in zip(outputs, scored)]


# ----------------------------------------------------------------------------------------------------------
# During training (train.eval_generate)


class TrainingScorer:
    """Scores the first train.eval_generate eval rows with the model being trained (main process only)."""

    def __init__(self, recipe: Recipe, tokenizer):
        section, n = recipe.data, recipe.train.eval_generate
        if section.eval:
            rows = read_rows(section.eval, section.skip_bad_rows, section.split, section.subset).rows
        else:  # the rows data.eval_split held out: the same seeded split the pipeline made
            rows = [r for source in train_sources(section)
                    for r in read_rows(source, section.skip_bad_rows, section.split, section.subset).rows]
            rows = split_eval(rows, section.eval_split, recipe.train.seed)[1]
        self.items = [i for i in eval_items(rows, section, tokenizer)[0] if i.answer is not None][:n]
        self.tokenizer, self.metric = tokenizer, recipe.train.eval_metric
        check_answers(self.items, self.metric, f"train.eval_metric {self.metric}", "train.eval_metric: exact")
        self.batch_size = recipe.train.micro_batch_size
        # Room for the longest answer and a little more: exact needs no more, the others seldom do.
        self.max_new_tokens = max((len(i.example) - len(i.prompt_ids) for i in self.items), default=1) + 16

    def __call__(self, model) -> dict:
        """{"eval_score": mean score}, the model left in the mode it was in."""
        if not self.items:
            return {}
        training = model.training
        model.eval()
        _, scores = score_items(model, self.tokenizer, self.items, self.metric, max_new_tokens=self.max_new_tokens,
                                batch_size=self.batch_size)
        model.train(training)
        return {"eval_score": round(sum(scores) / len(scores), 6)}
