"""Checkpoints: pickle-free state round trips, atomic writes, verification, rotation, faults, signals, and the
train command's output protection, resume refusals and non-finite guard (in-process, tiny model)."""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pytest
import yaml
import torch

from lorakit.checkpoint import format as fmt
from lorakit.checkpoint import read, resume, write
from lorakit.faults import CHECKPOINT_FAULT_ENV
from lorakit.errors import CheckpointError, NonFiniteLossError
from run_helpers import adapter_hash, cli, recipe_dict, training_records, tree_hash, write_data, write_recipe


# ----------------------------------------------------------------------------------------------------------
# Pieces


def test_state_dicts_round_trip_without_pickle(tmp_path):
    param = torch.nn.Parameter(torch.randn(3, 4))
    opt = torch.optim.AdamW([param], lr=1e-3, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    param.grad = torch.randn(3, 4)
    opt.step()
    sched.step()
    fmt._write_piece(tmp_path, "optimizer", opt.state_dict())
    fmt._write_piece(tmp_path, "scheduler", sched.state_dict())
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))

    back = fmt._read_piece(tmp_path, "optimizer")
    state = opt.state_dict()
    assert list(back["state"]) == [0]  # int keys stay ints
    for key, value in state["state"][0].items():
        assert torch.equal(back["state"][0][key], value)
    assert back["param_groups"][0]["betas"] == (0.9, 0.95)  # tuples stay tuples
    assert fmt._read_piece(tmp_path, "scheduler") == sched.state_dict()


def test_rng_states_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    fmt._write_piece(tmp_path, "rng", {"ranks": [fmt.capture_rng()]})
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    fmt.restore_rng(fmt._read_piece(tmp_path, "rng")["ranks"][0])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


# ----------------------------------------------------------------------------------------------------------
# Writing, verifying, rotating


