"""Every assistant turn of a conversation from ONE rendering, for a chat template lorakit does not ship (the model's
own, a .jinja file): linear in the turns where rendering once per turn is quadratic.

By definition (lorakit.data.chat.chat_spans) assistant turn i spans from the end of the conversation before it,
rendered with the generation prompt, to the end of the conversation through it. A template whose output for a
message depends only on that message and the ones before it gives these from one rendering: the turn ends where the
loop's next iteration starts, and starts where its own iteration starts plus the generation prompt. Whether a
template is such a one is decided on its syntax tree, never guessed from sample rows:

- one ``{% for message in messages %}`` at the top level (no filter, not recursive, no else);
- the conversation read only through that loop and ``messages[0]`` (not ``messages | length``, ``messages[-1]``,
  ``messages[i + 1]``);
- the loop's ``loop`` read only for what lies behind (``index``, ``index0``, ``first``, ``previtem``, ``changed``,
  ``cycle``), never ``last``, ``length``, ``revindex`` or ``nextitem``;
- after the loop only ``{% if add_generation_prompt %}`` writing constant text or special tokens, and
  ``add_generation_prompt`` read nowhere else.

Such a template gets an empty ``{% generation %}{% endgeneration %}`` at the start of the loop body and of the
generation prompt block (inserted beside their own tags; the parse of the result must equal the template's parse
with just those two nodes added, and an empty block writes nothing), so transformers' generation indices give the
offset where every iteration and the generation prompt begin. A conversation whose assistant iteration does not
begin with the generation prompt is left to the per-turn definition, as is any template outside these rules.
"""

from __future__ import annotations

import functools
import re

LOOKBEHIND_LOOP = {"index", "index0", "first", "previtem", "changed", "cycle", "depth", "depth0"}
CONSTANT_NAMES = {"bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"}
_TAG = re.compile(r"\{#.*?#\}|\{%([-+]?)\s*(\w+)(.*?)([-+]?)%\}", re.DOTALL)
_MESSAGE_LOOP = re.compile(r"\s+\w+\s+in\s+messages\s*")


@functools.lru_cache(maxsize=16)
def tracked_template(template: str) -> str | None:
    """``template`` with an empty {% generation %} block opening its message loop's body and its generation prompt,
    when one rendering of it locates every assistant turn exactly (the module's rules); None otherwise."""
    try:
        from jinja2 import nodes
        from transformers.utils.chat_template_utils import _compile_jinja_template

        env = _compile_jinja_template(template).environment  # transformers' own (trim_blocks, lstrip_blocks)
        tree = env.parse(template)
        loop = _message_loop(tree, nodes)
        if loop is None:
            return None
        prompt = _prompt_block(tree, loop, nodes)
        if prompt is False or not _reads_only_the_past(tree, loop, prompt, nodes):
            return None
        tagged = _with_generation_tags(template, prompt is not None)
        if tagged is None or not _same_but_marked(env.parse(tagged), tree, prompt is not None, nodes):
            return None
        _compile_jinja_template(tagged)
        return tagged
    except Exception:  # anything the rules do not cover: the per-turn definition
        return None


def tracked_turns(tagged: str, messages: list[dict], render) -> tuple[str, list[tuple[int, int]]] | None:
    """(the rendered conversation, each assistant turn's span) from one rendering of ``tagged``; None when an
    assistant iteration does not begin with the generation prompt (the per-turn definition decides).

    ``render(template)`` renders the conversation with the generation prompt and returns (text, generation
    indices): where each message's iteration begins, then where the generation prompt does (if the template has
    one; it runs to the end of the text)."""
    text, indices = render(tagged)
    starts = [start for start, _ in indices]
    if len(starts) == len(messages) + 1:
        prompt, text = text[starts[-1]:], text[: starts[-1]]
    elif len(starts) == len(messages):
        prompt, starts = "", starts + [len(text)]
    else:
        return None
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:  # nothing before the first message: the turn starts at 0
            spans.append((0, starts[1]))
        elif text.startswith(prompt, starts[i], starts[i + 1]):
            spans.append((starts[i] + len(prompt), starts[i + 1]))
        else:
            return None
    return text, spans


def _message_loop(tree, nodes):
    loop = next((n for n in tree.body if isinstance(n, nodes.For) and _is_message_loop(n, nodes)), None)
    if loop is None or sum(_is_message_loop(n, nodes) for n in tree.find_all(nodes.For)) != 1:
        return None
    if loop.test is not None or loop.recursive or loop.else_ or not isinstance(loop.target, nodes.Name):
        return None
    return loop


