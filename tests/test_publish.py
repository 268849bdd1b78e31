"""Guarded outputs (lorakit.publish) and output locks (lorakit.runlock): no command may write over an input, replace
what lorakit did not write, delete an earlier output, or share an output directory with a running process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorakit.publish import MARKER, read_marker
from lorakit.runlock import lock_path
from run_helpers import cli, lorakit, recipe_dict, subprocess_env, tree_hash, write_data, write_recipe


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """A project folder: models/base (a copy of the tiny model), data, and a finished run runs/a."""
    root = tmp_path_factory.mktemp("project")
    base = root / "models" / "base"
    shutil.copytree(tiny_model_dir, base)
    (root / "data").mkdir()
    data = write_data(root / "data" / "train.jsonl", 8)
    recipe = write_recipe(root / "a.yaml", recipe_dict(base, data, root / "runs" / "a", max_steps=2, save_every=1))
    result = cli("train", recipe)
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def project(finished, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(finished, root, symlinks=True)
    # The run records its base by absolute path: point the copy's adapter at the copy's base.
    record = root / "runs" / "a" / "adapter" / "lorakit.json"
    meta = json.loads(record.read_text())
    record.write_text(json.dumps({**meta, "base_model_path": str(root / "models" / "base")}))
    return root


def _refused(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in " ".join(errors[0].split()), errors[0]


@pytest.mark.parametrize("target, relation", [
    ("runs/a", "contains the adapter"),  # the first reproduction: the whole run was deleted
    ("models", "contains the base model"),  # the base being merged
    ("runs/a/adapter", "is the adapter"),
    ("runs/a/adapter/deeper", "lies inside the adapter"),
    ("runs/a/merged-copy", "lies inside the run"),
    ("models/base", "is the base model"),
])
def test_merge_never_writes_over_an_input(project, target, relation):
    before = tree_hash(project)
    result = cli("merge", project / "runs/a/adapter", "-o", project / target, "--overwrite", "--no-verify")
    _refused(result, 5, relation)
    assert tree_hash(project) == before


def test_merge_output_through_a_symlink_to_an_input_is_refused(project):
    (project / "link").symlink_to(project / "runs" / "a")
    before = tree_hash(project / "runs")
    _refused(cli("merge", project / "runs/a/adapter", "-o", project / "link", "--overwrite"), 5, "contains the adapter")
    assert tree_hash(project / "runs") == before


def test_merge_overwrite_of_a_folder_lorakit_did_not_write_is_refused(project):
    notes = project / "notes"
    notes.mkdir()
    (notes / "ideas.txt").write_text("keep")
    _refused(cli("merge", project / "runs/a/adapter", "-o", notes, "--overwrite"), 5, "lorakit did not write")
    assert (notes / "ideas.txt").read_text() == "keep"


def test_merged_output_carries_the_marker_and_overwrite_keeps_the_old_one(project):
    out = project / "merged"
    assert cli("merge", project / "runs/a/adapter", "-o", out, "--no-verify").exit_code == 0
    assert read_marker(out)["kind"] == "merged model"
    first = tree_hash(out)
    assert cli("merge", project / "runs/a/adapter", "-o", out, "--no-verify", "--overwrite").exit_code == 0
    (aside,) = project.glob("merged.replaced-*")
    assert tree_hash(aside) == first and read_marker(out) is not None
    assert not lock_path(out).exists()  # released


def test_train_overwrite_replaces_only_a_marked_run(project):
    """A project folder with a hand-written recipe.yaml is not a run: --overwrite refuses to move it."""
    folder = project / "myproject"
    folder.mkdir()
    (folder / "recipe.yaml").write_text("# my notes\n")
    recipe = write_recipe(project / "b.yaml", recipe_dict(project / "models/base", project / "data/train.jsonl", folder,
                                                          max_steps=1))
    _refused(cli("train", recipe, "--overwrite"), 5, "lorakit did not write", "not a lorakit run")
    assert [p.name for p in folder.iterdir()] == ["recipe.yaml"]
    assert read_marker(project / "runs" / "a")["kind"] == "run"


@pytest.mark.parametrize("output, relation", [
    ("data", "contains the data.train data"),
    ("models/base", "is the base model"),
    ("models/base/run", "lies inside the base model"),
    (".", "contains the data.train data"),
    ("sub", "contains the recipe"),
])
def test_train_output_apart_from_its_inputs(project, output, relation):
    (project / "sub").mkdir()
    recipe = write_recipe(project / "sub" / "b.yaml", recipe_dict(
        project / "models/base", project / "data/train.jsonl", project / output, max_steps=1))
    before = tree_hash(project)
    _refused(cli("train", recipe, "--overwrite"), 5, relation)
    assert tree_hash(project) == before


def _unwritable_cases(tmp: Path) -> dict[str, tuple[str, str]]:
    (tmp / "afile").write_text("x")
    (tmp / "dangling").symlink_to(tmp / "nowhere")
    return {
        "dangling": (str(tmp / "dangling"), "dangling symbolic link"),
        "under-a-file": (str(tmp / "afile" / "out"), "is a file"),
        "current-dir": (".", "current directory"),
        "empty": ("", "the path is empty"),
        "read-only": ("/proc/lorakit-out", "cannot write"),  # read-only even for root
    }


@pytest.mark.parametrize("case", ["dangling", "under-a-file", "current-dir", "empty", "read-only"])
def test_unwritable_outputs_exit_2_before_anything_loads(project, tmp_path, monkeypatch, case):
    target, needle = _unwritable_cases(tmp_path)[case]
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(project / "models/base", project / "data/train.jsonl",
                                                           "unused", max_steps=1))
    _refused(cli("train", recipe, "--output-dir", target), 2, needle)
    _refused(cli("merge", project / "runs/a/adapter", "-o", target), 2, needle)
    assert sorted(p.name for p in work.iterdir()) == [] and not (tmp_path / "nowhere").exists()


# ----------------------------------------------------------------------------------------------------------
# Locks: two real processes

HOLDER = """
import sys, time
from pathlib import Path
from lorakit.runlock import OutputLock
with OutputLock(Path(sys.argv[1]), print):
    print("held", flush=True)
    time.sleep(120)