@pytest.fixture(scope="module")
def peft_parts(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def save(root, step, parts, keep_last=2, **kwargs):
    model, opt, sched = parts
    state = {"step": step, "tokens_seen": 10 * step, "world_size": 1, "metrics_bytes": 0,
             "trainable": [[n, list(p.shape)] for n, p in model.named_parameters() if p.requires_grad]}
    return write.write_checkpoint(
        root, step, model=model, optimizer=opt, scheduler=sched, scaler=None, rng_states=[fmt.capture_rng()],
        state=state, recipe_text="model: {}\n", keep_last=keep_last, **kwargs,
    )


@pytest.mark.parametrize("format_version", [1, 2])
def test_optimizer_state_by_name_and_format_1_by_index(tmp_path, peft_parts, format_version):
    """Format 2 keys the optimizer state by parameter name (the same with FSDP); format 1 keyed it by index and
    still resumes without FSDP, while FSDP refuses it."""
    model, opt, sched = peft_parts
    model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    opt.step()
    opt.zero_grad()
    legacy = {"optimizer_state": opt.state_dict()} if format_version == 1 else {}
    path = save(tmp_path, 3, peft_parts, **legacy)
    saved = fmt._read_piece(path, "optimizer")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(saved["state"]) == (list(range(len(names))) if format_version == 1 else names)
    if format_version == 1:
        manifest = json.loads((path / "manifest.json").read_text())
        (path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    checkpoint = read.verify_checkpoint(path)
    fresh = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(fresh, lambda s: 1.0)  # as resuming builds it, before loading
    resume.restore_training_state(checkpoint, model=model, optimizer=fresh, scheduler=schedule, scaler=None, rank=0,
                                changed=False)
    for a, b in zip(opt.state_dict()["state"].values(), fresh.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    if format_version == 1:
        from lorakit.config.load import parse_recipe

        recipe = parse_recipe({"model": {"name_or_path": "m"}, "data": {"train": "t"}, "train": {"max_steps": 1}})
        with pytest.raises(CheckpointError, match="keyed by index, which FSDP cannot shard"):
            resume.check_resume(checkpoint, recipe, 1, True, print, fsdp=True)


def test_checkpoint_is_complete_and_verified(tmp_path, peft_parts):
    path = save(tmp_path, 3, peft_parts)
    assert path.name == "step-000003" and not (tmp_path / "step-000003.tmp").exists()
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["format"] == fmt.FORMAT and "torch" in manifest["versions"]
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert read.verify_checkpoint(path).step == 3
    # safetensors 0.8 writes 0600 (its issue #782): every file is as readable as the JSON beside it
    modes = {p.relative_to(path).as_posix(): p.stat().st_mode & 0o777 for p in path.rglob("*") if p.is_file()}
    assert set(modes.values()) == {(path / "manifest.json").stat().st_mode & 0o777}, modes


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
        (lambda p: (p / "rng.safetensors").unlink(), "rng.safetensors is missing"),
        (lambda p: os.truncate(p / "adapter" / "adapter_model.safetensors", 10), "truncated"),
        (lambda p: (p / "scheduler.json").write_text((p / "scheduler.json").read_text().replace("1", "2")), "sha256"),
        (lambda p: (p / "manifest.json").write_text('{"format": "other"}'), "foreign"),
        (lambda p: (p / "manifest.json").write_text("{"), "not valid JSON"),
    ],
    ids=["no-manifest", "missing-rng", "truncated", "modified", "foreign", "bad-json"],
)
def test_damaged_checkpoint_is_refused(tmp_path, peft_parts, damage, reason):
    path = save(tmp_path, 3, peft_parts)
    damage(path)
    with pytest.raises(CheckpointError, match=reason):
        read.verify_checkpoint(path)


def test_latest_skips_incomplete_and_reports(tmp_path, peft_parts):
    save(tmp_path, 3, peft_parts, keep_last=5)
    save(tmp_path, 6, peft_parts, keep_last=5)
    (tmp_path / "step-000006" / "manifest.json").unlink()
    (tmp_path / "step-000009.tmp").mkdir()
    said = []
    assert read.latest_checkpoint(tmp_path, said.append).step == 3
    assert any("step-000009.tmp" in s for s in said) and any("step-000006" in s for s in said)


def test_rotation_keeps_newest_complete(tmp_path, peft_parts):
    (tmp_path / "step-000002.tmp").mkdir(parents=True)  # an interrupted write
    for step in (1, 2, 3, 4):
        save(tmp_path, step, peft_parts, keep_last=2)
    assert [p.name for _, p in read.list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    assert not list(tmp_path.glob("*.tmp"))
    save(tmp_path, 5, peft_parts, keep_last=1)
    assert [p.name for _, p in read.list_checkpoints(tmp_path)] == ["step-000005"]


def test_failed_write_keeps_previous_checkpoint(tmp_path, peft_parts, monkeypatch):
    save(tmp_path, 3, peft_parts)
    before = tree_hash(tmp_path)
    monkeypatch.setenv(CHECKPOINT_FAULT_ENV, "enospc:rng:6")
    with pytest.raises(CheckpointError, match="No space left on device.*step-000003 is intact"):
        save(tmp_path, 6, peft_parts)
    assert tree_hash(tmp_path) == before


def test_non_finite_weights_are_never_saved(tmp_path, peft_parts):
    model = peft_parts[0]
    weight = next(p for p in model.parameters() if p.requires_grad)
    kept = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] = float("nan")
    try:
        with pytest.raises(NonFiniteLossError, match="step 3: .*lora_A.*NaN"):
            save(tmp_path, 3, peft_parts)
    finally:
        with torch.no_grad():
            weight.copy_(kept)
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def bottleneck_parts(tiny_model_dir):
    """lorakit's own adapter method after two optimizer steps (up starts at zero: give it something to restore)."""
    from transformers import AutoModelForCausalLM

    from lorakit.config.methods import BottleneckConfig
    from lorakit.adapters.bottleneck import BottleneckModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = BottleneckModel(base, BottleneckConfig(r=4, dropout=0.1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ids = torch.randint(5, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt, sched


def test_bottleneck_checkpoint_is_verified_and_restores_exactly(tmp_path, tiny_model_dir, bottleneck_parts, peft_parts):
    from transformers import AutoModelForCausalLM

    from lorakit.adapters.bottleneck import BottleneckModel

    model = bottleneck_parts[0]
    path = save(tmp_path, 3, bottleneck_parts)
    files = read.verify_checkpoint(path).manifest["files"]
    assert {"adapter/bottleneck_config.json", "adapter/bottleneck_model.safetensors"} <= set(files)
    assert read.adapter_files(files) == ("adapter/bottleneck_config.json", "adapter/bottleneck_model.safetensors")

    fresh = BottleneckModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                            model.bottleneck_config)
    params = [p for p in fresh.parameters() if p.requires_grad]
    resume._load_adapter(read.verify_checkpoint(path), fresh)
    assert [p for p in fresh.parameters() if p.requires_grad] == params  # in place: an optimizer keeps them
    trained = dict(model.named_parameters())
    for name, param in fresh.named_parameters():
        assert torch.equal(param, trained[name]), name
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in trained.items() if ".up." in n)

    lora = save(tmp_path / "lora", 3, peft_parts)
    with pytest.raises(CheckpointError, match="do not fit this model.*the recipe that wrote it"):
        resume._load_adapter(read.verify_checkpoint(lora), fresh)
    with pytest.raises(CheckpointError, match="do not fit this model"):
        resume._load_adapter(read.verify_checkpoint(path), peft_parts[0])

    os.truncate(path / "adapter" / "bottleneck_model.safetensors", 10)
    with pytest.raises(CheckpointError, match="adapter/bottleneck_model.safetensors is 10 bytes.*truncated"):
        read.verify_checkpoint(path)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"]["adapter/bottleneck_model.safetensors"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="incomplete: adapter/bottleneck_model.safetensors is not in"):
        read.verify_checkpoint(path)


def test_free_space_is_checked(tmp_path):
    write.check_free_space(tmp_path / "not-yet", 1 << 20, keep_last=2)
    with pytest.raises(CheckpointError, match="free disk space, lower train.keep_last"):
        write.check_free_space(tmp_path / "not-yet", 1 << 60, keep_last=2)


def test_recipe_changes_name_keys_and_skip_cosmetic():
    old = {"train": {"learning_rate": 1e-3, "log_every": 1}, "output": {"dir": "a", "report_to": []}}
    new = {"train": {"learning_rate": 2e-3, "log_every": 5}, "output": {"dir": "b", "report_to": ["mlflow"]}}
    assert resume.recipe_changes(old, new) == ["train.learning_rate: 0.001 → 0.002"]
    # How the data is tokenized (processes, the cache) changes no example: the data fingerprint checks the content.
    # A resume on a machine with fewer CPUs (data.num_proc: 2) was refused as a change of the result.
    before, after = {"data": {"num_proc": None, "cache": True}}, {"data": {"num_proc": 2, "cache": False}}
    assert resume.recipe_changes(before, after) == []


# ----------------------------------------------------------------------------------------------------------
# The train command (in-process)


@pytest.fixture
def run(tmp_path, tiny_model_dir):
    data = write_data(tmp_path / "train.jsonl", 16)
    out = tmp_path / "run"

    def make(name="recipe.yaml", adapter=None, **train):
        return write_recipe(tmp_path / name, recipe_dict(tiny_model_dir, data, out, adapter, **train)), out

    return make


def test_output_dir_is_protected_and_overwrite_moves_aside(run, tmp_path):
    recipe, out = run(max_steps=2)
    assert cli("train", recipe).exit_code == 0
    before = tree_hash(out)
    result = cli("train", recipe)
    assert result.exit_code == 5 and "--resume" in result.output and "--overwrite" in result.output
    assert tree_hash(out) == before
    assert cli("train", recipe, "--resume", "--overwrite").exit_code == 2

    result = cli("train", recipe, "--overwrite")
    assert result.exit_code == 0, result.output
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and tree_hash(aside[0]) == before  # the old run, byte for byte

    stranger = tmp_path / "photos"
    stranger.mkdir()
    (stranger / "cat.jpg").write_bytes(b"meow")
    result = cli("train", recipe, "--output-dir", stranger, "--overwrite")
    assert result.exit_code == 5 and "not a lorakit run" in result.output
    assert (stranger / "cat.jpg").read_bytes() == b"meow"


def unfinish(out, tmp_path):
    """A finished run as if stopped after its last checkpoint, before its adapter was saved: a resume trains again
    (a finished run's resume only says it is finished)."""
    (out / "adapter").rename(tmp_path / f"adapter-{len(list(tmp_path.glob('adapter-*')))}")


def test_resuming_a_finished_run_says_so_and_rewrites_nothing(run, tmp_path):
    """`--resume` (or --resume RUN/checkpoints/step-N) on a finished run retrained the steps after the checkpoint and
    rewrote DIR/adapter (the same bytes); now one line naming the step, the adapter and how to train further, exit 0,
    no file touched. Under a changed recipe it still continues (test_resume_with_allowed_recipe_change)."""
    recipe, out = run(max_steps=4, save_every=2)
    assert cli("train", recipe).exit_code == 0
    files = sorted(out.rglob("*"))
    stamps = [(p, p.stat().st_mtime_ns) for p in files]
    for where in ([], [out / "checkpoints" / "step-000002"]):
        result = cli("train", recipe, "--resume", *where)
        assert result.exit_code == 0, result.output
        assert f"{out}: this run already finished at step 4 (its adapter: {out / 'adapter'}); nothing to resume" \
               in " ".join(result.output.split())
        assert "raise train.max_steps and resume with --allow-recipe-change" in " ".join(result.output.split())
        assert "loading model" not in result.output and "tokenizing" not in result.output
        assert sorted(out.rglob("*")) == files and [(p, p.stat().st_mtime_ns) for p in files] == stamps


def test_resume_refusals(run, tmp_path):
    recipe, out = run(max_steps=4, save_every=2)
    result = cli("train", recipe, "--resume")
    assert result.exit_code == 4 and "no complete checkpoint" in result.output
    assert cli("train", recipe).exit_code == 0
    before = tree_hash(out)

    result = cli("train", recipe, "--resume", "--set", "train.learning_rate=0.005", "--set", "train.log_every=2")
    assert result.exit_code == 4, result.output
    assert "train.learning_rate: 0.001 → 0.005" in result.output and "log_every" not in result.output
    assert "--allow-recipe-change" in result.output
    assert tree_hash(out) == before

    result = cli("train", recipe, "--resume", tmp_path / "nowhere")
    assert result.exit_code == 4 and "not found" in result.output
    result = cli("train", recipe, out / "checkpoints" / "step-000002")
    assert result.exit_code == 2 and "--resume" in result.output
    assert tree_hash(out) == before


def test_resume_with_allowed_recipe_change(run):
    """A finished run resumed under a changed recipe replaced its DIR/adapter with the new run's, and kept the old
    eval.json beside it; both are now moved aside with the superseded checkpoints (an unchanged resume of a finished run
    trains nothing: test_resuming_a_finished_run_says_so_and_rewrites_nothing)."""
    recipe, out = run(max_steps=4, save_every=2)
    assert cli("train", recipe).exit_code == 0
    finished = adapter_hash(out / "adapter")
    (out / "eval.json").write_text("{}")
    result = cli("train", recipe, "--resume", "--allow-recipe-change", "--set", "train.max_steps=5")
    assert result.exit_code == 0, result.output
    assert "changed settings" in result.output and "train.max_steps: 4 → 5" in result.output
    assert [r["step"] for r in training_records(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    [aside] = (out / "checkpoints").glob("superseded-*")
    assert adapter_hash(aside / "adapter") == finished != adapter_hash(out / "adapter")
    assert (aside / "eval.json").read_text() == "{}" and not (out / "eval.json").exists()


def test_resume_keeps_the_checkpoints_value_of_a_key_left_to_a_default_that_changed(run, tmp_path):
    """DPO's LoRA dropout default went from 0.05 to 0: a run started before, resumed with its unchanged recipe (the
    key unset), was refused as a changed recipe. A key the recipe leaves to its default now keeps the checkpoint's
    value, said in one line, and the run ends bitwise as the uninterrupted one; a key the recipe sets still counts."""
    recipe, out = run(max_steps=4, save_every=2)  # recipe_dict sets adapter.lora_dropout: 0.1
    assert cli("train", recipe).exit_code == 0
    finished = adapter_hash(out / "adapter")
    unset = yaml.safe_load(recipe.read_text())
    del unset["adapter"]["lora_dropout"]  # the default, 0.05, now differs from what the checkpoint ran with
    unset_file = write_recipe(tmp_path / "unset.yaml", unset)
    unfinish(out, tmp_path)
    result = cli("train", unset_file, "--resume", out / "checkpoints" / "step-000002")
    assert result.exit_code == 0, result.output
    assert "resuming with the checkpoint's adapter.lora_dropout: 0.1; the recipe leaves it to its default, which " \
           "is 0.05" in result.output and "changed settings" not in result.output
    assert adapter_hash(out / "adapter") == finished
    assert yaml.safe_load((out / "recipe.yaml").read_text())["adapter"]["lora_dropout"] == 0.1
    result = cli("train", unset_file, "--resume", out / "checkpoints" / "step-000002", "--set",
                 "adapter.lora_dropout=0.05")
    assert result.exit_code == 4 and "adapter.lora_dropout: 0.1 → 0.05" in result.output, result.output


def test_resume_with_another_optimizers_state_is_refused_before_loading(run):
    """train.optimizer adamw → adamw_8bit under --allow-recipe-change loaded the model and then failed on the state
    ('param_groups.0.amsgrad'; 'the checkpoint is foreign, or train.optimizer changed'), and without the flag the
    refusal advised the flag; now one exit 4 before anything loads, naming both optimizers and what to do."""
    recipe, out = run(max_steps=4, save_every=2)
    assert cli("train", recipe).exit_code == 0
    before = tree_hash(out)
    for flags in ([], ["--allow-recipe-change"]):
        result = cli("train", recipe, "--resume", *flags, "--set", "train.optimizer=adamw_8bit")
        assert result.exit_code == 4, result.output
        assert "train.optimizer: adamw → adamw_8bit: the checkpoint holds torch AdamW state" in result.output
        assert "loading model" not in result.output and tree_hash(out) == before


def test_another_runs_checkpoint_is_not_continued_into_a_run(run, tmp_path):
    """`--resume A/checkpoints/step-N --output-dir B` with B a finished run of its own replaced B's adapter and
    recipe.yaml and cut B's metrics.jsonl to A's length at step N (exit 0); now exit 5 with B untouched. Into a new
    directory it still continues A's run there (a fork), and a copy of a run's own checkpoint (same recipe) still
    resumes into it (tests/cli/test_bad_inputs.py resumes damaged copies)."""
    recipe, a = run(max_steps=4, save_every=2)
    assert cli("train", recipe).exit_code == 0
    b = tmp_path / "b"
    assert cli("train", recipe, "--output-dir", b, "--set", "train.learning_rate=0.002").exit_code == 0
    before = tree_hash(b)
    result = cli("train", recipe, "--output-dir", b, "--resume", a / "checkpoints" / "step-000002")
    assert result.exit_code == 5, result.output
    assert "holds a run with another recipe (train.learning_rate: 0.001 → 0.002)" in result.output
    assert tree_hash(b) == before
    fork = cli("train", recipe, "--output-dir", tmp_path / "c", "--resume", a / "checkpoints" / "step-000002")
    assert fork.exit_code == 0, fork.output
    assert adapter_hash(tmp_path / "c" / "adapter") == adapter_hash(a / "adapter")


@pytest.mark.parametrize("change, shown", [
    ("adapter.r=8", "adapter.r: 4 → 8"),
    ("adapter.method=dora", "adapter.method: 'lora' → 'dora'"),
    ("adapter.layer_replication=[[0, 2], [1, 2]]", "adapter.layer_replication: '<unset>' → [[0, 2], [1, 2]]"),
])
def test_resume_with_other_adapter_shapes_is_refused_before_loading(run, change, shown):
    """adapter.r (method, ...) changed under --allow-recipe-change was refused only after the base model loaded
    ('its adapter does not fit this model (...lora_A... [4, 64] vs ... [8, 64])'), and without the flag the refusal
    advised the flag; now exit 4 from the recipes alone, before anything loads."""
    recipe, out = run(max_steps=4, save_every=2)
    assert cli("train", recipe).exit_code == 0
    before = tree_hash(out)
    for flags in ([], ["--allow-recipe-change"]):
        result = cli("train", recipe, "--resume", out / "checkpoints" / "step-000002", *flags, "--set", change)
        assert result.exit_code == 4, result.output
        assert f"its adapter does not fit this model ({shown}: other adapter tensors)" in " ".join(result.output.split())
        assert "loading model" not in result.output and "tokenizing" not in result.output
        assert tree_hash(out) == before


def test_resume_past_the_new_last_step_is_refused(run):
    """train.max_steps lowered below the checkpoint's step under --allow-recipe-change saved the step-4 adapter as
    a finished 2-step run (exit 0); now exit 4 naming the key, the run directory untouched. Equal is fine: the
    checkpoint's adapter is then the run's."""
    recipe, out = run(max_steps=6, save_every=4)
    assert cli("train", recipe).exit_code == 0
    before = tree_hash(out)
    result = cli("train", recipe, "--resume", "--allow-recipe-change", "--set", "train.max_steps=2")
    assert result.exit_code == 4, result.output
    assert "past this recipe's last step 2 (train.max_steps: 2)" in result.output
    assert "raise train.max_steps above 4" in result.output
    assert tree_hash(out) == before
    result = cli("train", recipe, "--resume", "--allow-recipe-change", "--set", "train.max_steps=4")
    assert result.exit_code == 0, result.output


def test_resume_from_explicit_older_checkpoint_sets_newer_aside(run, tmp_path):
    recipe, out = run(max_steps=6, save_every=2, keep_last=3)
    assert cli("train", recipe).exit_code == 0
    reference = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    unfinish(out, tmp_path)
    result = cli("train", recipe, "--resume", out / "checkpoints" / "step-000002")
    assert result.exit_code == 0, result.output
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == reference
    superseded = list((out / "checkpoints").glob("superseded-*/step-*"))
    assert sorted(p.name for p in superseded) == ["step-000004"]


def test_non_finite_loss_stops_with_exit_6(run):
    # Updates of 1e30 into the residual stream overflow RMSNorm's variance at the second step.
    recipe, out = run(adapter={"target_modules": "all-linear"}, max_steps=8, save_every=1, learning_rate=1e30,
                      max_grad_norm=0)
    result = cli("train", recipe)
    assert result.exit_code == 6, result.output
    assert "step 2: loss nan" in result.output and "learning rate too high" in result.output
    assert "last good checkpoint: " + str(out / "checkpoints" / "step-000001") in result.output.replace("\n", "")
    assert "Traceback" not in result.output
    for path in (out / "checkpoints").glob("step-*/adapter/adapter_model.safetensors"):
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(path).values())
    assert not (out / "adapter").exists()


def test_failed_save_exits_4_and_resume_continues(run, monkeypatch):
    recipe, out = run(max_steps=6, save_every=2)
    monkeypatch.setenv(CHECKPOINT_FAULT_ENV, "enospc:optimizer:4")
    result = cli("train", recipe)
    assert result.exit_code == 4 and "No space left on device" in result.output
    assert [p.name for _, p in read.list_checkpoints(out / "checkpoints")] == ["step-000002"]
    read.verify_checkpoint(out / "checkpoints" / "step-000002")
    monkeypatch.delenv(CHECKPOINT_FAULT_ENV)
    assert cli("train", recipe, "--resume").exit_code == 0


def test_epoch_end_checkpoints(run):
    recipe, out = run(max_steps=9, save_each_epoch=True)  # 16 examples / 4 per step: 4 steps per epoch
    assert cli("train", recipe).exit_code == 0
    assert [s for s, _ in read.list_checkpoints(out / "checkpoints")] == [4, 8]
    state = json.loads((out / "checkpoints" / "step-000008" / "trainer_state.json").read_text())
    assert state["data"]["epoch"] == 2 and state["data"]["offset"] == 0 and state["micro_step"] == 0


def test_copy_of_checkpoint_resumes_elsewhere(run, tmp_path):
    recipe, out = run(max_steps=4, save_every=2)
    assert cli("train", recipe).exit_code == 0
    copy = tmp_path / "copied-step"
    shutil.copytree(out / "checkpoints" / "step-000002", copy)
    result = cli("train", recipe, "--output-dir", tmp_path / "run2", "--resume", copy)
    assert result.exit_code == 0, result.output


def test_resume_reads_the_residual_adapter_when_there_is_one():
    """A PiSSA/OLoRA checkpoint's adapter/ is converted (for tools); resume continues from residual_adapter/. One
    written before the conversion existed has adapter/ alone, unconverted, and still resumes from it."""
    plain = {"adapter/adapter_config.json": {}, "adapter/adapter_model.safetensors": {}}
    rewriting = {**plain, "residual_adapter/adapter_config.json": {}, "residual_adapter/adapter_model.safetensors": {}}
    assert read.resume_weights(plain) == "adapter/adapter_model.safetensors"
    assert read.resume_weights(rewriting) == "residual_adapter/adapter_model.safetensors"
