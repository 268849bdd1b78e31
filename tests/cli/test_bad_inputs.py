"""The bad-input corpus: every case ends with its documented exit code, one error line naming the key, file or
line and the fix, no traceback, and an existing run directory byte-for-byte unchanged (nothing half-written).

Cases run in-process through the Typer app (fast); a handful also as real processes. README.md's
"Bad-input corpus" paragraph summarises this table.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from lorakit.checkpoint.format import MANIFEST
from lorakit.data.sources import content_hash
from run_helpers import cli, lorakit, recipe_dict, tree_hash, write_data, write_recipe

PWNED = "lorakit-corpus-pwned"  # a file the malicious payloads below would create if they ever ran


@dataclass
class Ctx:
    tmp: Path
    model: Path
    other_model: Path
    data: Path
    run: Path
    run_recipe: Path

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def recipe(self, set: dict | None = None, drop: tuple = (), text: str | None = None, name="recipe.yaml") -> Path:
        """A valid recipe writing to a fresh dir, with dotted keys set or dropped (or raw YAML ``text``)."""
        path = self.tmp / name
        if text is not None:
            path.write_text(text)
            return path
        recipe = recipe_dict(self.model, self.data, self.out, max_steps=2)
        for key, value in (set or {}).items():
            *parents, leaf = key.split(".")
            node = recipe
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        for key in drop:
            *parents, leaf = key.split(".")
            node = recipe
            for part in parents:
                node = node[part]
            del node[leaf]
        return write_recipe(path, recipe)

    def data_file(self, lines: list[str], name="bad.jsonl") -> Path:
        path = self.tmp / name
        path.write_text("".join(line + "\n" for line in lines))
        return path

    def damaged_checkpoint(self, damage: Callable[[Path], None], rehash: bool = False) -> Path:
        """A copy of the existing run's newest checkpoint, damaged; with ``rehash`` its manifest is made to match."""
        copy = self.tmp / "ckpt"
        shutil.copytree(self.run / "checkpoints" / "step-000004", copy)
        damage(copy)
        if rehash:
            manifest = json.loads((copy / MANIFEST).read_text())
            manifest["files"] = {
                p.relative_to(copy).as_posix(): {"size": p.stat().st_size, "sha256": content_hash(str(p))}
                for p in sorted(copy.rglob("*")) if p.is_file() and p.name != MANIFEST
            }
            (copy / MANIFEST).write_text(json.dumps(manifest))
        return copy

    def resume(self, checkpoint: Path, *extra) -> list:
        return ["train", self.run_recipe, "--resume", checkpoint, *extra]


def _rename_optimizer_param(checkpoint: Path) -> None:
    """The optimizer state of a parameter this model does not have (states are keyed by parameter name)."""
    path = checkpoint / "optimizer.json"
    data = json.loads(path.read_text())
    old = next(iter(data["state"]))
    data["state"]["base_model.model.no_such.weight"] = data["state"].pop(old)
    data["param_groups"][0]["params"] = [
        "base_model.model.no_such.weight" if n == old else n for n in data["param_groups"][0]["params"]]
    path.write_text(json.dumps(data))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _pickle_payload(path: Path) -> None:
    """A pickle that would create the PWNED file in the working directory when unpickled."""

    class Payload:
        def __reduce__(self):
            return (open, (PWNED, "w"))

    path.write_bytes(pickle.dumps(Payload()))


def _pickle_adapter(ctx: Ctx) -> Path:
    adapter = ctx.tmp / "pickle-adapter"
    shutil.copytree(ctx.run / "adapter", adapter)
    (adapter / "adapter_model.safetensors").unlink()
    _pickle_payload(adapter / "adapter_model.bin")
    return adapter


def _pickle_base(ctx: Ctx) -> Path:
    base = ctx.tmp / "pickle-base"
    shutil.copytree(ctx.model, base)
    for f in base.glob("*.safetensors"):
        f.unlink()
    _pickle_payload(base / "pytorch_model.bin")
    return base


def _foreign_dir(ctx: Ctx) -> Path:
    photos = ctx.tmp / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"meow")
    return photos


def _truncate(path: Path, size: int = 16) -> None:
    os.truncate(path, size)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


