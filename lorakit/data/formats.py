"""Row formats (alpaca, chat, text, completion, preference) rendered to token ids with labels.

Labels are -100 wherever the loss must not look: prompt tokens (unless data.train_on_inputs) and padding.
The end of every response (EOS, or the chat template's end-of-turn) is supervised.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

from lorakit.config.schema import DataSection
from lorakit.data.chat import TemplateUnfit, chat_spans, check_messages, named_chat_templates, render
from lorakit.data.sources import BadRowError, Row
from lorakit.errors import UsageError

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

OPTIONAL_FIELDS = {"input"}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int = 0  # tokens before the first response token: what truncate_prompt may cut
    seq_lens: list[int] | None = None  # a packed row: the lengths of the examples packed into it
    # A preference pair: this example is prompt + chosen answer, ``rejected`` is prompt + rejected answer (the same
    # prompt tokens); ``ref_logps`` the reference model's summed log-probs of the two answers (train.reference:
    # precomputed).
    rejected: "Example | None" = None
    ref_logps: tuple[float, float] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens a forward runs on: both sequences of a pair."""
        return len(self.input_ids) + (len(self.rejected) if self.rejected is not None else 0)

    @property
    def longest(self) -> int:
        """Tokens of its longest sequence: what data.max_seq_len bounds (a pair's longer answer)."""
        return max(len(self), len(self.rejected)) if self.rejected is not None else len(self)

    @property
    def sequences(self) -> list["Example"]:
        return [self] if self.rejected is None else [self, self.rejected]


# ----------------------------------------------------------------------------------------------------------
# Chat rows (templates and turn spans: lorakit.data.chat)


def chat_example(ids: list[int], starts: list[int], spans: list[tuple[int, int]], train_on_inputs: bool) -> Example:
    """Labels for a rendered conversation: a token is supervised when the character it starts at is in a span."""
    ids = list(ids)
    labels = list(ids) if train_on_inputs else [IGNORE_INDEX] * len(ids)
    if starts == sorted(starts):  # offsets in order (always, for real tokenizers): bisect. (sorted: linear on a run)
        for start, end in spans:
            a, b = bisect_left(starts, start), bisect_left(starts, end)
            labels[a:b] = ids[a:b]
        prompt_len = bisect_left(starts, spans[0][0]) if spans else len(ids)
        return Example(ids, labels, prompt_len)
    for start, end in spans:
        for k, char in enumerate(starts):
            if start <= char < end:
                labels[k] = ids[k]
    prompt_len = next((k for k, char in enumerate(starts) if spans and char >= spans[0][0]), len(ids))
    return Example(ids, labels, prompt_len)


