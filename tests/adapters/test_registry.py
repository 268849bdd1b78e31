"""Every adapter method in the registry (lorakit.config.methods.REGISTRY), checked the same way: recipe defaults,
build, save → reload in plain PEFT (lorakit's loader for bottleneck), checkpoint → bitwise resume, and merge or
a clear refusal. A method added to the registry without a line in ADAPTERS below fails here first."""

from __future__ import annotations

import json
from typing import get_args

import pytest
import torch
from pydantic import ValidationError
from run_helpers import cli, recipe_dict, training_records, write_data, write_recipe
from safetensors.torch import load_file
from test_methods import logits, make_recipe, train_steps

from lorakit.adapters.build import build_model, load_adapter
from lorakit.config.methods import REGISTRY
from lorakit.config.schema import AdapterSection
from lorakit.distributed.fsdp import save_adapter_weights
from lorakit.errors import EXIT_USAGE
from lorakit.models.loading import load_base_model

# The smallest adapter of each method on the tiny model (method-specific keys only).
ADAPTERS = {
    "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
    "dora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
    "ia3": {},
    "prefix": {"num_virtual_tokens": 4},
    "prompt": {"num_virtual_tokens": 4},
    "bottleneck": {"r": 8},
}
OWN_KEYS = {"r": 4, "lora_alpha": 8.0, "lora_dropout": 0.1, "target_modules": ["q_proj"]}  # valid values


def test_every_method_is_registered_and_tested_here():
    assert set(get_args(AdapterSection.model_fields["method"].annotation)) == set(REGISTRY)
    assert set(ADAPTERS) == set(REGISTRY), "add the new method's smallest adapter to ADAPTERS"


@pytest.mark.parametrize("name", list(REGISTRY))
def test_recipe_defaults_come_from_the_registry(name):
    method = REGISTRY[name]
    section = AdapterSection(method=name, **{key: 4 for key in method.required})
    for key, default in method.key_defaults.items():
        expected = 2.0 * section.r if key == "lora_alpha" else default
        assert getattr(section, key) == expected, key
    for key in OWN_KEYS:
        if key not in method.key_defaults:
            with pytest.raises(ValidationError, match=f"adapter.{key}: not used by method {name}"):
                AdapterSection(method=name, **{key: OWN_KEYS[key]}, **{k: 4 for k in method.required})


@pytest.mark.parametrize("name", list(REGISTRY))
def test_build_save_reload(name, tiny_model_dir, tmp_path):
    recipe = make_recipe(tiny_model_dir, {"method": name, **ADAPTERS[name]})
    model = build_model(recipe)
    train_steps(model, steps=2)
    expected = logits(model)
    save_adapter_weights(model, tmp_path)  # what a run writes to DIR/adapter
    assert {p.name for p in tmp_path.iterdir()} >= set(REGISTRY[name].layout)

    base = load_base_model(recipe.model, str(tiny_model_dir))
    if name == "bottleneck":
        reloaded = load_adapter(base, tmp_path)
    else:
        from peft import PeftModel

        reloaded = PeftModel.from_pretrained(base, tmp_path)  # plain PEFT, no lorakit code
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REGISTRY))
def test_checkpoint_resume_and_merge(name, tiny_model_dir, tmp_path):
    method = REGISTRY[name]
    data = write_data(tmp_path / "train.jsonl", 16)
    out = tmp_path / "run"
    recipe = recipe_dict(tiny_model_dir, data, out, max_steps=2, save_every=1)
    recipe["adapter"] = {"method": name, **ADAPTERS[name]}
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    result = cli("train", path)
    assert result.exit_code == 0, result.output

    resumed = tmp_path / "resumed"
    result = cli("train", path, "--output-dir", resumed, "--resume", out / "checkpoints" / "step-000001")
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in training_records(resumed / "metrics.jsonl") if "loss" in r] == [2]  # step 2 only
    weights = method.layout[1]
    straight, again = load_file(out / "adapter" / weights), load_file(resumed / "adapter" / weights)
    assert straight.keys() == again.keys()
    for key in straight:
        assert torch.equal(straight[key], again[key]), f"{key}: resumed run differs from the uninterrupted one"

    result = cli("merge", out / "adapter", "--output", tmp_path / "merged")
    if method.mergeable:
        assert result.exit_code == 0, result.output
        assert (tmp_path / "merged" / "config.json").is_file()
    else:
        assert result.exit_code == EXIT_USAGE and "Traceback" not in result.output
        assert "no weight update to merge" in result.output, result.output
        assert not (tmp_path / "merged").exists()


def test_saved_adapter_configs_list_target_modules_sorted(tiny_model_dir, tmp_path):
    """PEFT keeps target_modules as a set and saves it in string-hash order, which changes per process; lorakit's
    saves write it sorted, so two identical runs write identical bytes."""
    import torch
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorakit.distributed.fsdp import save_adapter_weights

    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for name, config in {"lora": LoraConfig(r=2, target_modules=modules),
                         "ia3": IA3Config(target_modules=modules, feedforward_modules=["up_proj", "down_proj"])}.items():
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), config)
        save_adapter_weights(model, tmp_path / name)
        saved = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert saved["target_modules"] == sorted(modules), name
        if name == "ia3":
            assert saved["feedforward_modules"] == ["down_proj", "up_proj"]
