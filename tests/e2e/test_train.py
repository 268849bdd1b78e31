"""`lorakit train` end to end on a tiny random model: the real CLI in a subprocess, and the same code in-process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lorakit.testing import write_memorisation_data

ROOT = Path(__file__).resolve().parents[2]


def recipe_file(tmp_path, model_dir, data, **train):
    recipe = {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        # A random tiny model's logits are bounded by its norm and small LM head: adapting lm_head as well lets
        # it memorise in a few dozen steps.
        "adapter": {"r": 8, "lora_dropout": 0.0, "target_modules": ".*(proj|lm_head)"},
        "data": {"train": str(data), "format": "alpaca", "max_seq_len": 128},
        "train": {"max_steps": 40, "micro_batch_size": 4, "grad_accum": 2, "learning_rate": 1e-2,
                  "lr_scheduler": "constant", "log_every": 5, **train},
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def lorakit(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lorakit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=600)


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_memorises_and_writes_layout(tmp_path, tiny_model_dir):
    data = write_memorisation_data(tmp_path / "train.jsonl")
    recipe = recipe_file(tmp_path, tiny_model_dir, data, save_every=20)
    result = lorakit("train", recipe, "--set", "train.seed=7")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    assert "trainable params: " in result.stdout and "|| all params: " in result.stdout
    # The layout the foundation fixes.
    for name in ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json",
                 "recipe.yaml", "metrics.jsonl", "checkpoints/step-000020"]:
        assert (run / name).exists(), name
    records = [r for r in read_metrics(run) if "loss" in r]
    assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(records[0])
    assert records[-1]["step"] == 40
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < 0.25 * first, (first, last)  # memorised: far below where it started
    # The resolved recipe records the override and round-trips through the validator.
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["train"]["seed"] == 7 and resolved["adapter"]["lora_alpha"] == 16
    assert lorakit("validate", run / "recipe.yaml").returncode == 0


def _tiny_recipe(model_dir, data, **adapter):
    from lorakit.config.load import parse_recipe

    return parse_recipe({
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "adapter": {"r": 4, "lora_dropout": 0.0, **adapter},
        "data": {"train": str(data)},
        "train": {"max_steps": 3},
    })


@pytest.mark.parametrize("targets", ["all-linear", ".*(proj|lm_head)"])
def test_adapter_starts_at_base_and_reloads_with_plain_peft(tmp_path, tiny_model_dir, targets):
    """B = 0 at the start; after training, PeftModel.from_pretrained(DIR/adapter) gives the same logits. With
    lm_head adapted the adapter holds its A and B only: PEFT's save_embedding_layers "auto" saved the base's
    whole LM head (and embedding) beside them, 2 GB for Llama-3-8B."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorakit.adapters.build import build_model
    from lorakit.models.loading import load_tokenizer
    from lorakit.training.run import save_adapter

    data = write_memorisation_data(tmp_path / "train.jsonl")
    recipe = _tiny_recipe(tiny_model_dir, data, target_modules=targets)
    tokenizer = load_tokenizer(recipe.model, str(tiny_model_dir))
    ids = torch.tensor([tokenizer("What is the capital of France? Paris")["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(ids).logits

    torch.manual_seed(0)
    model = build_model(recipe)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base_logits)  # training starts exactly at the base model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    assert not torch.allclose(trained, base_logits)

    save_adapter(model, tokenizer, recipe, tmp_path / "adapter", str(tiny_model_dir))
    from safetensors import safe_open

    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "adapter").iterdir()}
    assert len(set(modes.values())) == 1, modes  # the weights as readable as the rest (safetensors 0.8 wrote 0600)
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert f.keys() and all(".lora_A." in k or ".lora_B." in k for k in f.keys()), list(f.keys())
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, trained, atol=1e-5)
    meta = json.loads((tmp_path / "adapter" / "lorakit.json").read_text())
    assert meta["method"] == "lora" and meta["base_model"] == str(tiny_model_dir)


def test_bad_data_exits_3_and_writes_nothing(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    recipe = recipe_file(tmp_path, tiny_model_dir, data)
    result = lorakit("train", recipe)
    assert result.returncode == 3, result.stderr
    assert f"{data}:2: invalid JSON" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_invalid_recipe_exits_2_without_traceback(tmp_path, tiny_model_dir):
    recipe = recipe_file(tmp_path, tiny_model_dir, tmp_path / "x.jsonl")
    text = recipe.read_text().replace("lora_dropout", "lora_dropuot")
    recipe.write_text(text)
    for command in ("validate", "train"):
        result = lorakit(command, recipe)
        assert result.returncode == 2
        assert "adapter.lora_dropuot: unknown key" in result.stderr and "did you mean lora_dropout?" in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_save_both_writes_merged_model_equal_to_adapter(tmp_path, tiny_model_dir):
    """output.save: both → DIR/merged/ is a plain HF model whose logits equal base + adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from lorakit.cli.main import app

    data = write_memorisation_data(tmp_path / "train.jsonl")
    recipe = recipe_file(tmp_path, tiny_model_dir, data, max_steps=3)
    result = CliRunner().invoke(app, ["train", str(recipe), "--set", "output.save=both"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    meta = json.loads((run / "adapter" / "lorakit.json").read_text())
    assert meta["dtype"] == "float32"  # the resolved dtype, never "auto"
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "adapter")
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, tuned(ids).logits, atol=1e-4)


def test_the_process_exits_early_with_everything_written_and_cleaned(tmp_path, tiny_model_dir):
    """main() ends the process without the interpreter's teardown: the output is complete, atexit work (the
    private token store of data.cache: false) is done, and a .jsonl run never imports datasets."""
    data = write_memorisation_data(tmp_path / "train.jsonl")
    recipe = recipe_file(tmp_path, tiny_model_dir, data, max_steps=2, log_every=1)
    temp = tmp_path / "tmp"
    temp.mkdir()
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "lorakit", "train", str(recipe),
                             "--set", "data.cache=false"], capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**os.environ, "TMPDIR": str(temp)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.rstrip().splitlines()[-1].startswith("loss plot saved to"), result.stdout[-500:]
    assert list(temp.iterdir()) == []  # the private store's temporary directory was removed
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and "datasets" not in imported
    # Offline (conftest sets HF_HUB_OFFLINE), the kernels package's note about bitsandbytes is library noise.
    assert "publisher trust" not in result.stderr