def _backend(tokenizer):
    """A fast tokenizer's Rust backend where calling it directly gives the ids ``tokenizer(texts)`` gives (no
    truncation or padding set on it, special tokens in the text matched as the tokenizer's call matches them), else
    None. Called directly, it skips the per-text dicts transformers builds (and offsets where none are asked for)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return None
    if backend.encode_special_tokens != bool(getattr(tokenizer, "split_special_tokens", False)):
        return None
    return backend


def token_ids(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """The token ids of each text, as ``tokenizer(texts, add_special_tokens=...)["input_ids"]``."""
    if not texts:
        return []
    backend = _backend(tokenizer)
    if backend is None:
        return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]


def _ids_and_starts(tokenizer, texts: list[str]):
    """(token ids, the character each token starts at) of each text, without special tokens added, for a fast
    tokenizer (offsets as ``return_offsets_mapping`` gives them)."""
    backend = _backend(tokenizer)
    if backend is None:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [(ids, [a for a, _ in offsets]) for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"])]
    return [(e.ids, [a for a, _ in e.offsets]) for e in backend.encode_batch(texts, add_special_tokens=False)]


def _tokenize_with_starts(tokenizer, text: str, boundaries: list[int]) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and the character each token starts at, for a tokenizer without offsets (a fast
    one gives them in tokenize_batch's one call): a token starts at the last turn boundary whose prefix it
    follows."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cuts = [(len(tokenizer(text[:b], add_special_tokens=False)["input_ids"]), b) for b in sorted(set(boundaries))]
    return list(ids), [max((b for n, b in cuts if n <= k), default=0) for k in range(len(ids))]


# ----------------------------------------------------------------------------------------------------------
# Rows to examples


def _field(row: Row, name: str, section: DataSection, kind: type = str):
    column = section.fields.get(name, name)
    if column not in row.data or row.data[column] is None:
        if name in OPTIONAL_FIELDS:
            return ""
        hint = f" (data.fields maps {name!r} to it)" if column != name else ""
        if column in row.data:  # present but null: "missing ... the row has it" would contradict itself
            raise BadRowError(f"{row.where}: field {column!r}{hint} is null; data.format {section.format} needs "
                              f"{'a list' if kind is list else 'a string'} there")
        present = ", ".join(map(str, row.data)) or "no fields"
        raise BadRowError(
            f"{row.where}: missing field {column!r}{hint} for data.format {section.format}; the row has {present}; "
            "map columns with data.fields"
        )
    value = row.data[column]
    if not isinstance(value, kind):
        what = {str: "a string", list: "a list"}[kind]
        raise BadRowError(
            f"{row.where}: field {column!r} must be {what}, got {type(value).__name__} ({value!r:.40})"
        )
    return value


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _prompt_response(row: Row, section: DataSection) -> tuple[str | None, str]:
    """The prompt (masked; None for text rows, whose text is tokenized with special tokens) and the response."""
    fmt = section.format
    if fmt == "text":
        return None, _field(row, "text", section)
    if fmt == "alpaca":
        instruction, inp = _field(row, "instruction", section), _field(row, "input", section)
        template = ALPACA_PROMPT_WITH_INPUT if inp.strip() else ALPACA_PROMPT
        return template.format(instruction=instruction, input=inp), _field(row, "output", section)
    return _field(row, "prompt", section), _field(row, "completion", section)  # completion


def _pair_example(prompt_ids: list[int] | None, response_ids: list[int], section: DataSection, eos: int | None):
    response_ids = _with_eos(list(response_ids), eos)
    if prompt_ids is None:  # text: everything is learned
        return Example(response_ids, list(response_ids), 0)
    prompt_ids = list(prompt_ids)
    prompt_labels = list(prompt_ids) if section.train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)
    return Example(prompt_ids + response_ids, prompt_labels + response_ids, len(prompt_ids))


def tokenize_batch(rows: list[Row], section: DataSection, tokenizer) -> list[Example | BadRowError]:
    """Each row as token ids and labels, or the BadRowError naming its place and field.

    One tokenizer call per column for the whole batch: a fast tokenizer encodes it in parallel in Rust, and the
    ids are those of one call per row.
    """
    out: list = [None] * len(rows)
    if section.format == "preference":  # pairs: one prompt rendering shared by both answers
        texts = []
        for i, row in enumerate(rows):
            try:
                texts.append((i, _pair_texts(row, section, tokenizer)))
            except BadRowError as e:
                out[i] = e
        for (i, _), example in zip(texts, _pair_examples([t for _, t in texts], tokenizer)):
            out[i] = example
        return out
    if section.format == "chat":
        column = section.fields.get("messages", "messages")
        rendered, special = [], tokenizer.special_tokens_map  # once: a property that builds a dict
        for i, row in enumerate(rows):
            try:
                messages = check_messages(_field(row, "messages", section, list), row.where, column)
                rendered.append((i, *chat_spans(tokenizer, messages, row.where, special)))
            except BadRowError as e:
                out[i] = e
        if getattr(tokenizer, "is_fast", False) and rendered:
            encoded = _ids_and_starts(tokenizer, [full for _, full, _ in rendered])
            for (i, _, spans), (ids, starts) in zip(rendered, encoded):
                out[i] = chat_example(ids, starts, spans, section.train_on_inputs)
        else:
            for i, full, spans in rendered:
                ids, starts = _tokenize_with_starts(tokenizer, full, [b for s in spans for b in s])
                out[i] = chat_example(ids, starts, spans, section.train_on_inputs)
        return out
    pairs = []
    for i, row in enumerate(rows):
        try:
            pairs.append((i, *_prompt_response(row, section)))
        except BadRowError as e:
            out[i] = e
    if not pairs:
        return out
    text = section.format == "text"
    responses = token_ids(tokenizer, [r for _, _, r in pairs], add_special_tokens=text)
    prompts = [None] * len(pairs) if text else token_ids(tokenizer, [p for _, p, _ in pairs], add_special_tokens=True)
    eos = tokenizer.eos_token_id  # once: a tokenizer attribute costs a lookup through transformers' __getattr__
    for (i, _, _), prompt_ids, response_ids in zip(pairs, prompts, responses):
        out[i] = _pair_example(prompt_ids, response_ids, section, eos)
    return out


def nothing_to_learn(row: Row, section: DataSection) -> str:
    """Why a row with no supervised token has none, where the row itself says: a chat row without an assistant
    message (a role named bot, gpt or Assistant); '' otherwise."""
    if section.format != "chat" or section.train_on_inputs:
        return ""
    roles = sorted({m["role"] for m in _field(row, "messages", section, list)})
    if "assistant" in roles:
        return ""
    return f": no message has role 'assistant' (roles: {', '.join(roles)}); only assistant turns are learned"


def tokenize_row(row: Row, section: DataSection, tokenizer) -> Example:
    """One row as token ids and labels; a malformed row raises BadRowError naming its place and field."""
    (example,) = tokenize_batch([row], section, tokenizer)
    if isinstance(example, BadRowError):
        raise example
    return example


# ----------------------------------------------------------------------------------------------------------
# Preference pairs


def tokenize_pair(row: Row, section: DataSection, tokenizer) -> Example:
    """A preference row as prompt + chosen (the Example) and prompt + rejected (its ``rejected``).

    The prompt is rendered once (with the chat template where there is one: a plain ``prompt`` becomes one user
    turn, ``messages`` are used as they are) and its tokens are shared by both answers. Each answer is what the
    template renders after the prompt's generation prompt, end-of-turn included; without a template it is the
    answer text and EOS. Only answer tokens are supervised.
    """
    return _pair_examples([_pair_texts(row, section, tokenizer)], tokenizer)[0]


def _pair_texts(row: Row, section: DataSection, tokenizer) -> tuple[str, list[str], bool]:
    """(prompt text, [chosen text, rejected text], whether the chat template rendered them) of a preference row."""
    template = bool(tokenizer.chat_template)
    row, column = _explicit_prompt(row, section)
    chat_prompt = row.data.get(section.fields.get("messages", "messages")) is not None
    if chat_prompt and not template:
        raise _no_template(row.where, f"its prompt as {column!r}")
    if chat_prompt:
        messages = check_messages(_field(row, "messages", section, list), row.where, column)
        if messages[-1]["role"] == "assistant":  # rendered, the answer would be a second assistant turn after it
            raise BadRowError(f"{row.where}: field {column!r} ends with an assistant turn; the prompt ends before the "
                              "answer: end it with the user's turn and give the answers as 'chosen' and 'rejected'")
    else:
        messages = [{"role": "user", "content": _field(row, "prompt", section)}]
    answers = [_answer(row, name, section, template) for name in ("chosen", "rejected")]
    if not template:
        return messages[0]["content"], answers, False
    prompt_text = render(tokenizer, messages, row.where, generation_prompt=True)
    return prompt_text, [_rendered_answer(tokenizer, messages, prompt_text, a, row.where) for a in answers], True


def _explicit_prompt(row: Row, section: DataSection) -> tuple[Row, str]:
    """A row in one of TRL's conversational forms as lorakit's, and the column a chat prompt is cited by: a
    ``prompt`` given as chat messages becomes ``messages``; with no prompt at all, chosen and rejected
    conversations that open with the same turns (TRL's implicit prompt, as its extract_prompt finds it) give those
    turns as ``messages`` and the rest as the answers. Other rows as they are."""
    names = {name: section.fields.get(name, name) for name in ("prompt", "messages", "chosen", "rejected")}
    data = row.data
    if data.get(names["messages"]) is not None:
        return row, names["messages"]
    if isinstance(data.get(names["prompt"]), list):
        return Row(row.where, {**data, names["messages"]: data[names["prompt"]]}), names["prompt"]
    chosen, rejected = data.get(names["chosen"]), data.get(names["rejected"])
    if data.get(names["prompt"]) is None and isinstance(chosen, str) and isinstance(rejected, str):
        raise BadRowError(f"{row.where}: missing field {names['prompt']!r} for data.format preference; "
                          f"{names['chosen']!r} and {names['rejected']!r} are texts (TRL's implicit prompt is taken "
                          "from conversations only: a shared beginning of two texts can split a word); give the "
                          f"prompt as {names['prompt']!r}, or map its column with data.fields")
    if data.get(names["prompt"]) is not None or not (isinstance(chosen, list) and isinstance(rejected, list)):
        return row, names["messages"]
    shared = 0  # the common opening, leaving each answer at least its last turn
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    # a prompt ends with a turn the answer follows: shared assistant turns at its end belong to both answers
    while shared and isinstance(chosen[shared - 1], dict) and chosen[shared - 1].get("role") == "assistant":
        shared -= 1
    if not shared and any(isinstance(m, dict) and m.get("role") != "assistant" for m in chosen + rejected):
        raise BadRowError(f"{row.where}: fields {names['chosen']!r} and {names['rejected']!r} hold conversations that "
                          "open differently, so they share no prompt (TRL's implicit prompt); give the prompt as "
                          f"{names['prompt']!r} or {names['messages']!r} and only the answers as "
                          f"{names['chosen']!r} and {names['rejected']!r}")
    if not shared:
        return row, names["messages"]
    opening = {**data, names["messages"]: chosen[:shared], names["chosen"]: chosen[shared:],
               names["rejected"]: rejected[shared:]}
    return Row(row.where, opening), names["chosen"]


def _pair_examples(texts: list[tuple[str, list[str], bool]], tokenizer) -> list[Example]:
    """The Examples of _pair_texts results, in two batched tokenizer calls (prompts; chosen and rejected answers).

    Rendered prompts carry the template's own special tokens; a plain prompt gets the tokenizer's (BOS), and a
    plain answer ends with EOS."""
    if not texts:
        return []
    template = texts[0][2]  # one tokenizer, one template for the whole batch
    prompts = token_ids(tokenizer, [prompt for prompt, _, _ in texts], add_special_tokens=not template)
    answers = token_ids(tokenizer, [a for _, pair, _ in texts for a in pair], add_special_tokens=False)
    eos = tokenizer.eos_token_id
    out = []
    for k, prompt_ids in enumerate(prompts):
        prompt_ids = list(prompt_ids)
        pair = [list(answers[2 * k]), list(answers[2 * k + 1])]
        if not template:
            pair = [_with_eos(ids, eos) for ids in pair]
        chosen, rejected = (Example(prompt_ids + ids, [IGNORE_INDEX] * len(prompt_ids) + ids, len(prompt_ids))
                            for ids in pair)
        chosen.rejected = rejected
        out.append(chosen)
    return out


def _no_template(where: str, what: str) -> UsageError:
    return UsageError(f"data.chat_template: {where} gives {what} (chat messages) and the tokenizer has no chat "
                      f"template; set data.chat_template to one of {', '.join(named_chat_templates())}")


def _answer(row: Row, name: str, section: DataSection, template: bool):
    """chosen/rejected: a string, or a list of assistant messages (rendered by the chat template)."""
    column = section.fields.get(name, name)
    value = row.data.get(column)
    if isinstance(value, list) and not template:  # as for messages: the recipe, not the row, lacks something
        raise _no_template(row.where, f"{column!r}")
    if isinstance(value, list):
        value = check_messages(value, row.where, column)
        if any(m["role"] != "assistant" for m in value):
            raise BadRowError(f"{row.where}: field {column!r} must hold assistant messages only (the answer); a "
                              "conversation holding its prompt too needs the turns before the answer moved to "
                              "'messages', or no 'prompt' and 'messages' (TRL's implicit prompt: chosen and rejected "
                              "open with the same turns)")
        return value
    return _field(row, name, section)


def _rendered_answer(tokenizer, messages: list[dict], prompt_text: str, answer, where: str) -> str:
    turns = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else answer
    full = render(tokenizer, messages + turns, where)
    if not full.startswith(prompt_text):
        raise TemplateUnfit(f"the template renders the prompt at {where} differently once an answer follows, so "
                            f"the answer cannot be located; choose one of {', '.join(named_chat_templates())} instead")
    return full[len(prompt_text):]


def num_targets(labels) -> int:
    """The one definition of supervised tokens: targets after the shift (position i learns labels[i + 1], so a
    first label is never a target) that are not IGNORE_INDEX. One example's labels, or a [batch, seq] tensor."""
    if hasattr(labels, "ndim"):
        return int((labels[..., 1:] != IGNORE_INDEX).sum())
    rest = labels[1:]
    return len(rest) - rest.count(IGNORE_INDEX)  # list.count: C speed, the same count


# ----------------------------------------------------------------------------------------------------------
# Answers (what `lorakit eval` and train.eval_generate score against)


def through_last_answer(row: Row, section: DataSection) -> Row | None:
    """A chat row cut after its last assistant turn (the turn evaluation asks for); other rows as they are. None
    for a chat row with no assistant turn: nothing to score or to compute a loss on (training leaves such a row
    out as unsupervised)."""
    if section.format != "chat":
        return row
    column = section.fields.get("messages", "messages")
    messages = _field(row, "messages", section, list)
    turns = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
    if not turns:
        return None
    return Row(row.where, {**row.data, column: messages[: turns[-1] + 1]})


def answer_of(row: Row, section: DataSection) -> str | None:
    """The response a row teaches: alpaca output, completion, the last assistant turn; None for text rows."""
    if section.format == "text":
        return None
    if section.format == "preference":
        chosen = _answer(_explicit_prompt(row, section)[0], "chosen", section, True)
        return chosen if isinstance(chosen, str) else chosen[-1]["content"]
    if section.format == "chat":
        column = section.fields.get("messages", "messages")
        return check_messages(_field(row, "messages", section, list), row.where, column)[-1]["content"]
    return _field(row, "output" if section.format == "alpaca" else "completion", section)
