"""Every `lorakit ...` command line the docs and the recipes' opening comments show matches today's CLI: its
command exists, each flag is one of that command's options, each --set names a recipe key, no argument is one
too many. Checked on click's command tree; nothing runs, no model loads."""

import re
import shlex
from pathlib import Path

import pytest
import typer.main

from lorakit.cli.main import app
from lorakit.config.load import _field_names
from lorakit.config.methods import METHODS
from lorakit.config.schema import Recipe
from lorakit.config.schema_base import _did_you_mean

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
PLACEHOLDER = re.compile(r"[A-Z][A-Z_]*")  # --set KEY=VALUE, --set '~KEY'


def _joined(lines: list[str]):
    """(line number, text) of a block's lines, backslash continuations joined onto their first line."""
    pending, start = "", 0
    for number, line in lines:
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""
    if pending:
        yield start, pending


def _command_lines():
    """(page:line, text, inline) of each lorakit command line: shell blocks' lines ($ prompts in any block), and
    inline code spans that start with `lorakit ` (a span may wrap onto the next line)."""
    for page in PAGES:
        name, fence, block, prose = page.relative_to(ROOT), None, [], []
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if line.startswith("```"):
                if fence is None:
                    fence, block = line[3:].strip(), []
                    prose.append("")
                    continue
                for start, text in _joined(block):
                    if fence in SHELL_BLOCKS or text.lstrip().startswith("$ "):
                        yield f"{name}:{start}", text.lstrip().removeprefix("$ "), False
                fence = None
            elif fence is not None:
                block.append((number, line))
            prose.append(line if fence is None and not line.startswith("```") else "")
        text = "\n".join(prose)
        for span in re.finditer(r"`(lorakit [^`]*)`", text):
            yield f"{name}:{text[: span.start()].count(chr(10)) + 1}", " ".join(span.group(1).split()), True


def _recipe_header_lines():
    """(recipe:line, text, inline) of the commands shipped recipes open with (`#   lorakit train recipes/...`)."""
    for recipe in sorted((ROOT / "recipes").rglob("*.yaml")):
        for number, line in enumerate(recipe.read_text().splitlines(), 1):
            if line.startswith("#"):
                yield f"{recipe.relative_to(ROOT)}:{number}", line.lstrip("# "), False


def _lorakit_words(text: str, inline: bool) -> list[str] | None:
    """The words after `lorakit` in one shell command line (its comment, pipes and redirections left out), or None
    where the line runs no lorakit command (make, python, ...). An inline span's usage syntax ([--x], a | b, ...)
    is read as the options it names."""
    if inline:
        text = re.sub(r"[\[\]()|]", " ", text)
    try:
        words = shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote: the line is not shell
        words = text.split()
    for i, word in enumerate(words):
        if word in ("|", "||", "&&", ";") or word.startswith((">", "<", "2>")):
            words = words[:i]
            break
    while words and re.fullmatch(r"\w+=\S*", words[0]):  # VAR=value lorakit train ...
        words = words[1:]
    if words[:1] == ["lorakit"]:
        return words[1:]
    if "-m" in words and words[words.index("-m") + 1:][:1] == ["lorakit"]:  # torchrun/accelerate ... -m lorakit
        return words[words.index("-m") + 2:]
    return None


def _recipe_key_problem(key: str) -> str | None:
    """Why KEY is no recipe key a --set may name, or None. Adapter keys may be any method's PEFT option."""
    parts = key.removeprefix("~").split(".")
    if PLACEHOLDER.fullmatch(key.removeprefix("~")):
        return None
    section = Recipe.model_fields.get(parts[0])
    if section is None or len(parts) < 2:
        return f"{parts[0]}: no recipe section{_did_you_mean(parts[0], Recipe.model_fields)}"
    fields = section.annotation.model_fields
    if parts[1] in fields:
        deeper = len(parts) > 2 and "dict" not in str(fields[parts[1]].annotation)
        return f"{key}: {parts[0]}.{parts[1]} has no keys under it" if deeper else None
    options = set(fields) | ({k for m in METHODS for k in _field_names(m)} if parts[0] == "adapter" else set())
    return None if parts[1] in options else f"{key}: no recipe key{_did_you_mean(parts[1], options)}"