def _is_message_loop(node, nodes) -> bool:
    return isinstance(node.iter, nodes.Name) and node.iter.name == "messages"


def _prompt_block(tree, loop, nodes):
    """The {% if add_generation_prompt %} after the loop (None: none), or False when anything else follows it."""
    after = tree.body[tree.body.index(loop) + 1 :]
    blocks = [n for n in after if isinstance(n, nodes.If)]
    if len(after) != len(blocks) or len(blocks) > 1:
        return False
    if not blocks:
        return None
    block = blocks[0]
    if not (isinstance(block.test, nodes.Name) and block.test.name == "add_generation_prompt") or block.elif_ \
            or block.else_:
        return False
    if not all(isinstance(n, nodes.Output) and all(_constant(e, nodes) for e in n.nodes) for n in block.body):
        return False
    return block


def _constant(expr, nodes) -> bool:
    """Text that is the same in every rendering: literals, special tokens, and sums of them."""
    if isinstance(expr, (nodes.TemplateData, nodes.Const)):
        return True
    if isinstance(expr, nodes.Name):
        return expr.name in CONSTANT_NAMES
    if isinstance(expr, (nodes.Add, nodes.Concat)):
        parts = [expr.left, expr.right] if isinstance(expr, nodes.Add) else expr.nodes
        return all(_constant(p, nodes) for p in parts)
    return False


def _reads_only_the_past(tree, loop, prompt, nodes) -> bool:
    """The conversation is read through the loop and messages[0] only; the loop's ``loop`` only for what lies
    behind; add_generation_prompt only by the prompt block."""
    first = {id(g.node) for g in tree.find_all(nodes.Getitem)
             if isinstance(g.node, nodes.Name) and isinstance(g.arg, nodes.Const) and g.arg.value == 0}
    for name in tree.find_all(nodes.Name):
        if name.name == "messages" and name is not loop.iter and id(name) not in first:
            return False
        if name.name == "add_generation_prompt" and (prompt is None or name is not prompt.test):
            return False
    used: set = set()
    for child in loop.body:
        _loop_reads(child, True, used, nodes)
    return used <= LOOKBEHIND_LOOP


def _loop_reads(node, ours: bool, used: set, nodes) -> None:
    """The attributes of ``loop`` read where it is the message loop's (``ours``); None for ``loop`` itself."""
    if isinstance(node, nodes.Getattr) and isinstance(node.node, nodes.Name) and node.node.name == "loop":
        if ours:
            used.add(node.attr)
        return
    if isinstance(node, nodes.Name) and node.name == "loop" and ours:
        used.add(None)
        return
    for field, value in node.iter_fields():
        inner = ours and not (isinstance(node, nodes.For) and field in ("body", "else_"))  # a nested loop's own
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, nodes.Node):
                _loop_reads(child, inner, used, nodes)


def _with_generation_tags(template: str, prompt: bool) -> str | None:
    """The source with an empty generation block just after the message loop's tag (and the generation prompt
    block's), taking that tag's whitespace control for what follows."""
    if re.search(r"\{%[-+]?\s*(?:end)?generation\b|\{%[-+]?\s*raw\b", template):
        return None
    tags = [m for m in _TAG.finditer(template) if m.group(2)]
    loop = next((m for m in tags if m.group(2) == "for" and _MESSAGE_LOOP.fullmatch(m.group(3))), None)
    if loop is None:
        return None
    marks = [loop]
    if prompt:
        block = next((m for m in tags if m.start() > loop.start() and m.group(2) == "if"
                      and m.group(3).strip() == "add_generation_prompt"), None)
        if block is None:
            return None
        marks.append(block)
    out, at = [], 0
    for tag in marks:
        out += [template[at : tag.end()], "{% generation %}{% endgeneration " + tag.group(4) + "%}"]
        at = tag.end()
    return "".join(out + [template[at:]])


def _same_but_marked(tagged, tree, prompt: bool, nodes) -> bool:
    """``tagged`` (a fresh parse, changed here) parses as ``tree`` with one empty generation block opening the loop
    body (and the prompt block's), nothing else changed: it renders the same text."""
    loop = next(n for n in tagged.body if isinstance(n, nodes.For) and _is_message_loop(n, nodes))
    blocks = [loop]
    if prompt:
        blocks.append(tagged.body[tagged.body.index(loop) + 1])
    for block in blocks:
        mark = block.body[0] if block.body else None
        if not isinstance(mark, nodes.CallBlock) or mark.body:
            return False
        block.body = block.body[1:]
    return tagged == tree