ROWS_OK = json.dumps({"instruction": "Say hi", "input": "", "output": "hi"})

# (id, exit code, args builder, substrings the error must contain)
CASES: list[tuple[str, int, Callable[[Ctx], list], tuple[str, ...]]] = [
    # --- recipes: exit 2 -------------------------------------------------------------------------------
    ("typo-key", 2, lambda c: ["train", c.recipe({"train.learning_rat": 1e-3})],
     ("train.learning_rat: unknown key", "did you mean learning_rate")),
    ("typo-section", 2, lambda c: ["train", c.recipe({"trian.max_steps": 3})],
     ("trian: unknown section", "did you mean train")),
    ("wrong-type-int", 2, lambda c: ["train", c.recipe({"train.max_steps": "ten"})], ("train.max_steps", "'ten'")),
    ("wrong-type-list", 2, lambda c: ["train", c.recipe({"adapter.r": [4]})], ("adapter.r",)),
    ("wrong-type-bool", 2, lambda c: ["train", c.recipe({"data.packing": "maybe"})], ("data.packing", "'maybe'")),
    ("r-zero", 2, lambda c: ["train", c.recipe({"adapter.r": 0})], ("adapter.r: must be > 0",)),
    ("r-negative", 2, lambda c: ["train", c.recipe({"adapter.r": -4})], ("adapter.r: must be > 0",)),
    ("alpha-zero", 2, lambda c: ["train", c.recipe({"adapter.lora_alpha": 0})], ("adapter.lora_alpha: must be > 0",)),
    ("dropout-one", 2, lambda c: ["train", c.recipe({"adapter.lora_dropout": 1.5})],
     ("adapter.lora_dropout: must be < 1",)),
    ("dropout-negative", 2, lambda c: ["train", c.recipe({"adapter.lora_dropout": -0.1})],
     ("adapter.lora_dropout: must be >= 0",)),
    ("lr-zero", 2, lambda c: ["train", c.recipe({"train.learning_rate": 0})], ("train.learning_rate: must be > 0",)),
    ("lr-negative", 2, lambda c: ["train", c.recipe({"train.learning_rate": -1e-4})],
     ("train.learning_rate: must be > 0",)),
    ("both-lengths", 2, lambda c: ["train", c.recipe({"train.epochs": 1})],
     ("train.max_steps / train.epochs", "both are set")),
    ("neither-length", 2, lambda c: ["train", c.recipe(drop=("train.max_steps",))],
     ("train.max_steps / train.epochs", "neither is set")),
    ("unknown-method", 2, lambda c: ["train", c.recipe({"adapter.method": "lorra"})],
     ("adapter.method", "did you mean lora")),
    ("unknown-scheduler", 2, lambda c: ["train", c.recipe({"train.lr_scheduler": "cosin"})],
     ("train.lr_scheduler", "did you mean cosine")),
    ("unknown-dtype", 2, lambda c: ["train", c.recipe({"model.dtype": "fp32"})], ("model.dtype", "'fp32'")),
    ("unknown-quantization", 2, lambda c: ["train", c.recipe({"model.quantization": "nf8"})],
     ("model.quantization", "did you mean nf4")),
    ("micro-batch-zero", 2, lambda c: ["train", c.recipe({"train.micro_batch_size": 0})],
     ("train.micro_batch_size: must be > 0",)),
    ("max-seq-len-zero", 2, lambda c: ["train", c.recipe({"data.max_seq_len": 0})], ("data.max_seq_len: must be > 0",)),
    ("both-warmups", 2, lambda c: ["train", c.recipe({"train.warmup_steps": 2, "train.warmup_ratio": 0.1})],
     ("train.warmup_steps / train.warmup_ratio",)),
    ("missing-section", 2, lambda c: ["train", c.recipe(drop=("data",))], ("data: required key is missing",)),
    ("missing-model-path", 2, lambda c: ["train", c.recipe({"model.name_or_path": str(c.tmp / "no-such-model")})],
     ("model.name_or_path", "not found")),
    ("model-path-is-file", 2, lambda c: ["train", c.recipe({"model.name_or_path": str(c.data)})],
     ("model.name_or_path", "is a file")),
    ("model-dir-not-hf", 2, lambda c: ["train", c.recipe({"model.name_or_path": str(c.tmp)})],
     ("model.name_or_path", "no config.json")),
    ("target-typo", 2, lambda c: ["train", c.recipe({"adapter.target_modules": ["qproj"]})],
     ("adapter.target_modules", "did you mean q_proj")),
    ("peft-key-typo", 2, lambda c: ["train", c.recipe({"adapter.use_rslorra": True})],
     ("adapter.use_rslorra", "did you mean use_rslora")),
    ("quantization-model-cannot-take", 2,
     lambda c: ["train", c.recipe({"model.quantization": "int8", "adapter.method": "dora"})],
     ("adapter.method: dora on an int8 base", "use model.quantization: nf4")),
    ("yaml-python-tag", 2, lambda c: ["train", c.recipe(text=f"model: !!python/object/apply:os.system ['touch {PWNED}']\n")],
     ("recipe.yaml", "invalid YAML")),
    ("yaml-syntax", 2, lambda c: ["train", c.recipe(text="model:\n  name_or_path: x\n dtype: float32\n")],
     ("recipe.yaml:3", "invalid YAML")),
    ("recipe-not-mapping", 2, lambda c: ["train", c.recipe(text="- model\n- data\n")], ("must be a mapping",)),
    ("recipe-empty", 2, lambda c: ["train", c.recipe(text="")], ("the recipe is empty", "lorakit init")),
    # --- command line: exit 2 --------------------------------------------------------------------------
    ("set-without-value", 2, lambda c: ["train", c.recipe(), "--set", "train.learning_rate"], ("--set", "KEY=VALUE")),
    ("set-unknown-key", 2, lambda c: ["train", c.recipe(), "--set", "train.lr=1e-4"], ("train.lr: unknown key",)),
    ("set-wrong-type", 2, lambda c: ["train", c.recipe(), "--set", "train.max_steps=abc"], ("train.max_steps", "'abc'")),
    ("missing-recipe", 2, lambda c: ["train", c.tmp / "nowhere.yaml"], ("nowhere.yaml", "not found")),
    ("resume-and-overwrite", 2, lambda c: ["train", c.run_recipe, "--resume", "--overwrite"],
     ("--resume and --overwrite",)),
    ("checkpoint-without-resume", 2, lambda c: ["train", c.run_recipe, c.run / "checkpoints" / "step-000004"],
     ("--resume",)),
    ("allow-change-without-resume", 2, lambda c: ["train", c.recipe(), "--allow-recipe-change"],
     ("--allow-recipe-change applies only with --resume",)),
    # --- safety: exit 5 --------------------------------------------------------------------------------
    ("run-dir-not-empty", 5, lambda c: ["train", c.run_recipe], ("is not empty", "--resume", "--overwrite")),
    ("overwrite-foreign-dir", 5, lambda c: ["train", c.recipe(), "--output-dir", _foreign_dir(c), "--overwrite"],
     ("not a lorakit run",)),
    ("output-is-file", 5, lambda c: ["train", c.recipe(), "--output-dir", c.data], ("is a file", "--output-dir")),
    ("remote-code-unpinned", 5,
     lambda c: ["train", c.recipe({"model.name_or_path": "someorg/somemodel", "model.trust_remote_code": True})],
     ("model.trust_remote_code", "model.revision")),
    ("pickle-base", 5, lambda c: ["train", c.recipe({"model.name_or_path": str(_pickle_base(c))})],
     ("pytorch_model.bin", "--allow-pickle")),
    # --- data: exit 3 ----------------------------------------------------------------------------------
    ("data-missing-file", 3, lambda c: ["train", c.recipe({"data.train": str(c.tmp / "none.jsonl")})],
     ("none.jsonl", "not found")),
    ("data-empty-file", 3, lambda c: ["train", c.recipe({"data.train": str(c.data_file([]))})],
     ("bad.jsonl", "is empty")),
    ("data-bad-json-line", 3, lambda c: ["train", c.recipe({"data.train": str(c.data_file([ROWS_OK, ROWS_OK, "{oops"]))})],
     ("bad.jsonl:3", "invalid JSON", "fix")),
    ("data-wrong-field-type", 3,
     lambda c: ["train", c.recipe({"data.train": str(c.data_file([ROWS_OK, '{"instruction": "x", "output": 123}']))})],
     ("bad.jsonl:2", "'output'", "must be a str")),
    ("data-missing-field", 3,
     lambda c: ["train", c.recipe({"data.train": str(c.data_file(['{"instruction": "x", "answer": "y"}']))})],
     ("bad.jsonl:1", "missing field 'output'", "data.fields")),
    ("data-row-not-object", 3, lambda c: ["train", c.recipe({"data.train": str(c.data_file([ROWS_OK, "[1, 2]"]))})],
     ("bad.jsonl:2", "expected a JSON object")),
    ("data-all-rows-too-long", 3,
     lambda c: ["train", c.recipe({"data.max_seq_len": 8, "data.truncation": "drop"})],
     ("data.train", "no usable rows", "data.max_seq_len")),
    ("data-bad-chat-messages", 3,
     lambda c: ["train", c.recipe({"data.format": "chat", "data.train": str(c.data_file(['{"messages": "hi"}']))})],
     ("bad.jsonl:1", "messages")),
    # --- checkpoints: exit 4 (resumed into the existing run, which must stay as it was) ----------------
    ("ckpt-truncated", 4, lambda c: c.resume(c.damaged_checkpoint(lambda p: _truncate(p / "optimizer.safetensors"))),
     ("optimizer.safetensors", "truncated")),
    ("ckpt-modified", 4,
     lambda c: c.resume(c.damaged_checkpoint(lambda p: _flip_byte(p / "adapter" / "adapter_model.safetensors"))),
     ("adapter_model.safetensors", "sha256")),
    ("ckpt-missing-rng", 4, lambda c: c.resume(c.damaged_checkpoint(lambda p: (p / "rng.safetensors").unlink())),
     ("rng.safetensors is missing",)),
    ("ckpt-interrupted-write", 4, lambda c: c.resume(c.damaged_checkpoint(lambda p: (p / MANIFEST).unlink())),
     ("no manifest.json", "interrupted")),
    ("ckpt-foreign-dir", 4, lambda c: c.resume(c.data_file(["{}"], name="trainer_state.json").parent),
     ("no manifest.json", "not a lorakit checkpoint")),
    ("ckpt-foreign-manifest", 4,
     lambda c: c.resume(c.damaged_checkpoint(lambda p: _edit_json(p / MANIFEST, format="hf-trainer"))),
     ("not a lorakit checkpoint manifest",)),
    ("ckpt-newer-format", 4,
     lambda c: c.resume(c.damaged_checkpoint(lambda p: _edit_json(p / MANIFEST, format_version=99))),
     ("newer lorakit", "upgrade")),
    ("ckpt-not-found", 4, lambda c: c.resume(c.tmp / "no-such-checkpoint"), ("not found",)),
    ("ckpt-nothing-to-resume", 4, lambda c: ["train", c.recipe(), "--resume"],
     ("no complete checkpoint", "without --resume")),
    ("ckpt-recipe-changed", 4, lambda c: ["train", c.run_recipe, "--resume", "--set", "train.learning_rate=0.01"],
     ("train.learning_rate: 0.001 → 0.01", "--allow-recipe-change")),
    ("ckpt-world-size-changed", 4,
     lambda c: c.resume(c.damaged_checkpoint(lambda p: _edit_json(p / "trainer_state.json", world_size=2), rehash=True)),
     ("world size (processes): 2 → 1",)),
    ("ckpt-optimizer-of-other-params", 4,
     lambda c: c.resume(c.damaged_checkpoint(_rename_optimizer_param, rehash=True)),
     ("optimizer or scheduler state does not fit this run",)),
    ("ckpt-data-changed", 4, lambda c: c.resume(c.damaged_checkpoint(
        lambda p: _edit_json(p / "trainer_state.json", data={"num_examples": 99}), rehash=True)),
     ("training data changed", "99 examples then")),
    ("ckpt-data-position-wrong", 4, lambda c: c.resume(c.damaged_checkpoint(
        lambda p: _edit_json(p / "trainer_state.json", data={"num_examples": 16, "epoch": 3, "offset": 0}),
        rehash=True)),
     ("data position (epoch 3", "is not where step 4 falls")),
    ("ckpt-forged-manifest", 4, lambda c: c.resume(c.damaged_checkpoint(lambda p: _edit_json(
        p / MANIFEST, files={**json.loads((p / MANIFEST).read_text())["files"], "../../x": {"size": 1}}))),
     ("'../../x'", "forged manifest")),
    # --- adapters: exit 4 / 5 --------------------------------------------------------------------------
    ("adapter-pickle-in-checkpoint", 4, lambda c: c.resume(c.damaged_checkpoint(lambda p: (
        (p / "adapter" / "adapter_model.safetensors").unlink(), _pickle_payload(p / "adapter" / "adapter_model.bin")),
        rehash=True)),
     ("adapter/adapter_model.safetensors is not in manifest.json",)),
    ("adapter-wrong-base-resume", 4,
     lambda c: ["train", c.recipe({"model.name_or_path": str(c.other_model)}), "--resume",
                c.run / "checkpoints" / "step-000004", "--allow-recipe-change"],
     ("does not fit this model", "the recipe that wrote it")),
    ("adapter-pickle-merge", 5, lambda c: ["merge", _pickle_adapter(c), "--output", c.out],
     ("adapter_model.bin", "--allow-pickle")),
    ("adapter-wrong-base-merge", 4, lambda c: ["merge", c.run / "adapter", "--base", c.other_model, "--output", c.out],
     ("is not the model the adapter was trained on", "hidden_size")),
]


