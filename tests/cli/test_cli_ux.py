"""init, schema, plot, doctor and the global --quiet / --json-logs modes, through CliRunner (the same commands as
real processes: tests/e2e/test_cli_commands.py)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from run_helpers import png_size, write_metrics
from typer.testing import CliRunner

from lorakit.cli.main import app
from lorakit.console import configure
from lorakit.config.init import TEMPLATES
from lorakit.config.schema import describe_keys
from lorakit.config.load import parse_recipe, read_yaml
from lorakit.config.start import inapplicable

runner = CliRunner()


@pytest.fixture(autouse=True)
def _normal_output_after():
    yield
    configure()  # --quiet/--json-logs are process-wide: leave the next test in normal mode


# ----------------------------------------------------------------------------------------------------------
# init


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_init_writes_every_key_with_its_schema_comment(tmp_path, name):
    out = tmp_path / "recipe.yaml"
    result = runner.invoke(app, ["init", name, "-o", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    lines = text.splitlines()
    recipe = parse_recipe(yaml.safe_load(text))
    unused = {c.key for c in inapplicable(recipe)}  # written commented out: set, they would be refused
    for key, _, description in describe_keys():
        leaf = key.split(".", 1)[1]
        start = lines.index(key.split(".")[0] + ":")
        line = next(i for i, l in enumerate(lines) if i > start and l.startswith((f"  {leaf}:", f"  # {leaf}:")))
        assert lines[line].startswith(f"  # {leaf}:") == (key in unused or key in TEMPLATES[name].suggest), key
        assert lines[line - 1] == f"  # {' '.join(description.split())}", key
    dumped = recipe.model_dump(mode="json")
    for section, values in TEMPLATES[name].overrides.items():
        for key, value in values.items():
            assert dumped[section][key] == value, f"{section}.{key}"
    assert text.startswith("# lorakit recipe") and "--set " in text


def test_init_never_overwrites_without_force(tmp_path):
    out = tmp_path / "recipe.yaml"
    out.write_text("mine\n")
    result = runner.invoke(app, ["init", "qlora", "-o", str(out)])
    assert result.exit_code == 5
    assert "--force" in result.stderr and out.read_text() == "mine\n"
    result = runner.invoke(app, ["init", "qlora", "-o", str(out), "--force"])
    assert result.exit_code == 0
    assert parse_recipe(read_yaml(out)).model.quantization == "nf4"
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("recipe.yaml.replaced-")]
    assert len(aside) == 1 and aside[0].read_text() == "mine\n"  # --force moves the user's file aside


def test_init_list_and_unknown_template(tmp_path):
    result = runner.invoke(app, ["init", "--list"])
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.stdout.splitlines()] == list(TEMPLATES)
    result = runner.invoke(app, ["init", "qlroa", "-o", str(tmp_path / "x.yaml")])
    assert result.exit_code == 2 and "did you mean qlora" in result.stderr
    assert not (tmp_path / "x.yaml").exists()


@pytest.mark.parametrize("args, needle", [
    (["--list", "-o", "x.yaml"], "drop -o"),
    (["qlora", "--list"], "drop the template qlora"),
    (["--list", "--force"], "drop --force"),
    (["-o", "-", "--force"], "writes to stdout, where nothing is replaced; drop --force"),
])
def test_init_refuses_options_that_would_do_nothing(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["init", *args])
    assert result.exit_code == 2 and needle in result.stderr, result.output
    assert result.stdout == "" and not list(tmp_path.iterdir())


def test_init_to_stdout():
    result = runner.invoke(app, ["init", "dora", "-o", "-"])
    assert result.exit_code == 0
    assert parse_recipe(yaml.safe_load(result.stdout)).adapter.method == "dora"


# ----------------------------------------------------------------------------------------------------------
# schema


def test_schema_is_json_with_every_key_description(tmp_path):
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["$schema"].startswith("https://json-schema.org/")
    for key, _, description in describe_keys():
        section, leaf = key.split(".", 1)
        ref = schema["properties"][section]["$ref"].rsplit("/", 1)[-1]
        assert schema["$defs"][ref]["properties"][leaf]["description"] == description
    out = tmp_path / "recipe.schema.json"
    assert runner.invoke(app, ["schema", "-o", str(out)]).exit_code == 0
    assert json.loads(out.read_text()) == schema
    # --json-logs: one schema event (stdout was the indented document, 900 lines that are not JSON lines)
    as_json = runner.invoke(app, ["--json-logs", "schema"])
    assert as_json.exit_code == 0
    (event,) = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert event["event"] == "schema" and event["schema"] == schema


def test_schema_output_in_a_new_folder_and_through_a_link(tmp_path):
    out = tmp_path / "new folder" / "é" / "recipe.schema.json"
    result = runner.invoke(app, ["schema", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["title"] == "lorakit recipe"
    link = tmp_path / "link.json"
    link.symlink_to(out)
    assert runner.invoke(app, ["schema", "-o", str(link)]).exit_code == 0
    assert link.is_symlink() and json.loads(out.read_text())["title"] == "lorakit recipe"


def test_schema_rejects_what_validate_rejects():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(runner.invoke(app, ["schema"]).stdout)
    bad = {"model": {"name_or_path": "m", "quantization": "nf5"}, "data": {"train": "d.jsonl"}, "train": {"max_steps": 1}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad["model"]["quantization"] = "nf4"
    bad["train"]["learnign_rate"] = 1e-4
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


# ----------------------------------------------------------------------------------------------------------
# plot


def test_plot_writes_a_png_of_the_requested_size(tmp_path):
    run = tmp_path / "run"
    write_metrics(run)
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    assert png_size(run / "loss.png") == (1000, 700)
    out = tmp_path / "pics" / "small.png"
    result = runner.invoke(app, ["plot", str(run), "-o", str(out), "--width", "640", "--height", "480"])
    assert result.exit_code == 0 and str(out) in result.stdout
    assert png_size(out) == (640, 480)


def test_plot_tolerates_a_torn_last_line_and_repeated_steps(tmp_path):
    run = tmp_path / "run"
    write_metrics(run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 20, "loss": 0.1, "lr": 0.0}) + "\n" + '{"step": 25, "lo')
    assert runner.invoke(app, ["plot", str(run)]).exit_code == 0
    assert png_size(run / "loss.png") == (1000, 700)


def test_plot_replaces_only_an_earlier_plot(tmp_path):
    run = tmp_path / "run"
    write_metrics(run)
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "x", "output": "y"}\n')
    result = runner.invoke(app, ["plot", str(run), "-o", str(data)])
    assert result.exit_code == 5 and "not a plot lorakit drew" in result.stderr, result.output
    assert data.read_text() == '{"instruction": "x", "output": "y"}\n'
    out = tmp_path / "pics" / "loss.png"
    for _ in range(2):  # a plot it drew is replaced, through a symbolic link too
        assert runner.invoke(app, ["plot", str(run), "-o", str(out)]).exit_code == 0
    link = tmp_path / "link.png"
    link.symlink_to(out)
    assert runner.invoke(app, ["plot", str(run), "-o", str(link), "--width", "640"]).exit_code == 0
    assert link.is_symlink() and png_size(out) == (640, 700)


def test_plot_skips_damaged_metrics_records(tmp_path):
    run = tmp_path / "run"
    write_metrics(run)
    with (run / "metrics.jsonl").open("ab") as f:
        f.write(b'\xff\xfe{"step": 3}\n{"step": "x", "loss": 1}\n{"step": 1e400, "loss": 1}\n{"step": true, "loss": 1}\n')
        f.write(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    assert png_size(run / "loss.png") == (1000, 700)


def test_plot_errors_are_one_line_usage_errors(tmp_path):
    result = runner.invoke(app, ["plot", str(tmp_path)])
    assert result.exit_code == 2 and "metrics" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = runner.invoke(app, ["plot", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "not a directory" in result.stderr
    write_metrics(tmp_path)
    result = runner.invoke(app, ["plot", str(tmp_path), "-o", str(tmp_path / "loss.svg")])  # was PNG bytes in .svg
    assert result.exit_code == 2 and "draws a PNG; name the file .png, e.g. " in result.stderr
    assert not (tmp_path / "loss.svg").exists()


# ----------------------------------------------------------------------------------------------------------
# doctor


def test_doctor_reports_stack_and_respects_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    import torch

    assert torch.__version__ in result.stdout and "offline" in result.stdout
    result = runner.invoke(app, ["--json-logs", "doctor"])
    checks = [json.loads(line) for line in result.stdout.splitlines()]
    assert {c["event"] for c in checks} <= {"check", "warning"}
    names = {c["name"] for c in checks if c["event"] == "check"}
    assert {"python", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "gpu", "hub"} <= names
    for check in checks:
        if check["event"] == "check" and check["status"] in ("warn", "fail"):
            assert check["fix"], f"{check['name']}: a problem without a remedy"


@pytest.mark.parametrize("args, text", [
    (["generate", "--temperature", "nan"], "'--temperature': nan is not a finite number; give a number of at least 0"),
    (["generate", "--temperature", "inf"], "'--temperature': inf is not a finite number"),  # was let through
    (["generate", "--temperature", "-1"], "'--temperature': -1 is out of range"),
    (["generate", "--temperature", "1", "--top-p", "nan"], "'--top-p': nan is not a finite number; give a number "
     "from 0 to 1"),  # was "should be less than or equal to 1"
    (["generate", "--temperature", "1e-300"], "--temperature 1e-300: too small to sample with"),  # was exit 1
    (["generate", "--temperature", "1", "--seed", "99999999999999999999"], "'--seed'"),  # was exit 1
    (["doctor", "--timeout", "nan"], "'--timeout': nan is not a finite number; give a number from 0.1 to 60"),
    (["doctor", "--timeout", "inf"], "'--timeout': inf is not a finite number"),
])
def test_number_flags_name_nan_infinity_and_range(args, text):
    """NaN and infinity are named for what they are, and a value that would fail inside the library is refused
    before any model loads (the model named does not exist: nothing got that far)."""
    if args[0] == "generate":
        args = [*args, "--model", "/nonexistent", "--prompt", "hi"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and text in " ".join(result.output.split()), result.output


def test_hub_probe_is_bounded_by_its_timeout():
    """A server that accepts the connection and never answers: doctor gives up after its timeout."""
    import socket

    from lorakit.tools.doctor import WARN, check_hub

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)  # never accept(): the client connects (backlog) and waits forever for a reply
        start = time.monotonic()
        [finding] = check_hub(timeout=0.5, offline=False, endpoint=f"http://127.0.0.1:{server.getsockname()[1]}")
        assert time.monotonic() - start < 2.5
    assert finding.status == WARN and finding.fix


# ----------------------------------------------------------------------------------------------------------
# --quiet and --json-logs


def test_json_logs_are_json_lines_including_errors(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    assert runner.invoke(app, ["init", "cpu-demo", "-o", str(recipe)]).exit_code == 0
    result = runner.invoke(app, ["--json-logs", "validate", str(recipe)])
    assert result.exit_code == 0
    [record] = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["event"] == "log" and "ok" in record["message"]

    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.read_text().replace("max_steps: 30", "max_steps: -1"))
    result = runner.invoke(app, ["--json-logs", "validate", str(bad)])
    assert result.exit_code == 2
    [record] = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["event"] == "error" and record["exit_code"] == 2 and "train.max_steps" in record["message"]
    assert "train.max_steps" in result.stderr


@pytest.mark.parametrize("args", [["no-such-command"], [], ["--no-such-option", "validate"]])
def test_json_logs_give_an_error_object_before_any_command_runs(args):
    """An unknown command or global option fails before the callback that turns --json-logs on: its error was
    only the plain line on stderr, and a script reading stdout saw nothing."""
    result = runner.invoke(app, ["--json-logs", *args])
    assert result.exit_code == 2
    [record] = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["event"] == "error" and record["exit_code"] == 2


def test_quiet_prints_only_errors_and_written_paths(tmp_path):
    out = tmp_path / "r.yaml"
    result = runner.invoke(app, ["--quiet", "init", "lora", "-o", str(out)])
    assert result.exit_code == 0 and result.stdout.strip() == f"recipe saved to {out}"
    result = runner.invoke(app, ["-q", "validate", str(out)])
    assert result.exit_code == 0 and result.stdout == ""
    result = runner.invoke(app, ["-q", "validate", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "not found" in result.stderr


def test_library_warnings_are_shown_once():
    script = (
        "import logging, warnings\n"
        "from lorakit.console import configure\n"
        "configure()\n"
        "for _ in range(3):\n"
        "    warnings.warn('deprecated knob', FutureWarning)\n"
        "    logging.getLogger('transformers.modeling_utils').warning('weights not initialised')\n"
        "    logging.getLogger('peft.tuners.lora').warning('fan_in_fan_out set to False')\n"
    )
    err = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60).stderr
    lines = err.strip().splitlines()
    assert sum("deprecated knob" in l for l in lines) == 1
    assert lines.count("warning (transformers): weights not initialised") == 1
    assert lines.count("warning (peft): fan_in_fan_out set to False") == 1



@pytest.mark.parametrize("mode", ["normal", "again", "json", "quiet"])
def test_lorakit_warnings_have_one_channel(tmp_path, mode):
    """lorakit's own warnings were lines on stdout beside the run's ("log" events with --json-logs), or went through
    warnings.warn, which pytest's per-test capture kept from every test but a session's first ("again" is the
    second). Now: "warning: ..." on stderr, a "warning" event from source "lorakit", nothing with --quiet."""
    recipe = tmp_path / "r.yaml"
    assert runner.invoke(app, ["init", "lora", "-o", str(recipe)]).exit_code == 0
    flags = {"json": ["--json-logs"], "quiet": ["--quiet"]}.get(mode, [])
    result = runner.invoke(app, [*flags, "validate", str(recipe), "--set", "train.learning_rate=100"])
    assert result.exit_code == 0, result.output
    if mode == "json":
        events = [json.loads(line) for line in result.stdout.splitlines()]
        [warning] = [e for e in events if e["event"] == "warning"]
        assert warning["source"] == "lorakit" and warning["message"].startswith("train.learning_rate: 100 is far")
        assert [e["event"] for e in events] == ["warning", "log"] and result.stderr == ""
    elif mode == "quiet":
        assert result.output == ""
    else:
        assert result.stderr.startswith("warning: train.learning_rate: 100 is far above") and "far" not in result.stdout
        assert result.stdout == f"{recipe}: ok\n"


def test_a_lorakit_warning_shows_once_and_only_on_the_main_process(capsys):
    from lorakit.console import warner

    warner(False)("train data: from rank 1")
    for _ in range(3):  # e.g. the generation cut at each train.eval_every
        warner(True)("generation: 100 new tokens cut to 55")
    assert capsys.readouterr() == ("", "warning: generation: 100 new tokens cut to 55\n")


def test_lorakit_raises_no_python_warnings():
    """warnings.warn reaches the user only through a logging hook a test runner or host program can replace, and
    not on the main process alone: lorakit's own warnings go through console.warner."""
    import lorakit

    package = Path(lorakit.__file__).parent
    calls = [f"{p.relative_to(package)}:{n}" for p in sorted(package.rglob("*.py"))
             for n, line in enumerate(p.read_text().splitlines(), 1) if "warnings.warn(" in line]
    assert not calls, f"use lorakit.console.warner: {calls}"