def _problems(words: list[str]) -> list[str]:
    """What in a lorakit command line (the words after `lorakit`) today's CLI would refuse."""
    command = typer.main.get_group(app)
    problems, positionals = [], []
    words = list(words)
    while words:
        word = words.pop(0)
        if word in ("...", "--help", "-h") or word.startswith("$"):  # `lorakit --quiet ...`, $PWD
            continue
        if not word.startswith("-") or word == "-":
            if hasattr(command, "commands") and not positionals:  # a group: the word names its command
                sub = command.commands.get(word)
                if sub is None:
                    problems.append(f"{word}: no such command{_did_you_mean(word, command.commands)}")
                    return problems
                command = sub
            else:
                positionals.append(word)
            continue
        flag, eq, value = word.partition("=")
        options = [p for p in command.params if p.param_type_name == "option"]
        option = next((p for p in options if flag in p.opts + p.secondary_opts), None)
        if option is None:
            names = [name for p in options for name in p.opts + p.secondary_opts]
            problems.append(f"{command.name}: no option {flag}{_did_you_mean(flag, names)}")
            continue
        if option.is_flag or option.count:
            continue
        if not eq:
            value = words.pop(0) if words else ""
        if option.name == "set_" and value:
            problem = _recipe_key_problem(value.partition("=")[0].strip())
            if problem:
                problems.append(f"--set {problem}")
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    if len(positionals) > len(arguments) and all(p.nargs == 1 for p in arguments):
        problems.append(f"{command.name}: takes {len(arguments)} argument(s), given {' '.join(positionals)}")
    return problems


def _documented_commands():
    for where, text, inline in [*_command_lines(), *_recipe_header_lines()]:
        words = _lorakit_words(text, inline)
        if words is not None:
            yield pytest.param(words, id=where)


@pytest.mark.parametrize("words", list(_documented_commands()))
def test_documented_commands_match_the_cli(words):
    """A reader who copies a command from the docs gets one the CLI accepts (placeholders aside)."""
    assert not _problems(words), "lorakit " + " ".join(words)


def test_the_checker_catches_what_drifts():
    """The check itself: each kind of drift is reported, and the docs' placeholders and usage syntax are not."""
    assert _problems(["trian", "my.yaml"]) == ["trian: no such command; did you mean train?"]
    assert _problems(["train", "my.yaml", "--ouput-dir", "x"]) == \
        ["train: no option --ouput-dir; did you mean --output-dir?"]
    assert _problems(["train", "my.yaml", "--set", "train.learning_rat=1"]) == \
        ["--set train.learning_rat: no recipe key; did you mean learning_rate?"]
    assert _problems(["--debug", "train", "RECIPE", "--set", "KEY=VALUE", "--set", "~model.double_quant"]) == []
    assert _problems(["inspect", "--model", "M", "--method", "prefix", "--set", "adapter.num_virtual_tokens=8"]) == []
    assert _problems(["inspect", "--set", "adapter.num_virtual_token=8"]) == \
        ["--set adapter.num_virtual_token: no recipe key; did you mean num_virtual_tokens?"]
    assert _problems(["--quiet", "..."]) == []
    assert _problems(["plot", "RUN", "extra"]) == ["plot: takes 1 argument(s), given RUN extra"]
    assert _lorakit_words("make bench  # lorakit train", False) is None
    assert _lorakit_words("WANDB_MODE=offline lorakit train my.yaml | tee log  # later", False) == ["train", "my.yaml"]
    launch = "accelerate launch --config_file a.yaml -m lorakit train r.yaml"
    assert _lorakit_words(launch, False) == ["train", "r.yaml"]
    assert _lorakit_words("lorakit generate --model B [--adapter N=D ...] (--prompt T | --file F)", True) == \
        ["generate", "--model", "B", "--adapter", "N=D", "...", "--prompt", "T", "--file", "F"]
    lines = list(_joined([(1, "lorakit train \\"), (2, "  --resume"), (3, "lorakit plot R")]))
    assert lines == [(1, "lorakit train    --resume"), (3, "lorakit plot R")]
