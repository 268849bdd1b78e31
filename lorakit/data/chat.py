"""Chat templates: which template a chat or preference source renders with, and where each assistant turn lies in
the rendered text (one rendering for lorakit's bundled templates, one per assistant turn for any other).

lorakit.data.formats turns the text and its turn spans into token ids and labels.
"""

from __future__ import annotations

import difflib
import functools
import re
from contextlib import contextmanager
from pathlib import Path

from lorakit import text
from lorakit.data import turns
from lorakit.config.schema import CHAT_FORMATS, DataSection
from lorakit.data.sources import BadRowError, as_json
from lorakit.errors import UsageError

TEMPLATE_DIR = Path(__file__).with_name("chat_templates")
# transformers' {% generation %} blocks: lorakit's own templates mark each assistant turn with them, so one rendering
# locates every turn (render_jinja_template's generation indices). They are removed from the template stored on the
# tokenizer, which renders the same text without them.
GENERATION_TAG = re.compile(r"\{%\s*(?:end)?generation\s*%\}")


class TemplateUnfit(UsageError):
    """A row the chat template cannot render as lorakit defines turns (exit 2). The recipe key that chose the template
    (data.chat_template, or a source's data.train[I].chat_template) is set by whoever knows which it was."""

    def __init__(self, reason: str, key: str = "data.chat_template"):
        self.reason, self.key = reason, key
        super().__init__(f"{key}: {reason}")

    def __reduce__(self):  # back from a tokenizing process with its parts
        return type(self), (self.reason, self.key)


def named_chat_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))


