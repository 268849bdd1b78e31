"""The bad-input corpus: every case ends with its documented exit code, one error line naming the key, file or
line and the fix, no traceback, and an existing run directory byte-for-byte unchanged (nothing half-written).

Cases run in-process through the Typer app (fast); a handful also as real processes. README.md's
"Bad-input corpus" paragraph summarises this table.
"""

from __future__ import annotations

import gzip
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
        """Continue ``checkpoint`` into a new directory: the run's own is finished, and resuming it says only that."""
        return ["train", self.run_recipe, "--resume", checkpoint, "--output-dir", self.tmp / "resumed", *extra]


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


def _dangling(ctx: Ctx) -> Path:
    link = ctx.tmp / "dangling"
    link.symlink_to(ctx.tmp / "nowhere")
    return link


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


def _alias_bomb(levels: int = 9) -> str:
    lines = ["model: {name_or_path: x}", "bomb:", "  a0: &a0 [q_proj, q_proj, q_proj, q_proj, q_proj, q_proj]"]
    lines += [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 6)}]" for i in range(1, levels)]
    return "\n".join(lines + [f"adapter: {{target_modules: *a{levels - 1}}}"]) + "\n"


def _bytes_file(ctx: "Ctx", name: str, data: bytes) -> Path:
    path = ctx.tmp / name
    path.write_bytes(data)
    return path


def _damaged_base(ctx: "Ctx", damage: Callable[[Path], None], name: str = "base") -> str:
    base = ctx.tmp / name
    shutil.copytree(ctx.model, base)
    damage(base)
    return str(base)


def _weights(base: Path) -> Path:
    return next(base.glob("*.safetensors"))


def _edit_config(**changes) -> Callable[[Path], None]:
    return lambda base: _edit_json(base / "config.json", **changes)


def _damaged_adapter(ctx: "Ctx", damage: Callable[[Path], None]) -> Path:
    adapter = ctx.tmp / "damaged-adapter"
    shutil.copytree(ctx.run / "adapter", adapter)
    damage(adapter)
    return adapter


def _broken_template(ctx: "Ctx") -> list:
    template = ctx.tmp / "broken.jinja"
    template.write_text("{% for message in messages %}{{ message['content'] }\n")
    data = ctx.data_file(['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'])
    return ["train", ctx.recipe({"data.format": "chat", "data.chat_template": str(template), "data.train": str(data)})]


