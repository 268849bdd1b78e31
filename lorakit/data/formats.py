"""Row formats (alpaca, chat, text, completion, preference) rendered to token ids with labels.

Labels are -100 wherever the loss must not look: prompt tokens (unless data.train_on_inputs) and padding.
The end of every response (EOS, or the chat template's end-of-turn) is supervised.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from lorakit import text
from lorakit.config.schema import DataSection
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

# Fields each format reads; data.fields maps them to the dataset's column names.
FORMAT_FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages",),
    "text": ("text",),
    "completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),  # or messages (a chat prompt) in place of prompt
}
OPTIONAL_FIELDS = {"input"}
TEMPLATE_DIR = Path(__file__).with_name("chat_templates")


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
    def sequences(self) -> list["Example"]:
        return [self] if self.rejected is None else [self, self.rejected]


# ----------------------------------------------------------------------------------------------------------
# Chat templates


def named_chat_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))


def resolve_chat_template(section: DataSection, tokenizer) -> str | None:
    """The template text the chat format renders with (None for other formats).

    A template named by the recipe replaces the tokenizer's own and is set on the tokenizer, so the
    tokenizer saved with the adapter formats prompts at inference exactly as in training.
    """
    if section.format not in ("chat", "preference"):
        return None
    name = section.chat_template
    if name is None:
        template = tokenizer.chat_template
        if isinstance(template, dict):  # several named templates: the default one renders conversations
            template = template.get("default")
        if not template and section.format == "preference":
            return None  # plain-text prompts: prompt + answer + EOS, as completion rows (messages are refused)
        if not template:
            raise UsageError(
                f"data.chat_template: the tokenizer ({tokenizer.name_or_path}) has no chat template; set "
                f"data.chat_template to one of {', '.join(named_chat_templates())} or a .jinja file"
            )
        return _checked(template, f"the tokenizer's chat template ({tokenizer.name_or_path})")
    path = TEMPLATE_DIR / f"{name}.jinja"
    if name.endswith(".jinja"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise UsageError(f"data.chat_template: template file {name!r} not found")
    elif not path.is_file():
        close = difflib.get_close_matches(name, named_chat_templates(), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UsageError(
            f"data.chat_template: unknown template {name!r}{hint}; choose one of "
            f"{', '.join(named_chat_templates())} or give a .jinja file"
        )
    try:
        template = text.decode(path.read_bytes(), f"data.chat_template: {path}")
    except text.NotText as e:
        raise UsageError(str(e)) from None
    tokenizer.chat_template = _checked(template, f"data.chat_template: {path}")
    return tokenizer.chat_template


def _checked(template: str, source: str) -> str:
    """``template`` once Jinja has parsed it: a syntax error is the template's fault, not a data row's."""
    from jinja2 import Environment
    from jinja2.exceptions import TemplateSyntaxError

    try:
        Environment().parse(template)
    except TemplateSyntaxError as e:
        raise UsageError(f"{source}: Jinja syntax error on line {e.lineno} of the template ({e.message}); fix the "
                         "template or choose one of " + ", ".join(named_chat_templates())) from None
    return template


def _render(tokenizer, messages: list[dict], where: str, generation_prompt: bool = False) -> str:
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as e:  # raise_exception() in a template: this conversation does not fit it
        raise BadRowError(f"{where}: the chat template rejects this conversation ({e})") from None


def _check_messages(messages, where: str, column: str) -> None:
    if not messages:
        raise BadRowError(f"{where}: field {column!r} is an empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRowError(
                f"{where}: field {column!r}[{i}] must be an object with string 'role' and 'content', got {m!r:.60}"
            )


def tokenize_chat(tokenizer, messages: list[dict], train_on_inputs: bool, where: str, column: str = "messages"):
    """Render with the chat template; supervise every assistant turn, its end-of-turn marker included.

    An assistant turn is the text between the rendering of the conversation before it (with the generation
    prompt) and the rendering up to and including it. This holds for any template that renders the
    beginning of a conversation as a prefix of the whole (ChatML, Llama 3, Mistral, Zephyr, ...).
    Tokens are assigned to turns by their character offsets, so BPE merges across turns do not matter.
    """
    _check_messages(messages, where, column)
    full = _render(tokenizer, messages, where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], where, generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], where)
        if not (full.startswith(through) and through.startswith(before)):
            raise UsageError(
                f"data.chat_template: the template renders the start of the conversation at {where} differently "
                "from the whole conversation, so assistant turns cannot be located; choose one of "
                f"{', '.join(named_chat_templates())} with data.chat_template"
            )
        spans.append((len(before), len(through)))
    ids, starts = _tokenize_with_starts(tokenizer, full, [b for s in spans for b in s])
    labels = list(ids) if train_on_inputs else [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        for k, char in enumerate(starts):
            if start <= char < end:
                labels[k] = ids[k]
    prompt_len = next((k for k, char in enumerate(starts) if spans and char >= spans[0][0]), len(ids))
    return Example(ids, labels, prompt_len)


def _tokenize_with_starts(tokenizer, text: str, boundaries: list[int]) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and the character each token starts at (turn boundaries, without offsets)."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [start for start, _ in enc["offset_mapping"]]
    # A tokenizer without offsets: a token starts at the last boundary whose prefix it follows.
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


def _ids(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _with_eos(ids: list[int], tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def tokenize_row(row: Row, section: DataSection, tokenizer) -> Example:
    """One row as token ids and labels; a malformed row raises BadRowError naming its place and field."""
    fmt = section.format
    if fmt == "preference":
        return tokenize_pair(row, section, tokenizer)
    if fmt == "chat":
        column = section.fields.get("messages", "messages")
        messages = _field(row, "messages", section, list)
        return tokenize_chat(tokenizer, messages, section.train_on_inputs, row.where, column)
    if fmt == "text":
        ids = _with_eos(_ids(tokenizer, _field(row, "text", section), True), tokenizer)
        return Example(ids, list(ids), 0)
    if fmt == "alpaca":
        instruction, inp = _field(row, "instruction", section), _field(row, "input", section)
        template = ALPACA_PROMPT_WITH_INPUT if inp.strip() else ALPACA_PROMPT
        prompt = template.format(instruction=instruction, input=inp)
        response = _field(row, "output", section)
    else:  # completion
        prompt, response = _field(row, "prompt", section), _field(row, "completion", section)
    prompt_ids = _ids(tokenizer, prompt, True)
    response_ids = _with_eos(_ids(tokenizer, response, False), tokenizer)
    prompt_labels = list(prompt_ids) if section.train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)
    return Example(prompt_ids + response_ids, prompt_labels + response_ids, len(prompt_ids))


# ----------------------------------------------------------------------------------------------------------
# Preference pairs


def tokenize_pair(row: Row, section: DataSection, tokenizer) -> Example:
    """A preference row as prompt + chosen (the Example) and prompt + rejected (its ``rejected``).

    The prompt is rendered once (with the chat template where there is one: a plain ``prompt`` becomes one user
    turn, ``messages`` are used as they are) and its tokens are shared by both answers. Each answer is what the
    template renders after the prompt's generation prompt, end-of-turn included; without a template it is the
    answer text and EOS. Only answer tokens are supervised.
    """
    column = section.fields.get("messages", "messages")
    chat_prompt = row.data.get(column) is not None
    template = bool(tokenizer.chat_template)
    if chat_prompt and not template:
        raise UsageError(f"data.chat_template: {row.where} gives its prompt as {column!r} (chat messages) and the "
                         f"tokenizer has no chat template; set data.chat_template to one of "
                         f"{', '.join(named_chat_templates())}")
    if chat_prompt:
        messages = _field(row, "messages", section, list)
        _check_messages(messages, row.where, column)
    else:
        messages = [{"role": "user", "content": _field(row, "prompt", section)}]
    answers = [_answer(row, name, section, template) for name in ("chosen", "rejected")]
    if template:
        prompt_text = _render(tokenizer, messages, row.where, generation_prompt=True)
        prompt_ids = _ids(tokenizer, prompt_text, False)
        answer_ids = [_ids(tokenizer, _rendered_answer(tokenizer, messages, prompt_text, a, row.where), False)
                      for a in answers]
    else:
        prompt_ids = _ids(tokenizer, messages[0]["content"], True)
        answer_ids = [_with_eos(_ids(tokenizer, a, False), tokenizer) for a in answers]
    chosen, rejected = (Example(prompt_ids + ids, [IGNORE_INDEX] * len(prompt_ids) + ids, len(prompt_ids))
                        for ids in answer_ids)
    chosen.rejected = rejected
    return chosen


def _answer(row: Row, name: str, section: DataSection, template: bool):
    """chosen/rejected: a string, or a list of assistant messages (rendered by the chat template)."""
    value = row.data.get(section.fields.get(name, name))
    if isinstance(value, list) and template:
        column = section.fields.get(name, name)
        _check_messages(value, row.where, column)
        if any(m["role"] != "assistant" for m in value):
            raise BadRowError(f"{row.where}: field {column!r} must hold assistant messages only (the answer)")
        return value
    return _field(row, name, section)


def _rendered_answer(tokenizer, messages: list[dict], prompt_text: str, answer, where: str) -> str:
    turns = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else answer
    full = _render(tokenizer, messages + turns, where)
    if not full.startswith(prompt_text):
        raise UsageError(
            f"data.chat_template: the template renders the prompt at {where} differently once an answer follows, so "
            f"the answer cannot be located; choose one of {', '.join(named_chat_templates())} with data.chat_template"
        )
    return full[len(prompt_text):]


def num_targets(labels) -> int:
    """The one definition of supervised tokens: targets after the shift (position i learns labels[i + 1], so a
    first label is never a target) that are not IGNORE_INDEX. One example's labels, or a [batch, seq] tensor."""
    if hasattr(labels, "ndim"):
        return int((labels[..., 1:] != IGNORE_INDEX).sum())
    return sum(label != IGNORE_INDEX for label in labels[1:])


# ----------------------------------------------------------------------------------------------------------
# Answers (what `lorakit eval` and train.eval_generate score against)


def through_last_answer(row: Row, section: DataSection) -> Row:
    """A chat row cut after its last assistant turn (the turn evaluation asks for); other rows as they are."""
    if section.format != "chat":
        return row
    column = section.fields.get("messages", "messages")
    messages = _field(row, "messages", section, list)
    turns = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
    last = turns[-1] if turns else None
    if last is None:
        raise BadRowError(f"{row.where}: field {column!r} has no assistant turn to score against")
    return Row(row.where, {**row.data, column: messages[: last + 1]})


def answer_of(row: Row, section: DataSection) -> str | None:
    """The response a row teaches: alpaca output, completion, the last assistant turn; None for text rows."""
    if section.format == "text":
        return None
    if section.format == "preference":
        chosen = _answer(row, "chosen", section, True)
        return chosen if isinstance(chosen, str) else chosen[-1]["content"]
    if section.format == "chat":
        return _field(row, "messages", section, list)[-1]["content"]
    return _field(row, "output" if section.format == "alpaca" else "completion", section)