def bundled_template(name: str) -> str:
    """A template shipped with lorakit as a tokenizer holds it: without its {% generation %} tags."""
    return GENERATION_TAG.sub("", (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8"))


def resolve_chat_template(section: DataSection, tokenizer) -> str | None:
    """The template text the chat format renders with (None for other formats). A template named by the recipe
    replaces the tokenizer's own and is set on it, so the tokenizer saved with the adapter formats prompts at
    inference exactly as in training."""
    template = chat_template_text(section.format, section.chat_template, tokenizer)
    if section.chat_template is not None and template is not None:
        tokenizer.chat_template = template
    return template


def chat_template_text(fmt: str, name: str | None, tokenizer, key: str = "data.chat_template") -> str | None:
    """The template text rows of format ``fmt`` render with: the template ``name`` (a bundled name or a .jinja
    file, which the recipe sets as ``key``), else the tokenizer's own. None for a format that renders no chat
    template, or preference rows when the tokenizer has none. Reads the tokenizer, never changes it."""
    if fmt not in CHAT_FORMATS:
        return None
    if name is not None:
        return load_template(name, key)
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default one renders conversations
        template = template.get("default")
    if not template and fmt == "preference":
        return None  # plain-text prompts: prompt + answer + EOS, as completion rows (messages are refused)
    if not template:
        raise UsageError(
            f"data.chat_template: the tokenizer ({tokenizer.name_or_path}) has no chat template; set "
            f"data.chat_template to one of {', '.join(named_chat_templates())} or a .jinja file"
        )
    return _checked(template, f"the tokenizer's chat template ({tokenizer.name_or_path})")


def load_template(name: str, key: str) -> str:
    """The text of template ``name`` (bundled, as the tokenizer holds it, or a .jinja file), parsed by Jinja; a
    mistake is exit 2 naming the recipe ``key``."""
    path = TEMPLATE_DIR / f"{name}.jinja"
    if name.endswith(".jinja"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise UsageError(f"{key}: template file {name!r} not found")
    elif not path.is_file():
        close = difflib.get_close_matches(name, named_chat_templates(), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UsageError(f"{key}: unknown template {name!r}{hint}; choose one of "
                         f"{', '.join(named_chat_templates())} or give a .jinja file")
    try:
        template = text.decode(path.read_bytes(), f"{key}: {path}")
    except text.NotText as e:
        raise UsageError(str(e)) from None
    if path.parent == TEMPLATE_DIR:
        template = bundled_template(name)
    return _checked(template, f"{key}: {path}")


@contextmanager
def rendering_with(tokenizer, template: str | None, key: str = "data.chat_template"):
    """``tokenizer`` renders conversations with ``template`` inside the block (None: with its own), and holds its
    own template again after it: a data.train source with its own chat template borrows the shared tokenizer.
    Setting the attribute (rather than passing chat_template= to each call) keeps chat_spans' one-rendering path,
    which recognizes a bundled template by the tokenizer's text. A row the template cannot split is reported
    under ``key``, the recipe key that chose the template."""
    before = tokenizer.chat_template
    tokenizer.chat_template = before if template is None else template
    try:
        yield tokenizer
    except TemplateUnfit as e:
        if e.key == key:
            raise
        raise TemplateUnfit(e.reason, key) from None
    finally:
        tokenizer.chat_template = before


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


@contextmanager
def _rejected_rows(where: str):
    """A template's raise_exception() (this conversation does not fit it) as the row's BadRowError."""
    from jinja2.exceptions import TemplateError

    try:
        yield
    except TemplateError as e:
        raise BadRowError(f"{where}: the chat template rejects this conversation ({e})") from None


def render(tokenizer, messages: list[dict], where: str, generation_prompt: bool = False) -> str:
    with _rejected_rows(where):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def check_messages(messages, where: str, column: str) -> list[dict]:
    """The messages as the chat template renders them; BadRowError naming the message and what is wrong with it.

    A content given as a list of text parts, as OpenAI's API writes it ([{"type": "text", "text": ...}]), is their
    text joined with newlines: what vLLM hands a template that takes string content, so a prompt served that way
    renders as it did in training (templates written for strings would print the list itself)."""
    if not messages:
        raise BadRowError(f"{where}: field {column!r} is an empty list")
    out = []
    for i, m in enumerate(messages):
        at = f"field {column!r}[{i}]"
        if not isinstance(m, dict):
            raise BadRowError(f"{where}: {at} must be an object with string 'role' and 'content', got {m!r:.60}")
        if not isinstance(m.get("role"), str):
            raise BadRowError(f"{where}: {at} has no string 'role' (got {m.get('role')!r:.30}); give each message a "
                              "role such as user or assistant")
        content = m.get("content")
        if isinstance(content, list):
            content = _text_parts(content, f"{where}: {at}")
        if not isinstance(content, str):
            got = "no 'content'" if "content" not in m else f"'content': {as_json(m['content'])}"
            raise BadRowError(f"{where}: {at} ({m['role']}) has {got}; give its text as a string (tool calls and "
                              "messages without text are not trained on)")
        out.append(m if content is m["content"] else {**m, "content": content})
    return out


def _text_parts(parts: list, at: str) -> str:
    """OpenAI-style content parts as one text; BadRowError for a part that is not text (images, audio)."""
    texts = []
    for j, part in enumerate(parts):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise BadRowError(f"{at} content part {j} is {as_json(part)}, not a text part; lorakit trains on text: give "
                              "{\"type\": \"text\", \"text\": ...} parts or a string")
        texts.append(part["text"])
    return "\n".join(texts)


def _normalized(messages: list[dict]) -> list[dict]:
    """The messages as apply_chat_template hands them to the template: keys holding None dropped (JSON nulls)."""
    return [{key: value for key, value in m.items() if value is not None} for m in messages]


@functools.lru_cache(maxsize=None)
def _tracked_templates() -> dict[str, str]:
    """{a bundled template as the tokenizer holds it: the same template with its {% generation %} blocks}."""
    out = {}
    for path in TEMPLATE_DIR.glob("*.jinja"):
        tagged = path.read_text(encoding="utf-8")
        if GENERATION_TAG.search(tagged):
            out[GENERATION_TAG.sub("", tagged)] = tagged
    return out


def _rendered_with_indices(template: str, messages: list[dict], where: str, special: dict,
                           generation_prompt: bool = False):
    """(text, generation indices) of the conversation rendered once, the messages and special tokens as
    apply_chat_template passes them; a template's raise_exception() is the row's BadRowError."""
    from transformers.utils.chat_template_utils import render_jinja_template

    with _rejected_rows(where):
        rendered, indices = render_jinja_template(conversations=[_normalized(messages)], chat_template=template,
                                                  add_generation_prompt=generation_prompt,
                                                  return_assistant_tokens_mask=True, **special)
    return rendered[0], [tuple(span) for span in indices[0]]


def _tracked_spans(tagged: str, messages: list[dict], where: str, special: dict):
    """(full text, assistant spans) from ONE rendering: the character range of each {% generation %} block."""
    text, spans = _rendered_with_indices(tagged, messages, where, special)
    if spans and messages[0]["role"] == "assistant":  # a first assistant turn starts at 0, as per-turn rendering has it
        spans[0] = (0, spans[0][1])
    return text, spans


def chat_spans(tokenizer, messages: list[dict], where: str,
               special: dict | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn, its end-of-turn marker included.

    An assistant turn is the text between the rendering of the conversation before it (with the generation
    prompt) and the rendering up to and including it. This holds for any template that renders the
    beginning of a conversation as a prefix of the whole (ChatML, Llama 3, Mistral, Zephyr, ...). lorakit's
    own templates mark their turns with {% generation %}, so one rendering finds them (the same spans:
    tests/data/test_store.py); so does any template whose output for a message depends only on the messages up to
    it (lorakit.data.turns decides that on the template's syntax); any other is rendered once more per assistant
    turn.
    """
    special = tokenizer.special_tokens_map if special is None else special
    tagged = _tracked_templates().get(tokenizer.chat_template) if isinstance(tokenizer.chat_template, str) else None
    if tagged is not None:
        return _tracked_spans(tagged, messages, where, special)
    template = tokenizer.get_chat_template()
    marked = turns.tracked_template(template)
    if marked is not None:
        found = turns.tracked_turns(marked, messages,
                                   lambda t: _rendered_with_indices(t, messages, where, special, True))
        if found is not None:
            return found
    return _per_turn_spans(template, messages, where, special)


def _per_turn_spans(template: str, messages: list[dict], where: str,
                    special: dict) -> tuple[str, list[tuple[int, int]]]:
    """chat_spans by definition: the conversation rendered once more before and through each assistant turn.

    The renderings are those of apply_chat_template, made in two calls (transformers renders a list of
    conversations at once): the conversation and each prefix through an assistant turn, then each prefix before
    one with the generation prompt."""
    from transformers.utils.chat_template_utils import render_jinja_template

    chat = _normalized(messages)
    turns = [i for i, message in enumerate(chat) if message["role"] == "assistant"]
    with _rejected_rows(where):
        (full, *throughs), _ = render_jinja_template(conversations=[chat] + [chat[: i + 1] for i in turns],
                                                     chat_template=template, **special)
        befores, _ = render_jinja_template(conversations=[chat[:i] for i in turns if i], chat_template=template,
                                           add_generation_prompt=True, **special)
    befores = iter(befores)
    spans = []
    for i, through in zip(turns, throughs):
        before = next(befores) if i else ""
        if not (full.startswith(through) and through.startswith(before)):
            raise TemplateUnfit(
                f"the template renders the start of the conversation at {where} differently from the whole "
                "conversation, so assistant turns cannot be located; choose one of "
                f"{', '.join(named_chat_templates())} instead"
            )
        spans.append((len(before), len(through)))
    return full, spans