ROWS_LATIN1 = ROWS_OK.replace("Say hi", "Caf\u00e9").encode("latin-1") + b"\n"

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
    ("missing-model-path-inspect", 2, lambda c: ["inspect", "--model", c.tmp / "no-such-model"],
     ("--model: ", "no-such-model' not found")),
    ("missing-model-path-generate", 2, lambda c: ["generate", "--model", c.tmp / "no-such-model", "--prompt", "hi"],
     ("--model: ", "no-such-model' not found")),
    # a flag's value that is wrong is named by the flag typed, not the recipe key it sets
    ("inspect-r-unused-by-method", 2, lambda c: ["inspect", "--model", c.model, "--method", "prompt", "--r", "4",
                                                 "--set", "adapter.num_virtual_tokens=4"],
     ("--r: not used by method prompt", "drop --r")),
    ("inspect-targets-match-nothing", 2, lambda c: ["inspect", "--model", c.model, "--targets", "zz"],
     ("--targets: 'zz' matches no module",)),
    ("estimate-memory-bad-optimizer", 2, lambda c: ["estimate-memory", "--model", c.model, "--optimizer", "sgd"],
     ("--optimizer: must be adamw",)),
    ("missing-tokenizer-path", 2, lambda c: ["train", c.recipe({"model.tokenizer": str(c.tmp / "no-such-tokenizer")})],
     ("model.tokenizer: ", "no-such-tokenizer' not found")),
    ("model-path-empty", 2, lambda c: ["train", c.recipe({"model.name_or_path": ""})],
     ("model.name_or_path: string should have at least 1 character",)),
    ("generate-model-empty", 2, lambda c: ["generate", "--model", "", "--prompt", "hi"], ("--model: String should have",)),
    ("model-revision-local", 2, lambda c: ["train", c.recipe({"model.revision": "main"})],
     ("model.revision: 'main' has no effect", "is a local path", "remove it")),
    ("double-quant-without-4bit", 2, lambda c: ["train", c.recipe({"model.double_quant": True})],
     ("model.double_quant: only applies to a 4-bit base", "remove it")),
    ("keep-last-without-checkpoints", 2, lambda c: ["train", c.recipe({"train.keep_last": 3})],
     ("train.keep_last: the run writes no checkpoints", "set train.save_every or remove it")),
    ("merge-base-empty", 2, lambda c: ["merge", c.run / "adapter", "-o", c.out, "--base", ""],
     ("--base: the value is empty", "drop --base")),
    ("model-path-is-file", 2, lambda c: ["train", c.recipe({"model.name_or_path": str(c.data)})],
     ("model.name_or_path", "is a file")),
    ("model-dir-not-hf", 2, lambda c: ["train", c.recipe({"model.name_or_path": str(_foreign_dir(c))})],
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
    ("set-empty-key-part", 2, lambda c: ["train", c.recipe(), "--set", "train..max_steps=3"],
     ("--set 'train..max_steps=3': expected KEY=VALUE",)),
    ("set-unparsable-value", 2, lambda c: ["train", c.recipe(), "--set", "adapter.target_modules=[q_proj"],
     ("--set adapter.target_modules: cannot parse value '[q_proj' as YAML (expected ',' or ']'",)),
    ("set-section-to-a-scalar-train", 2, lambda c: ["train", c.recipe(), "--set", "output=5", "--output-dir", c.out],
     ("output: must be a mapping of keys, got int 5",)),
    ("set-section-to-a-scalar-inspect", 2, lambda c: ["inspect", "--model", c.model, "--set", "model=5"],
     ("model: must be a mapping of keys",)),
    ("recipe-section-a-list-estimate", 2, lambda c: ["estimate-memory", c.recipe({"adapter": [1]})],
     ("adapter: must be a mapping of keys, got list",)),
    ("set-unknown-key", 2, lambda c: ["train", c.recipe(), "--set", "train.lr=1e-4"], ("train.lr: unknown key",)),
    ("set-wrong-type", 2, lambda c: ["train", c.recipe(), "--set", "train.max_steps=abc"], ("train.max_steps", "'abc'")),
    ("missing-recipe", 2, lambda c: ["train", c.tmp / "nowhere.yaml"], ("nowhere.yaml", "not found")),
    ("recipe-is-a-directory", 2, lambda c: ["validate", c.tmp], ("is a directory", "name the recipe's YAML file")),
    ("resume-and-overwrite", 2, lambda c: ["train", c.run_recipe, "--resume", "--overwrite"],
     ("--resume and --overwrite",)),
    ("checkpoint-without-resume", 2, lambda c: ["train", c.run_recipe, c.run / "checkpoints" / "step-000004"],
     ("--resume",)),
    ("allow-change-without-resume", 2, lambda c: ["train", c.recipe(), "--allow-recipe-change"],
     ("--allow-recipe-change applies only with --resume",)),
    # --- safety: exit 5 --------------------------------------------------------------------------------
    ("run-dir-not-empty", 5, lambda c: ["train", c.run_recipe], ("is not empty", "--resume", "--overwrite")),
    ("foreign-dir-is-not-a-run", 5, lambda c: ["train", c.recipe(), "--output-dir", _foreign_dir(c)],
     ("holds files lorakit did not write", "not a lorakit run")),
    ("overwrite-foreign-dir", 5, lambda c: ["train", c.recipe(), "--output-dir", _foreign_dir(c), "--overwrite"],
     ("not a lorakit run",)),
    ("output-is-file", 5, lambda c: ["train", c.recipe(), "--output-dir", c.run_recipe], ("is a file", "--output-dir")),
    ("output-is-the-data", 5, lambda c: ["train", c.recipe(), "--output-dir", c.data], ("is the data.train data",)),
    ("remote-code-unpinned", 5,
     lambda c: ["train", c.recipe({"model.name_or_path": "someorg/somemodel", "model.trust_remote_code": True})],
     ("model.trust_remote_code", "model.revision")),
    ("pickle-base", 5, lambda c: ["train", c.recipe({"model.name_or_path": str(_pickle_base(c))})],
     ("pytorch_model.bin", "--allow-pickle")),
    # --- data: exit 3 ----------------------------------------------------------------------------------
    ("data-missing-file", 3, lambda c: ["train", c.recipe({"data.train": str(c.tmp / "none.jsonl")})],
     ("none.jsonl", "not found")),
    ("data-missing-relative-file", 3, lambda c: ["train", c.recipe({"data.train": "data/none.jsonl"})],
     ("'data/none.jsonl' not found at /", "/data/none.jsonl; relative paths are read from the current directory")),
    ("data-empty-file", 3, lambda c: ["train", c.recipe({"data.train": str(c.data_file([]))})],
     ("bad.jsonl", "is empty")),
    ("data-bad-json-line", 3, lambda c: ["train", c.recipe({"data.train": str(c.data_file([ROWS_OK, ROWS_OK, "{oops"]))})],
     ("bad.jsonl:3", "invalid JSON", "fix")),
    ("data-truncated-json-array", 3, lambda c: ["train", c.recipe({"data.train": str(_bytes_file(
        c, "cut.json", b'[{"instruction": "a", "output": "b"}, {"instr'))})],
     ("cut.json:1: invalid JSON (Unterminated string starting at column 40)",)),
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
    ("ckpt-run-dir-given", 4, lambda c: c.resume(c.run), ("a folder of checkpoints, not one checkpoint", "step-0000")),
    ("ckpt-not-found-multiprocess", 4, lambda c: c.resume(c.tmp / "no-such-checkpoint", "--nproc", "2"),
     ("no-such-checkpoint: not found",)),
    ("ckpt-nothing-to-resume", 4, lambda c: ["train", c.recipe(), "--resume"],
     ("the folder does not exist (no complete checkpoint)", "without --resume")),  # once: "--overwrite to replace"
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
     lambda c: ["train", c.recipe({"model.name_or_path": str(c.other_model), "train.max_steps": 6}), "--resume",
                c.run / "checkpoints" / "step-000004", "--allow-recipe-change"],
     ("does not fit this model", "the recipe that wrote it")),
    ("adapter-pickle-merge", 5, lambda c: ["merge", _pickle_adapter(c), "--output", c.out],
     ("adapter_model.bin", "--allow-pickle")),
    ("merge-negative-shard-size", 2, lambda c: ["merge", c.run / "adapter", "-o", c.out, "--max-shard-size", "-5GB"],
     ("--max-shard-size -5GB: must be more than 0",)),
    ("adapter-wrong-base-merge", 4, lambda c: ["merge", c.run / "adapter", "--base", c.other_model, "--output", c.out],
     ("is not the model the adapter was trained on", "hidden_size")),
    ("adapter-wrong-base-generate", 4,
     lambda c: ["generate", "--model", c.other_model, "--adapter", f"a={c.run / 'adapter'}", "--prompt", "hi"],
     ("--adapter a: --model", "is not the model the adapter was trained on", "hidden_size")),
    ("adapter-wrong-base-unrecorded-generate", 4,
     lambda c: ["generate", "--model", c.other_model, "--adapter", "a=" + str(_damaged_adapter(
         c, lambda a: (a / "lorakit.json").unlink())), "--prompt", "hi"],
     ("PEFT cannot attach it", "size mismatch", "is --model the base it was trained on")),
    ("adapter-wrong-base-vllm-check", 4,
     lambda c: ["export", c.run / "adapter", "--check", "vllm", "--base", c.other_model],
     ("--base", "is not the model the adapter was trained on")),
    ("adapter-wrong-base-gguf-lora", 4, lambda c: ["export", c.run / "adapter", "--format", "gguf-lora", "-o",
                                                    c.tmp / "a.gguf", "--base", c.other_model],
     ("--base", "is not the model the adapter was trained on")),
    ("export-base-for-a-whole-model", 2, lambda c: ["export", c.model, "-o", c.tmp / "m.gguf", "--base", c.other_model],
     ("is a whole model, which needs no base; drop --base",)),
    # --- recipes the YAML reader refuses: exit 2 (issue 15: duplicate keys, alias bombs, encodings) ----------
    ("yaml-duplicate-section", 2, lambda c: ["train", c.recipe(text=c.recipe().read_text() + "train:\n  max_steps: 3\n")],
     ("key 'train' is given twice", "keep one")),
    ("yaml-duplicate-key-nested", 2,
     lambda c: ["train", c.recipe(text="model:\n  name_or_path: x\nadapter:\n  r: 4\n  r: 8\n")],
     ("recipe.yaml:5", "key 'r' is given twice, on lines 4 and 5")),
    ("yaml-duplicate-key-in-list", 2,
     lambda c: ["train", c.recipe(text="data:\n  fields: {output: a, output: b}\n")], ("key 'output' is given twice",)),
    ("yaml-alias-bomb", 2, lambda c: ["train", c.recipe(text=_alias_bomb())], ("aliases", "expand it to")),
    ("yaml-alias-bomb-in-set", 2,
     lambda c: ["train", c.recipe(), "--set", "adapter.target_modules=" + "[&a [x,x,x,x,x,x,x,x,x,x], " + ", ".join(
         f"&{n} [{', '.join([f'*{p}'] * 10)}]" for p, n in zip("abcdef", "bcdefg")) + "]"],
     ("--set adapter.target_modules", "aliases")),
    ("yaml-alias-loop", 2, lambda c: ["train", c.recipe(text="model: &m {name_or_path: *m}\n")], ("a loop",)),
    ("yaml-deep-nesting", 2, lambda c: ["train", c.recipe(text="model: " + "[" * 3000 + "]" * 3000 + "\n")],
     ("nested too deeply",)),
    ("yaml-deep-but-parsable", 2, lambda c: ["train", c.recipe(text="model: " + "[" * 150 + "]" * 150 + "\n")],
     ("nested too deeply (151 levels",)),
    ("recipe-latin1", 2, lambda c: ["train", _bytes_file(c, "latin.yaml", "model: {name_or_path: caf\u00e9}\n".encode(
        "latin-1"))], ("latin.yaml:1", "not UTF-8 text", "save it as UTF-8")),
    ("recipe-gzip", 2, lambda c: ["train", _bytes_file(c, "r.yaml", gzip.compress(c.recipe().read_bytes()))],
     ("gzip-compressed", "decompress")),
    ("recipe-utf16", 2, lambda c: ["train", _bytes_file(c, "r16.yaml", c.recipe().read_text().encode("utf-16"))],
     ("UTF-16",)),
    ("recipe-too-large", 2, lambda c: ["train", _bytes_file(c, "big.yaml", b"# " + b"x" * (2 << 20) + b"\n")],
     ("more than a recipe can be",)),
    # --- numbers the schema let through but no run can use: exit 2 ----------------------------------------
    ("seed-negative", 2, lambda c: ["train", c.recipe({"train.seed": -1})], ("train.seed: must be >= 0",)),
    ("seed-too-large", 2, lambda c: ["train", c.recipe({"train.seed": 2**40})], ("train.seed: must be <= 4294967295",)),
    ("lr-infinite", 2, lambda c: ["train", c.recipe(), "--set", "train.learning_rate=.inf"],
     ("train.learning_rate", "finite")),
    ("warmup-ratio-nan", 2, lambda c: ["train", c.recipe(), "--set", "train.warmup_ratio=.nan"], ("train.warmup_ratio",)),
    ("r-bool", 2, lambda c: ["train", c.recipe({"adapter.r": True})], ("adapter.r: must be a number, got True",)),
    ("max-steps-bool", 2, lambda c: ["train", c.recipe(), "--set", "train.max_steps=true"],
     ("train.max_steps: must be a number",)),
    ("r-beyond-memory", 2, lambda c: ["train", c.recipe({"adapter.r": 10**9})],
     ("adapter.r: 1,000,000,000", "more than", "lower adapter.r")),
    ("r-beyond-memory-dora", 2, lambda c: ["train", c.recipe({"adapter.r": 10**9, "adapter.method": "dora"})],
     ("adapter.r", "lower adapter.r")),
    ("eval-split-takes-all", 2, lambda c: ["train", c.recipe({"data.eval_split": 0.99})],
     ("data.eval_split: 0.99 holds out all 16 rows", "smaller fraction")),
    ("chat-template-syntax", 2, _broken_template, ("broken.jinja", "Jinja syntax error on line 1")),
    ("attention-package-missing", 2, lambda c: ["train", c.recipe({"model.attn_implementation": "flash_attention_2"})],
     ("model.attn_implementation", "flash-attn")),
    # --- click's own usage errors, as one line: exit 2 ------------------------------------------------------
    ("option-nproc-zero", 2, lambda c: ["train", c.recipe(), "--nproc", "0"], ("'--nproc'", "greater than or equal")),
    ("option-batch-size-negative", 2, lambda c: ["estimate-memory", "--model", "mistral-7b", "--batch-size", "-1"],
     ("'--batch-size'",)),
    ("missing-argument", 2, lambda c: ["merge"], ("Missing argument", "--help")),
    ("unknown-command", 2, lambda c: ["trian"], ("No such command",)),
    ("device-unknown-eval", 2, lambda c: ["eval", c.run, "--data", c.data, "--device", "tpu"],
     ("--device tpu", "choose cpu or cuda")),
    ("device-absent-generate", 2, lambda c: ["generate", "--model", c.model, "--prompt", "hi", "--device", "cuda:99"],
     ("--device cuda:99", "torch sees")),
    ("device-unknown-merge", 2, lambda c: ["merge", c.run / "adapter", "-o", c.out, "--device", "cpu:0"],
     ("--device cpu:0", "choose cpu or cuda")),
    # --- outputs that cannot be written, refused before anything loads: exit 2 -----------------------------
    ("output-dangling-symlink", 2, lambda c: ["train", c.recipe(), "--output-dir", _dangling(c)],
     ("dangling symbolic link",)),
    ("output-under-a-file", 2, lambda c: ["train", c.recipe(), "--output-dir", c.data / "run"], ("is a file",)),
    ("output-empty", 2, lambda c: ["train", c.recipe(), "--output-dir", ""], ("the path is empty",)),
    ("output-current-dir", 2, lambda c: ["train", c.recipe(), "--output-dir", "."], ("current directory",)),
    ("output-read-only", 2, lambda c: ["train", c.recipe(), "--output-dir", "/proc/lorakit-run"], ("cannot write",)),
    ("merge-output-read-only", 2, lambda c: ["merge", c.run / "adapter", "-o", "/proc/lorakit-merged"],
     ("cannot write",)),
    ("init-output-is-a-dir", 2, lambda c: ["init", "-o", c.tmp, "--force"], ("a directory", "name a file")),
    ("init-output-dangling", 2, lambda c: ["init", "-o", _dangling(c), "--force"], ("dangling symbolic link",)),
    ("schema-output-is-a-dir", 2, lambda c: ["schema", "-o", c.tmp], ("a directory", "/recipe.schema.json")),
    ("schema-over-a-user-file", 5, lambda c: ["schema", "-o", c.data], ("not a lorakit recipe schema",)),
    ("plot-output-is-a-dir", 2, lambda c: ["plot", c.run, "-o", c.tmp], ("a directory", "e.g. ", "/loss.png")),
    ("plot-output-under-a-file", 2, lambda c: ["plot", c.run, "-o", c.data / "x.png"], ("is a file",)),
    # pathlib reads '' as '.': an empty -o was taken for the current directory
    ("init-output-empty", 2, lambda c: ["init", "-o", "", "--force"], ("'--output' / '-o'", "the path is empty")),
    ("schema-output-empty", 2, lambda c: ["schema", "-o", ""], ("'-o'", "the path is empty")),
    ("plot-output-empty", 2, lambda c: ["plot", c.run, "-o", ""], ("'-o'", "the path is empty")),
    ("eval-output-empty", 2, lambda c: ["eval", c.run, "--data", c.data, "-o", ""], ("'-o'", "the path is empty")),
    ("export-output-empty", 2, lambda c: ["export", c.run, "-o", " "], ("'-o'", "the path is empty")),
    ("export-output-only-a-suffix", 2, lambda c: ["export", c.run, "-o", c.tmp / ".gguf"], ("name it model.gguf",)),
    # --- damaged or inconsistent base models: exit 2, before the weights load ------------------------------
    ("base-truncated-weights", 2, lambda c: ["train", c.recipe({"model.name_or_path": _damaged_base(
        c, lambda b: _truncate(_weights(b), 4096))})], ("model.safetensors", "truncated", "re-download")),
    ("base-garbage-weights", 2, lambda c: ["train", c.recipe({"model.name_or_path": _damaged_base(
        c, lambda b: _weights(b).write_bytes(bytes(range(256)) * 40))})], ("model.safetensors", "not a safetensors")),
    ("base-absurd-header-length", 2, lambda c: ["train", c.recipe({"model.name_or_path": _damaged_base(
        c, lambda b: _weights(b).write_bytes((2**62).to_bytes(8, "little") + _weights(b).read_bytes()[8:]))})],
     ("header in a",)),
    ("base-config-not-object", 2, lambda c: ["train", c.recipe({"model.name_or_path": _damaged_base(
        c, lambda b: (b / "config.json").write_text("[1, 2]"))})], ("config.json holds a JSON list",)),
    ("base-config-not-json", 2, lambda c: ["train", c.recipe({"model.name_or_path": _damaged_base(
        c, lambda b: (b / "config.json").write_text("{oops"))})], ("config.json is not valid JSON",)),
    ("base-config-does-not-match-weights", 2, lambda c: ["train", c.recipe({"model.name_or_path": _damaged_base(
        c, _edit_config(intermediate_size=256))})], ("config.json describes", "different models")),
    ("base-fake-gguf", 2, lambda c: ["train", c.recipe({"model.name_or_path": str(_bytes_file(
        c, "fake.gguf", b"GGUF" + bytes(range(200))))})], ("fake.gguf", "not a readable GGUF file")),
    ("base-tokenizer-beyond-vocab", 2, lambda c: ["train", c.recipe({"model.name_or_path": _damaged_base(
        c, _edit_config(vocab_size=100))})], ("the tokenizer has", "vocabulary is 100")),
    # --- damaged adapters: exit 4 naming the file ----------------------------------------------------------
    ("adapter-config-not-json", 4, lambda c: ["merge", _damaged_adapter(
        c, lambda a: (a / "adapter_config.json").write_text("{oops")), "-o", c.out],
     ("adapter_config.json is not valid JSON",)),
    ("adapter-config-not-object", 4, lambda c: ["merge", _damaged_adapter(
        c, lambda a: (a / "adapter_config.json").write_text('"lora"')), "-o", c.out], ("holds a JSON str",)),
    ("adapter-config-without-peft-type", 4, lambda c: ["generate", "--model", c.model, "--adapter", "a=" + str(
        _damaged_adapter(c, lambda a: (a / "adapter_config.json").write_text("{}"))), "--prompt", "hi"],
     ("adapter_config.json has no peft_type", "copy or train it again")),
    ("adapter-truncated-weights", 4, lambda c: ["merge", _damaged_adapter(
        c, lambda a: _truncate(a / "adapter_model.safetensors", 100)), "-o", c.out],
     ("adapter_model.safetensors", "truncated")),
    ("adapter-record-not-json", 4, lambda c: ["generate", "--model", c.model, "--adapter", "a=" + str(_damaged_adapter(
        c, lambda a: (a / "lorakit.json").write_text("{"))), "--prompt", "hi"], ("lorakit.json is not valid JSON",)),
    # --- data that is not UTF-8 text, or too deep: exit 3 --------------------------------------------------
    ("data-latin1", 3, lambda c: ["train", c.recipe({"data.train": str(_bytes_file(c, "l.jsonl", ROWS_LATIN1))})],
     ("l.jsonl:1", "not UTF-8 text")),
    ("data-gzip-jsonl", 3, lambda c: ["train", c.recipe({"data.train": str(_bytes_file(
        c, "g.jsonl", gzip.compress(c.data.read_bytes())))})], ("g.jsonl is gzip-compressed",)),
    ("data-utf16-json", 3, lambda c: ["train", c.recipe({"data.train": str(_bytes_file(
        c, "u.json", ("[" + ROWS_OK + "]").encode("utf-16")))})], ("u.json is UTF-16",)),
    ("data-deep-row", 3, lambda c: ["train", c.recipe({"data.train": str(c.data_file(
        ['{"instruction": "x", "output": "y", "z": ' + "[" * 100000 + "]" * 100000 + "}"]))})],
     ("bad.jsonl:1", "nested too deeply")),
    ("data-row-no-usable", 3, lambda c: ["train", c.recipe({"data.max_seq_len": 8, "data.truncation": "drop"})],
     ("no usable rows (rows 16",)),
    ("data-bad-parquet", 3, lambda c: ["train", c.recipe({"data.train": str(_bytes_file(c, "d.parquet", b"PAR1junk"))})],
     ("d.parquet: not a Parquet file",)),
    ("data-truncated-parquet", 3, lambda c: ["train", c.recipe({"data.train": str(_bytes_file(
        c, "t.parquet", b"PAR1" + bytes(100)))})], ("t.parquet: not a Parquet file",)),
    ("generate-file-latin1", 3, lambda c: ["generate", "--model", c.model, "--file", _bytes_file(c, "p.jsonl", b'{"prompt": "caf\xe9"}\n')],
     ("not UTF-8 text",)),
    ("generate-file-message-without-content", 3, lambda c: ["generate", "--model", c.model, "--file", c.data_file(
        ['{"messages": [{"role": "user"}]}'], name="p.jsonl")], ("p.jsonl:1", "'messages'[0]", "'content'", "fix the row")),
    ("generate-file-empty-prompt", 3, lambda c: ["generate", "--model", c.model, "--file", c.data_file(
        ['{"prompt": "a"}', '{"prompt": ""}'], name="p.jsonl")], ("p.jsonl:2", "the prompt is empty")),
    ("generate-empty-prompt", 2, lambda c: ["generate", "--model", c.model, "--prompt", ""], ("--prompt is empty",)),
    # --- outputs over inputs: exit 5 (issue 15, item 1) ----------------------------------------------------
    ("merge-into-its-run", 5, lambda c: ["merge", c.run / "adapter", "-o", c.run, "--overwrite"],
     ("contains the adapter",)),
    ("merge-into-the-base", 5, lambda c: ["merge", c.run / "adapter", "-o", c.model, "--overwrite"],
     ("is the base model",)),
    ("merge-inside-the-adapter", 5, lambda c: ["merge", c.run / "adapter", "-o", c.run / "adapter" / "merged"],
     ("lies inside the adapter",)),
    ("merge-over-a-foreign-folder", 5, lambda c: ["merge", c.run / "adapter", "-o", _foreign_dir(c), "--overwrite"],
     ("lorakit did not write",)),
    ("eval-output-is-the-data", 5, lambda c: ["eval", c.run, "--data", c.data, "-o", c.data],
     ("is the --data rows", "choose")),
    ("eval-data-is-a-dir", 3, lambda c: ["eval", c.run, "--data", c.tmp, "-o", c.tmp / "e.json"],
     ("--data", "a directory; give the file of rows")),
    ("eval-output-is-a-dir", 2, lambda c: ["eval", c.run, "--data", c.data, "-o", c.tmp],
     ("a directory", "name a file", "/eval.json")),
    ("eval-output-under-a-file", 2, lambda c: ["eval", c.run, "--data", c.data, "-o", c.data / "e.json"],
     ("is a file",)),
    ("train-into-the-base", 5, lambda c: ["train", c.recipe(), "--output-dir", c.model / "run"],
     ("lies inside the base model",)),
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
    # lorakit's own warnings given before the refusal ("warning: ...", its channel) are lines of their own
    rest = [line for line in stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert len(rest) == 1, f"more than the error line on stderr:\n{stderr}"
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
