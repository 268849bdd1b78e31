"""The resume guarantee: kill `lorakit train` anywhere (SIGKILL mid-epoch, inside an accumulation window, while
a checkpoint is written), resume, repeat; the final adapter is bitwise the uninterrupted run's and the
metrics log from each resume point on is the same.

Real processes on the tiny fp32 model with lora_dropout > 0. Kill points are chosen by watching
metrics.jsonl and the checkpoint directory, or by the test-only fault hook inside write_checkpoint
(LORAKIT_TEST_CHECKPOINT_FAULT, see docs/checkpoints.md). 10 SIGKILLs, one SIGTERM, one double SIGINT; and one
SIGKILL per other adapter method (bottleneck, prompt, prefix, DoRA, IA3) and of a LoRA run on an NF4 base.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorakit.faults import CHECKPOINT_FAULT_ENV
from lorakit.checkpoint.read import list_checkpoints
from run_helpers import (adapter_hash, recipe_dict, sigint_as_from_a_terminal, subprocess_env, training_records,
                         tree_hash, write_data, write_recipe)

pytestmark = pytest.mark.slow

# 40 rows, 4 held out for eval: 36 train rows / 4 per step = 9 steps per epoch; 24 steps ≈ 2.7 epochs.
TRAIN = dict(max_steps=24, save_every=3, keep_last=2, eval_every=4)


def logged_steps(run: Path) -> list[int]:
    try:  # not there yet, or just moved aside by --overwrite
        text = (run / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    steps = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if "loss" in record:
            steps.append(record["step"])
    return steps


def after_step(run: Path, step: int):
    return lambda: step in logged_steps(run)


def when_checkpoint(run: Path, step: int):
    return lambda: (run / "checkpoints" / f"step-{step:06d}").is_dir()


def train(recipe: Path, *args, when=None, send=signal.SIGKILL, twice=False, fault=None) -> tuple[int, str]:
    """Run `lorakit train RECIPE ARGS`; when ``when()`` turns true, send ``send`` (twice: a second Ctrl-C)."""
    env = subprocess_env(**({CHECKPOINT_FAULT_ENV: fault} if fault else {}))
    log_path = recipe.with_suffix(f".{time.monotonic_ns()}.log")
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorakit", "train", str(recipe), *map(str, args)],
            stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=sigint_as_from_a_terminal,
        )
        deadline = time.monotonic() + 600
        while proc.poll() is None:
            if when is not None and when():
                proc.send_signal(send)
                if twice:
                    time.sleep(0.02)
                    proc.send_signal(send)
                when = None
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("lorakit train did not finish in 600 s")
            time.sleep(0.005)
        log.seek(0)
        return proc.returncode, log.read()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("resume")
    data = write_data(root / "train.jsonl", 40)

    def recipe_for(name: str) -> tuple[Path, Path]:
        out = root / name
        recipe = recipe_dict(tiny_model_dir, data, out, **TRAIN)
        recipe["data"]["eval_split"] = 0.1
        return write_recipe(root / f"{name}.yaml", recipe), out

    recipe, out = recipe_for("reference")
    code, output = train(recipe)
    assert code == 0, output
    reference = {
        "adapter": (out / "adapter" / "adapter_model.safetensors").read_bytes(),
        "records": training_records(out / "metrics.jsonl"),
    }
    assert [r["step"] for r in reference["records"] if "loss" in r] == list(range(1, 25))
    return recipe_for, reference


def assert_same_as_reference(out: Path, reference: dict) -> None:
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == reference["adapter"]
    assert training_records(out / "metrics.jsonl") == reference["records"]


def test_killed_anywhere_and_resumed_repeatedly_equals_uninterrupted(setup):
    recipe_for, reference = setup
    recipe, out = recipe_for("chain-a")
    ckpts = out / "checkpoints"

    # 1. SIGKILL mid-epoch, inside step 5's accumulation window (the line of step 4 was just written).
    code, _ = train(recipe, when=after_step(out, 4))
    assert code == -signal.SIGKILL
    # 2. SIGKILL while step-6 is written: the adapter is on disk, the optimizer state is not.
    code, output = train(recipe, "--resume", fault="kill:optimizer:6")
    assert code == -signal.SIGKILL, output[-3000:]
    assert (ckpts / "step-000006.tmp").is_dir() and not (ckpts / "step-000006").exists()
    # 3. SIGKILL after every file of step-9 but before its manifest.
    code, output = train(recipe, "--resume", fault="kill:manifest:9")
    assert code == -signal.SIGKILL, output[-3000:]
    assert "step-000006.tmp" in output  # reported and skipped on the way
    assert (ckpts / "step-000009.tmp" / "trainer_state.json").is_file()
    # 4. SIGKILL the moment step-12 is committed.
    code, _ = train(recipe, "--resume", when=when_checkpoint(out, 12))
    assert code == -signal.SIGKILL
    # 5. SIGKILL after step-15 is committed but before the old checkpoints are rotated away.
    code, _ = train(recipe, "--resume", fault="kill:rotate:15")
    assert code == -signal.SIGKILL and {12, 15} <= {s for s, _ in list_checkpoints(ckpts)}
    # 6. SIGKILL at the epoch boundary: step 19 is the first step of the third epoch.
    code, _ = train(recipe, "--resume", when=after_step(out, 18))
    assert code == -signal.SIGKILL
    # 7. SIGTERM: finish the step, write a checkpoint, exit 75 with the command that resumes.
    code, output = train(recipe, "--resume", when=after_step(out, 20), send=signal.SIGTERM)
    assert code == 75, output
    assert "resume with: lorakit train" in output and "--resume" in output and "Traceback" not in output
    stopped_at = max(s for s, _ in list_checkpoints(ckpts))
    assert 21 <= stopped_at <= 23
    code, output = train(recipe, "--resume")
    assert code == 0, output
    assert f"resuming from {ckpts / f'step-{stopped_at:06d}'}" in output
    assert_same_as_reference(out, reference)


def test_killed_during_first_checkpoint_then_overwrite_and_resume(setup):
    recipe_for, reference = setup
    recipe, out = recipe_for("chain-b")
    ckpts = out / "checkpoints"

    # 8. SIGKILL while the very first checkpoint's adapter is written: nothing complete to resume from.
    code, _ = train(recipe, fault="kill:adapter:3")
    assert code == -signal.SIGKILL
    before = tree_hash(out)
    code, output = train(recipe, "--resume")
    assert code == 4 and "no complete checkpoint" in output and "step-000003.tmp" in output, output
    assert tree_hash(out) == before  # a refused resume changes nothing
    # 9. Start over with --overwrite (the old attempt is moved aside) and SIGKILL mid-epoch.
    code, _ = train(recipe, "--overwrite", when=after_step(out, 7))
    assert code == -signal.SIGKILL
    assert [p.name for p in out.parent.glob("chain-b.replaced-*")]
    # 10. SIGKILL while step-12's RNG states are written.
    code, _ = train(recipe, "--resume", fault="kill:rng:12")
    assert code == -signal.SIGKILL and max(s for s, _ in list_checkpoints(ckpts)) == 9
    # 11. SIGKILL right after step 14, inside step 15's window.
    code, _ = train(recipe, "--resume", when=after_step(out, 14))
    assert code == -signal.SIGKILL
    # 12. Ctrl-C twice: stop at once (or, if the step already ended, after its checkpoint); exit 75 either way.
    code, output = train(recipe, "--resume", when=after_step(out, 17), send=signal.SIGINT, twice=True)
    assert code == 75 and "Traceback" not in output, output
    code, output = train(recipe, "--resume")
    assert code == 0, output
    assert_same_as_reference(out, reference)


NON_PEFT_LAYOUT_ADAPTERS = {
    # lorakit's own adapter method (bottleneck_*.json/.safetensors, not PEFT's files)
    "bottleneck": {"method": "bottleneck", "r": 4, "dropout": 0.1},
    # PEFT saves a prompt-learning adapter as one tensor (prompt_embeddings), which it loads into the prompt
    # encoder itself while listing it as unexpected: a resume must accept it, not refuse the checkpoint.
    "prompt": {"method": "prompt", "num_virtual_tokens": 4, "r": None},
    "prefix": {"method": "prefix", "num_virtual_tokens": 4, "r": None},
    # ... and with prefix_projection only the projection's output, which cannot be trained on: the checkpoint
    # keeps the prompt encoder's own weights beside it.
    "prefix-projection": {"method": "prefix", "num_virtual_tokens": 4, "r": None, "prefix_projection": True,
                          "encoder_hidden_size": 16},
}


# The other methods and a 4-bit base: PEFT's layout, but state the LoRA run above does not have (DoRA magnitudes,
# IA3 vectors, bitsandbytes' NF4 weights that a resumed run reloads and must quantize identically).
OTHER_ADAPTERS = {
    "dora": {"method": "dora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
    "ia3": {"method": "ia3", "r": None, "target_modules": ["k_proj", "down_proj"],
            "feedforward_modules": ["down_proj"]},
    "lora-nf4": {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"], "quantization": "nf4"},
}


@pytest.mark.parametrize("method", {**NON_PEFT_LAYOUT_ADAPTERS, **OTHER_ADAPTERS})
def test_killed_while_checkpointing_resumes_bitwise_for_every_adapter_layout(tmp_path, tiny_model_dir, method):
    data = write_data(tmp_path / "train.jsonl", 16)
    adapter = {"lora_dropout": None, "target_modules": None, **NON_PEFT_LAYOUT_ADAPTERS.get(method, {}),
               **OTHER_ADAPTERS.get(method, {})}
    quantization = adapter.pop("quantization", "none")

    def recipe_for(name: str) -> tuple[Path, Path]:
        out = tmp_path / name
        recipe = recipe_dict(tiny_model_dir, data, out, adapter, max_steps=6, save_every=2)
        recipe["model"]["quantization"] = quantization
        return write_recipe(tmp_path / f"{name}.yaml", recipe), out

    reference_recipe, reference = recipe_for("reference")
    code, output = train(reference_recipe)
    assert code == 0, output
    recipe, out = recipe_for("interrupted")
    ckpts = out / "checkpoints"
    # SIGKILL while step-4 is written, after its adapter files: the resume skips it and continues from step-2.
    code, _ = train(recipe, fault="kill:rng:4")
    assert code == -signal.SIGKILL and (ckpts / "step-000004.tmp" / "adapter").is_dir()
    if method == "bottleneck":
        assert sorted(p.name for p in (ckpts / "step-000002" / "adapter").iterdir()) == [
            "bottleneck_config.json", "bottleneck_model.safetensors"]
    code, output = train(recipe, "--resume")
    assert code == 0, output
    assert f"resuming from {ckpts / 'step-000002'} at step 2" in output.replace("\n", "")
    assert adapter_hash(out / "adapter") == adapter_hash(reference / "adapter")  # weights, config, tokenizer
    assert training_records(out / "metrics.jsonl") == training_records(reference / "metrics.jsonl")


def test_resume_names_the_data_source_that_changed():
    """Two sources, one edited with the same row count: exit 4 names that source only."""
    from types import SimpleNamespace

    from lorakit.checkpoint.resume import _check_same_content
    from lorakit.errors import CheckpointError

    state = {"data": {"fingerprint": "whole-1", "sources": {"a.jsonl": "x", "b.jsonl": "y"}}}
    now = {"fingerprint": "whole-2", "sources": {"a.jsonl": "x", "b.jsonl": "z"}}
    with pytest.raises(CheckpointError, match="data.train source b.jsonl changed since this checkpoint") as e:
        _check_same_content(SimpleNamespace(path="step-2"), state, now, False, print)
    assert e.value.exit_code == 4
    said = []
    _check_same_content(SimpleNamespace(path="step-2"), state, now, True, said.append)  # --allow-recipe-change
    assert "continuing on the new data" in said[0]
    _check_same_content(SimpleNamespace(path="step-2"), state, {**now, "fingerprint": "whole-1"}, False, print)
