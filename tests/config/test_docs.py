"""Generated docs match the code that generates them; the reference covers every recipe key."""

import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.config.docs import GENERATED_FILES, render_exit_codes, render_reference
from lorakit.errors import EXIT_CODES
from lorakit.config.schema import describe_keys

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


@pytest.mark.parametrize("name", list(GENERATED_FILES))
def test_committed_generated_docs_are_fresh(name):
    committed = (DOCS / name).read_text() if (DOCS / name).is_file() else ""
    assert committed == GENERATED_FILES[name](), f"docs/{name} is stale: run python -m lorakit.config.docs"


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