@pytest.fixture(scope="module")
def existing(tmp_path_factory, tiny_model_dir):
    """A finished run with checkpoints at steps 2 and 4, and a second tiny model of another shape."""
    from lorakit.testing import build_tiny_llama

    root = tmp_path_factory.mktemp("corpus")
    data = write_data(root / "train.jsonl", 16)
    run = root / "run"
    recipe = write_recipe(root / "run.yaml", recipe_dict(tiny_model_dir, data, run, max_steps=5, save_every=2))
    result = cli("train", recipe)
    assert result.exit_code == 0, result.output
    other = build_tiny_llama(root / "other-model", hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
    return tiny_model_dir, other, data, run, recipe


@pytest.fixture
def ctx(tmp_path, existing, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a payload would drop PWNED
    model, other, data, run, recipe = existing
    work = tmp_path / "case"
    work.mkdir()
    return Ctx(work, model, other, data, run, recipe)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def check(ctx: Ctx, output: str, stderr: str, needles: tuple[str, ...], run_before: dict) -> None:
    assert "Traceback" not in output
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr
    line = " ".join(errors[0].split())
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert tree_hash(ctx.run) == run_before, "the existing run directory changed"
    assert not ctx.out.exists() or not any(ctx.out.iterdir()), "a refused command wrote output"
    assert not Path(PWNED).exists(), "a pickle or YAML payload ran"


@pytest.mark.parametrize("case_id, code, build, needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input(ctx, case_id, code, build, needles):
    before = tree_hash(ctx.run)
    result = cli(*build(ctx))
    assert result.exit_code == code, result.output
    check(ctx, result.output, result.stderr, needles, before)


def test_corpus_is_large_and_covers_every_area():
    ids = [c[0] for c in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)
    assert {c[1] for c in CASES} == {2, 3, 4, 5}
    for prefix in ("data-", "ckpt-", "adapter-", "set-"):
        assert any(i.startswith(prefix) for i in ids)
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert f"feeds lorakit {len(ids)} broken inputs" in readme  # the README's corpus summary stays current


SUBPROCESS_CASES = ["yaml-python-tag", "data-bad-json-line", "ckpt-truncated", "adapter-pickle-merge", "run-dir-not-empty"]


@pytest.mark.slow
@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_bad_input_as_a_real_process(ctx, case_id):
    _, code, build, needles = next(c for c in CASES if c[0] == case_id)
    before = tree_hash(ctx.run)
    proc = lorakit(*build(ctx))
    assert proc.returncode == code, proc.stderr
    check(ctx, proc.stdout + proc.stderr, proc.stderr, needles, before)