"""


def _hold(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                            env=subprocess_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow
def test_a_second_process_is_refused_while_the_first_holds_the_output(project):
    run = project / "runs" / "a"
    holder = _hold(run)
    try:
        recipe = project / "a2.yaml"
        write_recipe(recipe, recipe_dict(project / "models/base", project / "data/train.jsonl", run, max_steps=4,
                                         save_every=1))
        before = tree_hash(run)
        proc = lorakit("train", recipe, "--resume", "--allow-recipe-change")
        assert proc.returncode == 5, proc.stderr
        assert f"in use by lorakit process {holder.pid}" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert tree_hash(run) == before
        merged = project / "merged"
        holder_m = _hold(merged)
        try:
            proc = lorakit("merge", run / "adapter", "-o", merged, "--no-verify")
            assert proc.returncode == 5 and f"process {holder_m.pid}" in proc.stderr, proc.stderr
            assert not merged.exists()
        finally:
            holder_m.kill()
            holder_m.wait()
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed: its lock file stays, unheld. The next run names the dead PID and takes over.
    assert lock_path(run).exists()
    proc = lorakit("train", recipe, "--resume", "--allow-recipe-change")
    assert proc.returncode == 0, proc.stderr
    assert f"taking over a stale lock: lorakit process {holder.pid}" in proc.stdout + proc.stderr
    assert not lock_path(run).exists()


@pytest.mark.slow
def test_two_trainings_started_together_one_is_refused(project):
    """The issue's reproduction: the second run into the same directory is refused (exit 5, naming the first),
    the first finishes, and metrics.jsonl holds one run."""
    out = project / "runs" / "c"
    data = project / "data" / "train.jsonl"
    first = write_recipe(project / "c1.yaml", recipe_dict(project / "models/base", data, out, max_steps=12,
                                                          save_every=2))
    second = write_recipe(project / "c2.yaml", recipe_dict(project / "models/base", data, out, max_steps=12,
                                                           save_every=2, learning_rate=0.01))
    a = subprocess.Popen([sys.executable, "-m", "lorakit", "train", str(first)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=subprocess_env())
    deadline = time.time() + 120
    while not lock_path(out).exists() and time.time() < deadline:
        time.sleep(0.05)
    b = lorakit("train", second)
    stdout, stderr = a.communicate(timeout=300)
    assert a.returncode == 0, stderr
    assert b.returncode == 5 and f"in use by lorakit process {a.pid}" in b.stderr, b.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 13))


def test_marker_is_json_with_kind_version_and_time(project):
    record = json.loads((project / "runs" / "a" / MARKER).read_text())
    assert record["kind"] == "run" and record["version"] and record["created"]
    assert os.path.isfile(project / "runs" / "a" / "adapter" / "adapter_config.json")


# ----------------------------------------------------------------------------------------------------------
# The invariant: a command writes into its output (and lorakit's cache), nowhere else


def _snapshot(*roots: Path) -> dict:
    return {p: h for root in roots for p, h in {root / k: v for k, v in tree_hash(root).items()}.items()}


def _changes(before: dict, after: dict) -> set[Path]:
    return {p for p in set(before) | set(after) if before.get(p) != after.get(p)}


def _outside(changes: set[Path], *allowed: Path) -> list[Path]:
    return sorted(p for p in changes if not any(p == a or a in p.parents for a in allowed))


@pytest.mark.slow
def test_no_command_writes_outside_its_output_and_the_cache(project, tmp_path, monkeypatch):
    """train (adapter and merged model, then --overwrite), merge, plot, init and schema in one project folder:
    every changed path lies in that command's output (or its set-aside copy) or in LORAKIT_CACHE, every output
    directory carries the marker, and no lock or temporary is left behind."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORAKIT_CACHE", str(cache))
    monkeypatch.chdir(project)
    out = project / "runs" / "b"
    recipe = write_recipe(project / "b.yaml", {
        **recipe_dict(project / "models/base", project / "data/train.jsonl", out, max_steps=2, save_every=1),
        "output": {"dir": str(out), "save": "both"}})
    commands = [
        (["train", recipe], [out]),
        (["train", recipe, "--overwrite"], [out, *project.glob("runs/b.replaced-*")]),
        (["merge", project / "runs/a/adapter", "-o", project / "merged", "--no-verify"], [project / "merged"]),
        (["plot", project / "runs/a", "-o", project / "plots/a.png"], [project / "plots"]),
        (["init", "cpu-demo", "-o", project / "new.yaml"], [project / "new.yaml"]),
        (["schema", "-o", project / "recipe.schema.json"], [project / "recipe.schema.json"]),
    ]
    for args, outputs in commands:
        before = _snapshot(tmp_path)
        result = cli(*args)
        assert result.exit_code == 0, (args, result.output)
        changed = _changes(before, _snapshot(tmp_path))
        assert not _outside(changed, *outputs, *project.glob("runs/b.replaced-*"), cache), args
    for folder in (out, project / "merged", *project.glob("runs/b.replaced-*")):
        assert read_marker(folder) is not None, folder
    leftovers = [p.name for p in project.rglob("*") if "lorakit-lock" in p.name or "lorakit-tmp" in p.name]
    assert not leftovers
