"""Generated docs match the code that generates them; the reference covers every recipe key; every recipe
snippet the docs show validates."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorakit.config.load import parse_recipe
from lorakit.config.docs import GENERATED_FILES, README_MARKERS, render_exit_codes, render_readme, render_reference
from lorakit.errors import EXIT_CODES
from lorakit.config.schema import describe_keys

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


@pytest.mark.parametrize("name", list(GENERATED_FILES))
def test_committed_generated_docs_are_fresh(name):
    committed = (DOCS / name).read_text() if (DOCS / name).is_file() else ""
    assert committed == GENERATED_FILES[name](), f"docs/{name} is stale: run python -m lorakit.config.docs"


def test_the_readme_exit_code_table_is_the_generated_one():
    """README.md's table was a hand copy of docs/exit-codes.md's and had drifted from it (codes 1, 3 and 4)."""
    readme = (ROOT / "README.md").read_text()
    assert readme == render_readme(readme), "README.md's exit codes are stale: run python -m lorakit.config.docs"
    table = readme.split(README_MARKERS[0])[1].split(README_MARKERS[1])[0]
    rows = dict(re.findall(r"^\| (\d+) \| (.*) \|$", table, re.M))
    page = dict(re.findall(r"^\| (\d+) \| (.*) \| .* \|$", (DOCS / "exit-codes.md").read_text(), re.M))
    assert rows == page == {str(code): meaning for code, meaning in EXIT_CODES.items()}


def test_reference_lists_every_key_with_its_description():
    text = render_reference()
    for key, default, description in describe_keys():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, key
        assert description.replace("|", "\\|") in row
        assert ("**required**" if default == "required" else f"`{default}`") in row


def test_exit_codes_page_lists_every_code():
    text = render_exit_codes()
    for code in EXIT_CODES:
        assert f"\n| {code} |" in text
    assert "`DataError`" in text and "`SafetyError`" in text


def test_check_mode_reports_stale_docs(tmp_path):
    def check():
        return subprocess.run([sys.executable, "-m", "lorakit.config.docs", "--check", "--docs-dir", str(tmp_path)],
                              capture_output=True, text=True, timeout=60)

    assert check().returncode == 1  # nothing generated yet
    subprocess.run([sys.executable, "-m", "lorakit.config.docs", "--docs-dir", str(tmp_path)], check=True, timeout=60)
    assert check().returncode == 0
    (tmp_path / "recipe-reference.md").write_text("edited by hand\n")
    result = check()
    assert result.returncode == 1 and "recipe-reference.md is stale" in result.stderr


def test_check_mode_reports_a_hand_edited_readme_table(tmp_path):
    """The README beside the docs directory is checked and rewritten too; its text around the table is kept."""
    def run(*flags):
        return subprocess.run([sys.executable, "-m", "lorakit.config.docs", *flags, "--docs-dir", str(tmp_path / "docs")],
                              capture_output=True, text=True, timeout=60)

    start, end = README_MARKERS
    (tmp_path / "README.md").write_text(f"# intro\n\n{start}\n| 3 | edited by hand |\n{end}\n\nafter\n")
    assert run().returncode == 0
    assert run("--check").returncode == 0
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("# intro\n\n") and text.endswith(f"{end}\n\nafter\n") and "edited by hand" not in text
    (tmp_path / "README.md").write_text(text.replace("| 2 | invalid", "| 2 | a hand-edited"))
    result = run("--check")
    assert result.returncode == 1 and "README.md is stale" in result.stderr


# The least a recipe needs; a snippet showing one section is checked on top of it.
_MINIMAL_RECIPE = {"model": {"name_or_path": "some/model"}, "data": {"train": "train.jsonl"}, "train": {"max_steps": 1}}


def _merged(base: dict, snippet: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in snippet.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _yaml_snippets():
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for block in re.finditer(r"```yaml\n(.*?)```", page.read_text(), re.S):
            line = page.read_text()[: block.start()].count("\n") + 1
            for part in re.split(r"^---\n", block.group(1), flags=re.M):
                yield pytest.param(part, id=f"{page.name}:{line}")


@pytest.mark.parametrize("snippet", list(_yaml_snippets()))
def test_recipe_snippets_in_the_docs_validate(snippet):
    """A reader who copies a snippet into a recipe gets one that `lorakit validate` accepts."""
    parse_recipe(_merged(_MINIMAL_RECIPE, yaml.safe_load(snippet)))
