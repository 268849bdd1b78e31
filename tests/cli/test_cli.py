"""The CLI surface: version, help generated from the schema, validate, error lines and exit codes."""

import yaml
from typer.testing import CliRunner

from lorakit import __version__
from lorakit.cli.main import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"lorakit {__version__}"


def test_train_help_lists_recipe_keys_from_schema():
    from lorakit.config.schema import describe_keys

    result = runner.invoke(app, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for key, _, description in describe_keys()[:6]:
        assert key in text
        assert " ".join(description.split()[:4]) in text
    assert "--set" in text and "Exit codes" in text


def test_every_command_has_help():
    import typer.main

    group = typer.main.get_group(app)
    for name in group.commands:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, name


def test_validate_ok_and_error(tmp_path):
    good = {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "train": {"epochs": 1}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(good))
    assert runner.invoke(app, ["validate", str(path)]).exit_code == 0
    result = runner.invoke(app, ["validate", str(path), "--set", "train.epochs=0"])
    assert result.exit_code == 2
    assert "train.epochs: must be > 0, got 0" in result.output
    result = runner.invoke(app, ["validate", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "not found" in result.output


def test_unexpected_error_is_one_line_exit_1(tmp_path, monkeypatch):
    import lorakit.config.load

    def boom(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(lorakit.config.load, "load_recipe", boom)
    result = runner.invoke(app, ["validate", "x.yaml"])
    assert result.exit_code == 1
    assert "unexpected failure: RuntimeError: kaboom (rerun with --debug" in result.output
    assert "Traceback" not in result.output


def test_debug_shows_the_traceback_with_the_same_exit_code(tmp_path):
    result = runner.invoke(app, ["--debug", "validate", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "Traceback" in result.output and "not found" in result.output
    result = runner.invoke(app, ["validate", str(tmp_path / "missing.yaml")])  # --debug does not stick
    assert result.exit_code == 2 and "Traceback" not in result.output
