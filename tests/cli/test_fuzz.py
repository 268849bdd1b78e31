"""Property-based fuzzing (Hypothesis) of what a user hands lorakit: recipes, data rows and command lines.

Whatever the input, a command ends with a documented exit code other than 1 (1 is a lorakit bug), a failure
prints exactly one line on stderr and no traceback, and no file that existed before is changed. Derandomized:
every CI run draws the same examples, and ``@example`` keeps each input that once failed as a regression case.
About two minutes in all (see ``settings`` below).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lorakit.errors import EXIT_CODES, EXIT_UNEXPECTED
from run_helpers import cli, recipe_dict, tree_hash, write_data, write_recipe

ROOT = Path(__file__).parents[2]
SHIPPED = sorted(p for p in (ROOT / "recipes").glob("*.yaml"))
ALLOWED = set(EXIT_CODES) - {EXIT_UNEXPECTED}
FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def fuzz(max_examples: int) -> settings:
    return settings(FUZZ, max_examples=max_examples)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_model_dir):
    """A folder of pre-existing files (a data file, a recipe, a finished-looking run) every case runs in."""
    root = tmp_path_factory.mktemp("fuzz")
    data = write_data(root / "train.jsonl", 6)
    write_recipe(root / "mine.yaml", recipe_dict(tiny_model_dir, data, root / "run", max_steps=1))
    (root / "run").mkdir()
    (root / "run" / "notes.txt").write_text("a user's notes\n")
    return root


def run_and_check(sandbox: Path, *args) -> None:
    before = tree_hash(sandbox)
    with contextlib.chdir(sandbox):
        result = cli(*args)
    assert result.exit_code in ALLOWED, (args, result.output)
    assert "Traceback" not in result.output, result.output
    if result.exit_code != 0:
        # lorakit's own warnings given before the refusal ("warning: ...") are lines of their own
        first, *rest = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")]
        assert first.startswith("error:"), (args, result.stderr)
        # One line; a recipe with several problems lists them all under "N problems" (errors.RecipeError).
        assert not rest or (first.endswith(f"{len(rest)} problems") and all(r.startswith("  ") for r in rest)), (
            args, result.stderr)
    after = tree_hash(sandbox)
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"{args}: changed pre-existing {changed}"


# ----------------------------------------------------------------------------------------------------------
# Recipes: mutations of the shipped ones, and random YAML

KEYS = sorted({f"{section}.{key}" for path in SHIPPED for section, body in yaml.safe_load(path.read_text()).items()
               if isinstance(body, dict) for key in body} | {"train.seed", "adapter.r", "nosuch.key", "train.lr"})
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.lists(st.one_of(st.integers(), st.text(max_size=8)), max_size=4),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=3),
)


@st.composite
def mutated_recipe(draw) -> str:
    recipe = yaml.safe_load(draw(st.sampled_from(SHIPPED)).read_text())
    for _ in range(draw(st.integers(1, 3))):
        section, key = draw(st.sampled_from(KEYS)).split(".")
        if draw(st.booleans()) and isinstance(recipe.get(section), dict):
            recipe[section].pop(key, None)
        else:
            recipe.setdefault(section, {}) if isinstance(recipe.get(section, {}), dict) else None
            if isinstance(recipe.get(section), dict):
                recipe[section][key] = draw(VALUES)
    text = yaml.safe_dump(recipe, sort_keys=False)
    tail = draw(st.sampled_from(["", "train:\n  max_steps: 3\n", "a: &a [1, 1]\nb: [*a, *a]\n", "\t", "{"]))
    return text + tail


@fuzz(400)
@given(text=st.one_of(mutated_recipe(), st.text(max_size=200)))
@example(text="model: {name_or_path: x}\nmodel: {name_or_path: y}\n")  # duplicate keys (issue 15, item 5)
@example(text="train: {seed: 99999999999, learning_rate: .inf}\n")
@example(text="\x1f")  # found by this test: PyYAML's reader error spans two lines
def test_any_recipe_validates_or_is_refused_in_one_line(sandbox, text):
    path = sandbox / "fuzz-recipe.yaml"
    path.write_text(text)
    try:
        run_and_check(sandbox, "validate", path)
    finally:
        path.unlink()


# ----------------------------------------------------------------------------------------------------------
# Data rows: every format, wrong types, unicode, empty and huge values

JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=40)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=10), inner, max_size=3)),
    max_leaves=8,
)
FIELDS = {"alpaca": ["instruction", "input", "output"], "chat": ["messages"], "text": ["text"],
          "completion": ["prompt", "completion"]}


@st.composite
def data_case(draw) -> tuple[str, list[str]]:
    fmt = draw(st.sampled_from(sorted(FIELDS)))
    rows = []
    for _ in range(draw(st.integers(0, 4))):
        row = {name: draw(st.one_of(st.text(max_size=60), JSONISH)) for name in FIELDS[fmt]
               if draw(st.integers(0, 5))}
        if fmt == "chat" and draw(st.booleans()):
            row["messages"] = [{"role": draw(st.sampled_from(["user", "assistant", "system", "robot"])),
                                "content": draw(st.text(max_size=40))} for _ in range(draw(st.integers(0, 3)))]
        rows.append(draw(st.sampled_from([json.dumps(row), json.dumps(row, ensure_ascii=False), "",
                                          json.dumps(row)[: draw(st.integers(0, 20))], "x" * 5000])))
    return fmt, rows


@fuzz(100)
@given(case=data_case())
@example(case=("alpaca", ['{"instruction": "x", "output": ' + "[" * 5000 + "]" * 5000 + "}"]))
def test_any_data_rows_preview_or_are_refused_in_one_line(sandbox, tiny_model_dir, case):
    fmt, rows = case
    data = sandbox / "fuzz.jsonl"
    data.write_text("".join(r + "\n" for r in rows))
    recipe = write_recipe(sandbox / "fuzz-data.yaml", {
        **recipe_dict(tiny_model_dir, data, sandbox / "fuzz-run", max_steps=1),
        "data": {"train": str(data), "format": fmt, "max_seq_len": 64, "cache": False,
                 **({"chat_template": "chatml"} if fmt == "chat" else {})}})
    try:
        run_and_check(sandbox, "preview-data", recipe, "-n", "1", "--no-stats")
    finally:
        data.unlink()
        recipe.unlink()


# ----------------------------------------------------------------------------------------------------------
# Command lines: the commands that load no weights, with random options and values

OPTIONS = {
    "validate": ["--set"],
    "estimate-memory": ["--model", "--method", "--r", "--targets", "--batch-size", "--seq-len", "--optimizer",
                        "--dtype", "--attn", "--gpus", "--strategy", "--gpu-memory", "--set", "--json", "--explain"],
    "merge": ["-o", "--base", "--dtype", "--max-shard-size", "--base-precision", "--overwrite", "--no-verify"],
    "init": ["-o", "--force", "--list"],
    "plot": ["-o", "--width", "--height"],
    "schema": ["-o"],
    "inspect": ["--model", "--method", "--r", "--targets"],
}
WORDS = st.one_of(
    st.sampled_from(["mine.yaml", "run", "train.jsonl", "mistral-7b", "gpt2", "lora", "qlora", "-1", "0", "1e99",
                     "all-linear", "q_proj", "bfloat16", "5GB", "", ".", "..", "/", "nowhere/x", "--", "=", "run/notes.txt",
                     "fuzz-out/new", "fuzz-out/plot.png"]),
    st.integers(-(2**65), 2**65).map(str), st.text(max_size=12),
)


@st.composite
def command_line(draw) -> list[str]:
    command = draw(st.sampled_from(sorted(OPTIONS)))
    args = [command]
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            args.append(draw(st.sampled_from(OPTIONS[command])))
        args.append(draw(WORDS))
    return args


@fuzz(300)
@given(args=command_line())
@example(args=["estimate-memory", "--model", "mistral-7b", "--batch-size", "1000000000", "--seq-len", "1000000000"])
@example(args=["init", "-o", "run", "--force"])  # a directory as init's file
@example(args=["merge", "run", "-o", "run", "--overwrite"])
@example(args=["schema", "-o", "run"])  # found by this test: a directory as the schema file (exit 1)
@example(args=["schema", "-o", "mine.yaml"])  # found by this test: overwrote the user's recipe
def test_any_command_line_ends_documented_and_changes_nothing(sandbox, args):
    with contextlib.chdir(sandbox):
        new = {p for p in Path(".").rglob("*")}
    try:
        run_and_check(sandbox, *args)
    finally:
        with contextlib.chdir(sandbox):  # what a successful init/schema/plot wrote: new files only, removed
            for path in sorted(set(Path(".").rglob("*")) - new, key=lambda p: len(p.parts), reverse=True):
                path.unlink() if path.is_file() or path.is_symlink() else path.rmdir()
