"""adapter.init_lora_weights that need more than PEFT's config: weight-rewriting inits converted at save (PiSSA,
OLoRA), EVA run on the first training micro-batches, and the inits lorakit refuses before loading.

Tiny fp32 model. The converted adapter on the ORIGINAL base must give the trained (residual base + adapter)
model's logits to 1e-5 (only summation order differs: ΔW = BA − B₀A₀ is applied as one rank-2r product).
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from lorakit.errors import RecipeError
from lorakit.adapters.inits import InitRecord, capture_initial, run_eva
from lorakit.adapters.build import build_model
from lorakit.models.loading import load_base_model
from lorakit.config.load import parse_recipe
from lorakit.training.run import run_training, save_adapter
from run_helpers import adapter_hash, cli, recipe_dict, write_data
from test_methods import batch, logits, make_recipe, train_steps

REWRITING = ["pissa", "pissa_niter_2", "olora"]


@pytest.mark.parametrize("init", REWRITING)
def test_rewriting_init_is_saved_as_a_plain_lora_on_the_original_base(init, tiny_model_dir, tmp_path):
    from peft import PeftModel

    recipe = make_recipe(tiny_model_dir, {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": init})
    torch.manual_seed(0)
    model = build_model(recipe)
    record = capture_initial(model, recipe.adapter)
    assert record.converted_at_save and record.rewritten_modules == 4
    original = load_base_model(recipe.model, str(tiny_model_dir))
    q_proj = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert not torch.equal(model.get_parameter(q_proj), original.model.layers[0].self_attn.q_proj.weight)

    train_steps(model)
    trained = logits(model)
    from transformers import AutoTokenizer

    save_adapter(model, AutoTokenizer.from_pretrained(tiny_model_dir), recipe, tmp_path / "adapter",
                 str(tiny_model_dir), init=record)

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8  # [A; A₀]: loaders re-run nothing
    plain = PeftModel.from_pretrained(original, tmp_path / "adapter")  # plain PEFT on the untouched base
    torch.testing.assert_close(logits(plain), trained, atol=1e-5, rtol=0)
    record_file = json.loads((tmp_path / "adapter" / "lorakit.json").read_text())
    assert record_file["init"]["converted_at_save"] and record_file["init"]["base_rewritten_modules"] == 4

    result = cli("merge", tmp_path / "adapter", "--output", tmp_path / "merged", "--base", tiny_model_dir)
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(logits(merged), trained, atol=1e-5, rtol=0)


def test_without_conversion_the_saved_adapter_misses_the_trained_model(tiny_model_dir, tmp_path):
    """Why the conversion exists: PiSSA's raw adapter on a loader that does not re-run the SVD is another model."""
    recipe = make_recipe(tiny_model_dir, {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": "pissa"})
    torch.manual_seed(0)
    model = build_model(recipe)
    train_steps(model)
    trained = logits(model)
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
    from peft import LoraConfig

    plain = PeftModel(load_base_model(recipe.model, str(tiny_model_dir)),
                      LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    set_peft_model_state_dict(plain, get_peft_model_state_dict(model))
    assert (logits(plain) - trained).abs().max() > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_checkpoint_of_a_rewriting_init_is_a_plain_lora_and_resumes_bitwise(init, tiny_model_dir, tmp_path):
    """A mid-run checkpoint serves every tool as the final adapter does: adapter/ is the converted delta on the
    original base; residual_adapter/ holds the trained B, A that resume continues from."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lorakit.checkpoint.resume import load_adapter_weights

    recipe = parse_recipe(recipe_dict(tiny_model_dir, write_data(tmp_path / "d.jsonl", 16), tmp_path / "run",
                                      max_steps=4, save_every=2, adapter={"init_lora_weights": init}))
    run = run_training(recipe)
    checkpoint = run / "checkpoints" / "step-000002"
    converted = json.loads((checkpoint / "adapter" / "adapter_config.json").read_text())
    residual = json.loads((checkpoint / "residual_adapter" / "adapter_config.json").read_text())
    assert residual["init_lora_weights"] == init and residual["r"] == 4
    assert converted["init_lora_weights"] is True and converted["r"] == 8  # loaders re-run no decomposition

    # The trained model at step 2, as resume rebuilds it: the residual base, the checkpoint's B, A.
    trained_model = build_model(recipe)
    load_adapter_weights(trained_model, load_file(checkpoint / "residual_adapter" / "adapter_model.safetensors"))
    trained = logits(trained_model)
    plain = PeftModel.from_pretrained(load_base_model(recipe.model, str(tiny_model_dir)), checkpoint / "adapter")
    torch.testing.assert_close(logits(plain), trained, atol=1e-5, rtol=0)

    result = cli("merge", checkpoint, "--output", tmp_path / "merged", "--verify")  # the checkpoint as it is given
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(logits(merged), trained, atol=1e-5, rtol=0)
    result = cli("export", checkpoint, "--check", "vllm")
    assert result.exit_code == 0 and "can serve this adapter (LoRA rank 8" in " ".join(result.output.split())
    result = cli("generate", "--model", tiny_model_dir, "--adapter", checkpoint, "--prompt", "hi",
                 "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output

    # The conversion at each checkpoint changes nothing in the run: resumed == uninterrupted, bitwise.
    first = adapter_hash(run / "adapter")
    run_training(recipe, resume=True, resume_from=checkpoint)
    assert adapter_hash(run / "adapter") == first
    # An unconverted adapter (residual_adapter/, or a checkpoint written before the conversion) is refused, not
    # merged into a model its own verification would reject.
    result = cli("merge", checkpoint / "residual_adapter", "--output", tmp_path / "m")
    assert result.exit_code == 2 and f"unconverted {init} adapter" in " ".join(result.output.split()), result.output


# ----------------------------------------------------------------------------------------------------------
# EVA


def eva_batches() -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        ids = torch.randint(5, 400, (2, 40), generator=generator)
        labels = ids.clone()
        labels[:, :10] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


EVA = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": "eva", "eva_config": {"tau": 0.9}}


def lora_a(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}


def test_eva_initialises_a_from_the_batches_as_peft_does(tiny_model_dir):
    from peft import initialize_lora_eva_weights

    recipe = make_recipe(tiny_model_dir, EVA)
    torch.manual_seed(0)
    model = build_model(recipe)
    default = lora_a(model)
    record = capture_initial(model, recipe.adapter)
    run_eva(model, eva_batches(), record, recipe.adapter)
    ours = lora_a(model)
    assert record.eva_batches == 2 and set(record.eva_ranks) and all(r > 0 for r in record.eva_ranks.values())
    assert all(not torch.equal(default[n], ours[n]) for n in ours if n in default)

    torch.manual_seed(0)
    reference = build_model(recipe)
    initialize_lora_eva_weights(reference, eva_batches(), show_progress_bar=False)
    theirs = lora_a(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_eva_with_too_few_tokens_is_refused_not_looped(tiny_model_dir):
    from lorakit.errors import UsageError

    recipe = make_recipe(tiny_model_dir, EVA)
    model = build_model(recipe)
    few = [{k: v[:, :6] for k, v in b.items()} for b in eva_batches()]
    with pytest.raises(UsageError, match="at least 8 supervised tokens"):
        run_eva(model, few, InitRecord("eva"), recipe.adapter)


@pytest.mark.slow
def test_eva_run_is_deterministic_and_resumes_bitwise(tiny_model_dir, tmp_path):
    data = recipe_dict(tiny_model_dir, write_data(tmp_path / "d.jsonl", 16), tmp_path / "run", max_steps=4,
                       save_every=2, micro_batch_size=4, adapter={**EVA, "lora_dropout": 0.1})
    run = run_training(parse_recipe(data))
    first = adapter_hash(run / "adapter")
    record = json.loads((run / "adapter" / "lorakit.json").read_text())["init"]
    assert record["init_lora_weights"] == "eva" and record["eva_batches"] == 2
    run_training(parse_recipe(data), resume=True, resume_from=run / "checkpoints" / "step-000002")
    assert adapter_hash(run / "adapter") == first


# ----------------------------------------------------------------------------------------------------------
# Refused before loading


@pytest.mark.parametrize("adapter,model,message", [
    ({"init_lora_weights": "pissa"}, {"quantization": "nf4"}, "cannot do exactly on a quantized base"),
    ({"init_lora_weights": "olora"}, {"quantization": "int8"}, "model.quantization: int8"),
    ({"init_lora_weights": "pissa", "method": "dora"}, {}, "drops DoRA's magnitudes"),
    ({"init_lora_weights": "olora", "modules_to_save": ["lm_head"]}, {}, "adapter.modules_to_save: PEFT's conv"),
    ({"init_lora_weights": "pissa"}, {"add_tokens": ["<x>"]}, "adapter.trainable_tokens: PEFT's conversion"),
    ({"init_lora_weights": "corda"}, {}, "preprocess_corda"),
    ({"init_lora_weights": "lora_ga"}, {}, "preprocess_loraga"),
    ({"init_lora_weights": "pissa", "use_rslora": True, "rank_pattern": {"q_proj": 2}}, {}, "rank_pattern"),
])
def test_inits_lorakit_cannot_honour_are_recipe_errors(adapter, model, message, tiny_model_dir):
    data = recipe_dict(tiny_model_dir, "d.jsonl", "out", adapter=adapter)
    data["model"].update(model)
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data)


def test_eva_with_packing_is_refused(tiny_model_dir):
    data = recipe_dict(tiny_model_dir, "d.jsonl", "out", adapter={"init_lora_weights": "eva"})
    data["data"]["packing"] = True
    with pytest.raises(RecipeError, match="data.packing: false"):
        parse_recipe(data)


@pytest.mark.slow
def test_eva_under_ddp_gathers_every_rank_and_is_deterministic(tiny_model_dir, tmp_path):
    """Two ranks, each with its own first micro-batches: PEFT gathers the layer inputs of both ranks for the SVD, so
    they agree on A and on the ranks (else DDP's first all-reduce would fail on mismatched shapes); twice the same."""
    import sys
    from pathlib import Path

    from run_helpers import subprocess_env, write_recipe

    accelerate = str(Path(sys.executable).with_name("accelerate"))
    config = Path(__file__).parents[2] / "recipes" / "accelerate" / "ddp.yaml"
    hashes = []
    for name in ("a", "b"):
        data = recipe_dict(tiny_model_dir, write_data(tmp_path / "d.jsonl", 16), tmp_path / name, max_steps=2,
                           micro_batch_size=4, adapter=EVA)
        recipe = write_recipe(tmp_path / f"{name}.yaml", data)
        result = subprocess.run([accelerate, "launch", "--config_file", str(config), "--num_processes", "2", "-m",
                                 "lorakit", "train", str(recipe)], capture_output=True, text=True,
                                env=subprocess_env(), timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "EVA init" in result.stdout + result.stderr
        hashes.append(adapter_hash(tmp_path / name / "adapter"))
        assert json.loads((tmp_path / name / "adapter" / "lorakit.json").read_text())["init"]["eva_batches"] == 2
    assert {k: v for k, v in hashes[0].items() if k != "lorakit.json"} == \
        {k: v for k, v in hashes[1].items() if k != "lorakit.json"}


@pytest.mark.slow
def test_pissa_checkpoints_under_ddp_are_converted_and_resume_bitwise(tiny_model_dir, tmp_path):
    """Rank 0 converts at each checkpoint while the other rank waits; the run goes on as if it had not."""
    import sys
    from pathlib import Path

    from run_helpers import subprocess_env, write_recipe

    accelerate = str(Path(sys.executable).with_name("accelerate"))
    config = Path(__file__).parents[2] / "recipes" / "accelerate" / "ddp.yaml"
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model_dir, write_data(tmp_path / "d.jsonl", 16), run,
                                                           max_steps=4, save_every=2,
                                                           adapter={"init_lora_weights": "pissa"}))

    def train(*extra: str) -> None:
        result = subprocess.run([accelerate, "launch", "--config_file", str(config), "--num_processes", "2", "-m",
                                 "lorakit", "train", str(recipe), *extra], capture_output=True, text=True,
                                env=subprocess_env(), timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    train()
    checkpoint = run / "checkpoints" / "step-000002"
    assert json.loads((checkpoint / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] is True
    first = saved_state(run / "adapter")
    (run / "adapter").rename(tmp_path / "finished-adapter")  # stopped before its end: a resume trains again
    train("--resume", str(checkpoint))
    assert saved_state(run / "adapter") == first


def saved_state(adapter) -> tuple[str, dict]:
    """The weights, bitwise, and the config; PEFT writes target_modules (a set) in the order of the process's
    string hashes, which differ between two launches."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = sorted(config["target_modules"])
    return adapter_hash(adapter)["adapter_model.safetensors"], config


@pytest.mark.parametrize("init", ["pissa", "olora", "eva"])
def test_fsdp_refuses_inits_that_need_the_whole_adapter(init, tiny_model_dir, monkeypatch):
    from lorakit.distributed.fsdp import check_fsdp
    from lorakit.errors import UsageError

    monkeypatch.setenv("FSDP_VERSION", "2")
    recipe = parse_recipe(recipe_dict(tiny_model_dir, "d.jsonl", "out", adapter={"init_lora_weights": init}))
    with pytest.raises(UsageError, match=f"adapter.init_lora_weights: {init} .* use DDP"):
        check_fsdp(recipe, "no")
