"""LoRA+ (adapter.loraplus_lr_ratio): PEFT's create_loraplus_optimizer groups, with torch's and bitsandbytes'
AdamW, through the schedule and a checkpoint/resume."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import RecipeError
from lorakit.adapters.build import build_model
from lorakit.config.load import parse_recipe
from lorakit.training.optim import build_optimizer, build_scheduler
from lorakit.training.run import run_training
from run_helpers import adapter_hash, recipe_dict, write_data


def make_recipe(model_dir, adapter: dict, train: dict):
    return parse_recipe({"model": {"name_or_path": str(model_dir), "dtype": "float32"}, "adapter": adapter,
                         "data": {"train": "unused.jsonl"}, "train": train})


def lr_of(optimizer, name_part: str, model) -> set[float]:
    ids = {id(p) for n, p in model.named_parameters() if name_part in n and p.requires_grad}
    return {g["lr"] for g in optimizer.param_groups if any(id(p) in ids for p in g["params"])}


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_b_learns_at_ratio_times_the_rate_of_a(optimizer, tiny_model_dir):
    import bitsandbytes as bnb

    recipe = make_recipe(tiny_model_dir, {"r": 4, "target_modules": ["q_proj"], "loraplus_lr_ratio": 16},
                         train={"max_steps": 3, "optimizer": optimizer, "learning_rate": 1e-3})
    model = build_model(recipe)
    opt = build_optimizer(model, recipe.train, recipe.adapter)
    assert type(opt) is (torch.optim.AdamW if optimizer == "adamw" else bnb.optim.AdamW8bit)
    assert lr_of(opt, "lora_A", model) == {1e-3}
    assert sorted(lr_of(opt, "lora_B", model)) == pytest.approx([16e-3])
    plain = build_optimizer(model, recipe.train)  # no adapter section: one group, one rate
    assert len(plain.param_groups) == 1
    if optimizer == "adamw":  # torch's fused kernel on CPU, with LoRA+'s groups and without
        assert opt.defaults["fused"] and plain.defaults["fused"]
    build_scheduler(opt, recipe.train, 3)  # the schedule scales each group from its own peak
    (a,), (b,) = lr_of(opt, "lora_A", model), lr_of(opt, "lora_B", model)
    assert b == pytest.approx(16 * a)


def test_loraplus_weight_decay_follows_train_weight_decay(tiny_model_dir):
    recipe = make_recipe(tiny_model_dir, {"r": 4, "target_modules": ["q_proj"], "loraplus_lr_ratio": 4},
                         train={"max_steps": 3, "weight_decay": 0.1})
    opt = build_optimizer(build_model(recipe), recipe.train, recipe.adapter)
    assert {g["weight_decay"] for g in opt.param_groups if g["params"]} == {0.1}


@pytest.mark.parametrize("adapter,message", [
    ({"method": "prompt", "num_virtual_tokens": 4, "loraplus_lr_ratio": 16}, "method prompt has none"),
    ({"method": "ia3", "loraplus_lr_ratio": 16}, "method ia3 has none"),
    ({"loraplus_lr_embedding": 1e-5}, "set adapter.loraplus_lr_ratio"),
])
def test_loraplus_without_lora_matrices_is_refused(adapter, message, tiny_model_dir):
    data = recipe_dict(tiny_model_dir, "d.jsonl", "out")
    data["adapter"] = adapter if "method" in adapter else {**data["adapter"], **adapter}
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_loraplus_run_resumes_bitwise(optimizer, tiny_model_dir, tmp_path):
    data = recipe_dict(tiny_model_dir, write_data(tmp_path / "d.jsonl", 16), tmp_path / "run", max_steps=4,
                       save_every=2, optimizer=optimizer, adapter={"loraplus_lr_ratio": 16})
    run = run_training(parse_recipe(data))
    first = adapter_hash(run / "adapter")
    run_training(parse_recipe(data), resume=True, resume_from=run / "checkpoints" / "step-000002")
    assert adapter_hash(run / "adapter") == first


def test_fused_adamw_updates_as_the_per_tensor_loop_does(tiny_model_dir):
    """The fused kernel build_optimizer chooses against torch's default per-tensor AdamW on CPU: the same
    parameters after a few steps, to float rounding."""
    recipe = make_recipe(tiny_model_dir, {"r": 4, "target_modules": ["q_proj", "v_proj"]},
                         train={"max_steps": 5, "learning_rate": 1e-2, "weight_decay": 0.1})
    fused_model, loop_model = build_model(recipe), build_model(recipe)
    loop_model.load_state_dict(fused_model.state_dict())
    fused = build_optimizer(fused_model, recipe.train)
    loop = torch.optim.AdamW([p for p in loop_model.parameters() if p.requires_grad],
                             **{k: fused.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")})
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    trained = [(p, q) for p, q in zip(fused_model.parameters(), loop_model.parameters()) if p.requires_grad]
    torch.manual_seed(0)
    for _ in range(5):
        for p, q in trained:
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    for (name, a), b in zip(fused_model.named_parameters(), loop_model.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
