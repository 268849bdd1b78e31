"""`lorakit --help` and `lorakit validate` start without importing torch or transformers."""

import subprocess
import sys

import yaml

HEAVY = ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes")


def _imported_heavy(args: list[str]) -> list[str]:
    """Heavy top-level packages that ``python -X importtime ARGS`` imported (importtime writes to stderr)."""
    done = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    names = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return sorted(names & set(HEAVY))


def test_importing_the_cli_imports_no_torch():
    code = "import lorakit.cli.main, sys; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_help_and_validate_import_no_heavy_library(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": "some/model"},
        "data": {"train": "train.jsonl"},
        "train": {"max_steps": 10},
    }))
    assert _imported_heavy(["-m", "lorakit", "--help"]) == []
    assert _imported_heavy(["-m", "lorakit", "train", "--help"]) == []
    assert _imported_heavy(["-m", "lorakit", "validate", str(recipe)]) == []
