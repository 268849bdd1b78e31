"""The everyday commands as real processes (`python -m lorakit ...`): exit codes, stdout/stderr as a shell sees them."""

import json

from run_helpers import lorakit as run_lorakit
from run_helpers import png_size, subprocess_env, write_metrics


def lorakit(*args, cwd):
    env = subprocess_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", COLUMNS="200")
    return run_lorakit(*args, env=env, cwd=cwd, timeout=120)


def test_commands_as_subprocesses(tmp_path):
    r = lorakit("init", "cpu-demo", "-o", "recipe.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = lorakit("--json-logs", "validate", "recipe.yaml", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["event"] == "log"
    r = lorakit("init", "cpu-demo", "-o", "recipe.yaml", cwd=tmp_path)
    assert r.returncode == 5 and r.stderr.startswith("error:")
    r = lorakit("schema", cwd=tmp_path)
    assert r.returncode == 0 and "properties" in json.loads(r.stdout)
    write_metrics(tmp_path / "run")
    r = lorakit("-q", "plot", "run", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "plot saved to run/loss.png"
    assert png_size(tmp_path / "run" / "loss.png") == (1000, 700)
    r = lorakit("doctor", cwd=tmp_path)
    assert r.returncode == 0 and "offline" in r.stdout and "problem" in r.stdout