@pytest.mark.parametrize("debug", [False, True])
def test_known_library_noise_shows_only_with_debug(debug):
    script = (
        "import logging\n"
        "from lorakit.console import configure\n"
        f"configure(debug={debug})\n"
        "logging.getLogger('bitsandbytes').warning('Failed to load CPU gemm_4bit_forward from kernels-community: x')\n"
        "logging.getLogger('bitsandbytes').warning('something a user should see')\n"
    )
    err = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60).stderr
    assert ("kernels-community" in err) == debug
    assert "warning (bitsandbytes): something a user should see" in err


def test_metric_lines_read_as_numbers_and_the_efficiency_record_is_not_repeated(tmp_path, capsys):
    """Rates are printed with thousands separators (tokens_per_s 1.089e+04 before); a record written with
    text=False (the efficiency record, which its own line describes) prints nothing but its --json-logs event."""
    from lorakit.training.metrics import MetricsLog

    configure()
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    log.write({"step": 5, "loss": 4.61734, "lr": 1e-05, "tokens_per_s": 10890.4, "grad_norm": float("inf")})
    log.write({"step": 5, "mfu": 0.04}, text=False)
    assert capsys.readouterr().out == "step 5  loss 4.617  lr 1e-05  tokens_per_s 10,890  grad_norm inf\n"
    configure(json_logs=True)
    log.write({"step": 5, "mfu": 0.04}, text=False)
    assert json.loads(capsys.readouterr().out)["mfu"] == 0.04
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
