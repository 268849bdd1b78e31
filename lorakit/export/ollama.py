"""`--ollama`: a Modelfile next to the GGUF: FROM it, the chat template as Ollama's Go template, a stop parameter
per stop token.

The Go template is derived by rendering the Jinja template with probe messages and cutting each role's turn
into the text before and after its content; it is kept only if rendering it reproduces the Jinja template on a
test conversation. Templates that move text between turns (a system prompt folded into the first user turn)
do not decompose that way: the Modelfile then has no TEMPLATE and Ollama uses the GGUF's own chat template.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from lorakit.errors import SafetyError
from lorakit.export.target import display_name
from lorakit.publish import publish_file_output

ROLES = ("system", "user", "assistant")
_P = {role: f"lorakit0{role}0probe" for role in ROLES + ("user2",)}


def modelfile_path(gguf_file: Path) -> Path:
    return gguf_file.with_name("Modelfile")


def check_modelfile(gguf_file: Path, overwrite: bool) -> None:
    path = modelfile_path(Path(gguf_file).expanduser().resolve())
    if path.exists() and not overwrite:
        raise SafetyError(f"{path} exists; pass --overwrite to replace it or write the GGUF elsewhere")


def _render(tokenizer, messages, generation: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _turns(tokenizer) -> dict[str, tuple[str, str]] | None:
    """{role: (before content, after content)} plus "" : (conversation start, generation prompt), or None."""
    m = {role: {"role": role if role != "user2" else "user", "content": p} for role, p in _P.items()}
    user = _render(tokenizer, [m["user"]])
    with_prompt = _render(tokenizer, [m["user"]], True)
    through = _render(tokenizer, [m["user"], m["assistant"]])
    second = _render(tokenizer, [m["user"], m["assistant"], m["user2"]])
    if not (with_prompt.startswith(user) and second.startswith(through)):
        return None
    generation = with_prompt[len(user):]
    turn = second[len(through):]
    u_before, _, u_after = turn.partition(_P["user2"])
    if not user.endswith(_P["user"] + u_after) or not user[: user.index(_P["user"])].endswith(u_before):
        return None
    start = user[: user.index(_P["user"]) - len(u_before)]
    answer = through[len(with_prompt):] if through.startswith(with_prompt) else None
    if answer is None or _P["assistant"] not in answer:
        return None
    a_before, _, a_after = answer.partition(_P["assistant"])
    turns = {"": (start, generation), "user": (u_before, u_after), "assistant": (generation + a_before, a_after)}
    try:
        system = _render(tokenizer, [m["system"], m["user"]])
    except Exception:  # a template that refuses system turns
        return turns
    tail = u_before + _P["user"] + u_after
    head = system[len(start):] if system.startswith(start) else ""
    s_before, sep, rest = head.partition(_P["system"])
    if sep and rest.endswith(tail):
        turns["system"] = (s_before, rest[: len(rest) - len(tail)])
        return turns
    # A template that writes a default system turn when the conversation has none (SmolLM2, Qwen2): the
    # conversation start is that default, replaced by the given system turn when there is one.
    s_before, sep, rest = system.partition(_P["system"])
    s_after = rest[: len(rest) - len(tail)] if rest.endswith(tail) else None
    if sep and s_after is not None and start.startswith(s_before) and start.endswith(s_after):
        turns[""] = ("", generation)
        turns["system"] = (s_before, s_after)
        turns["default"] = (start, "")
    return turns


def go_template(turns: dict[str, tuple[str, str]]) -> str:
    """An Ollama (Go text/template) chat template built from the turn pieces."""
    def lit(text: str) -> str:
        return text.replace("{{", '{{ "{{" }}')

    start, generation = lit(turns[""][0]), turns[""][1]
    if "default" in turns:
        start += f'{{{{ if ne (index .Messages 0).Role "system" }}}}{lit(turns["default"][0])}{{{{ end }}}}'
    parts = ["{{ range $i, $_ := .Messages }}", "{{ $last := eq (len (slice $.Messages $i)) 1 }}"]
    for k, role in enumerate(r for r in ROLES if r in turns):
        before, after = turns[role]
        keyword = "{{ if" if k == 0 else "{{ else if"
        if role == "assistant":  # the answer being generated continues after its opening, with no closing
            before = before[len(generation):] if before.startswith(generation) else before
            parts.append(f'{keyword} eq .Role "assistant" }}}}{lit(generation)}{lit(before)}{{{{ .Content }}}}'
                         f"{{{{ if not $last }}}}{lit(after)}{{{{ end }}}}")
        else:
            parts.append(f'{keyword} eq .Role "{role}" }}}}{lit(before)}{{{{ .Content }}}}{lit(after)}')
    parts += ["{{ end }}", f'{{{{ if and $last (ne .Role "assistant") }}}}{lit(generation)}{{{{ end }}}}',
              "{{ end }}"]
    return start + "".join(parts)


def emulate(turns: dict[str, tuple[str, str]], messages: list[dict]) -> str:
    """What go_template renders for ``messages`` (Ollama's rendering, here to check the translation)."""
    start, generation = turns[""]
    text = start
    if "default" in turns and messages[0]["role"] != "system":
        text += turns["default"][0]
    for i, message in enumerate(messages):
        before, after = turns[message["role"]]
        last = i == len(messages) - 1
        text += before + message["content"] + ("" if last and message["role"] == "assistant" else after)
        if last and message["role"] != "assistant":
            text += generation
    return text


def translate(tokenizer) -> str | None:
    """The Go template for the tokenizer's chat template, or None when it does not translate faithfully."""
    if not tokenizer.chat_template:
        return None
    try:
        turns = _turns(tokenizer)
    except Exception:  # a template that rejects the probe conversations
        return None
    if turns is None:
        return None
    roles = [r for r in ("system", "user", "assistant", "user") if r in turns]
    test = [{"role": r, "content": f"test {i}"} for i, r in enumerate(roles)]
    try:
        if emulate(turns, test) != _render(tokenizer, test, True):
            return None
    except Exception:
        return None
    return go_template(turns)


def write_modelfile(target, report, *, overwrite: bool) -> tuple[Path, str]:
    """Modelfile next to the GGUF; returns it and the `ollama create` command."""
    from transformers import AutoTokenizer

    from lorakit.console import console

    gguf_file = Path(report.output)
    path = modelfile_path(gguf_file)
    check_modelfile(gguf_file, overwrite)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    lines = [f"FROM ./{gguf_file.name}"]
    template = translate(tokenizer)
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        console(True)("Modelfile: the chat template does not translate to Ollama's template language; "
                      "Ollama will use the one in the GGUF")
    for i in report.stop_ids:
        lines.append(f"PARAMETER stop {json.dumps(tokenizer.convert_ids_to_tokens(i))}")
    tmp = path.with_name(f".{path.name}.lorakit-tmp")
    tmp.write_text("\n".join(lines) + "\n")
    publish_file_output(tmp, path)  # an old Modelfile (--overwrite) is moved aside, not replaced
    name = display_name(target).lower().replace("_", "-")
    return path, f"ollama create {shlex.quote(name)} -f {shlex.quote(str(path))}"
