"""Every adapter method on every base precision, through lorakit's own builders (build_model, load_adapter).

Bounds on logits (tiny random model, logits of magnitude ~1):
- reload (save → fresh base → load_adapter): 1e-5 on fp32 bases; 1e-4 on quantized bases (quantizing the same
  weights is deterministic on CPU, so it is exact here; the bound leaves room for other kernels).
- merged == adapter: 1e-5 on fp32; nf4 bases merge into the dequantized weights (what the 4-bit forward computes
  with), 1e-4; int8 bases 5e-2, because LLM.int8 also quantizes the activations, which a merged model does not.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lorakit.errors import EXIT_USAGE, RecipeError, UsageError
from lorakit.adapters.build import build_model, load_adapter
from lorakit.compat import adapter_generate
from lorakit.models.loading import trainable_summary
from lorakit.models.loading import load_base_model
from lorakit.config.load import parse_recipe
from run_helpers import cli, recipe_dict, write_data

METHODS = {
    "lora": {"method": "lora", "r": 4},
    "dora": {"method": "dora", "r": 4},
    "rslora": {"method": "lora", "r": 4, "use_rslora": True},
    "ia3": {"method": "ia3"},
    "prefix": {"method": "prefix", "num_virtual_tokens": 4},
    "prompt": {"method": "prompt", "num_virtual_tokens": 4},
    "bottleneck": {"method": "bottleneck", "r": 8},
}
MERGEABLE = {"lora", "dora", "rslora", "ia3"}
RELOAD_ATOL = {"none": 1e-5, "nf4": 1e-4, "fp4": 1e-4, "int8": 1e-4}
MERGE_ATOL = {"none": 1e-5, "nf4": 1e-4, "fp4": 1e-4, "int8": 5e-2}
# DoRA on an int8 base is refused on CPU (test_dora_int8_refused_on_cpu); fp4 is covered by LoRA alone.
CASES = [(m, q) for q in ("none", "nf4", "int8") for m in METHODS if (m, q) != ("dora", "int8")] + [("lora", "fp4")]


def make_recipe(model_dir, adapter: dict, quantization: str = "none", **sections):
    data = {
        "model": {"name_or_path": str(model_dir), "dtype": "float32", "quantization": quantization},
        "adapter": adapter,
        "data": {"train": "unused.jsonl"},
        "train": {"max_steps": 3},
        **sections,
    }
    return parse_recipe(data)


def batch():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 400, (2, 12), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def train_steps(model, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        b = batch()
        loss = model(**b, num_items_in_batch=float(b["labels"].numel())).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes: 4-bit weights stored as float32 hold NaN bit patterns, which torch.equal calls unequal."""
    return tensor.detach().data.contiguous().view(torch.uint8).clone()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    model.eval()
    return model(input_ids=batch()["input_ids"]).logits.float()


def merge_base(recipe, model_dir):
    """The fp32 base to merge into: its own weights, or the dequantized weights the quantized forward uses."""
    fp32 = recipe.model.model_copy(update={"quantization": "none"})
    base = load_base_model(fp32, str(model_dir))
    if recipe.model.quantization != "none":
        base.load_state_dict(load_base_model(recipe.model, str(model_dir)).dequantize().state_dict())
    return base


@pytest.mark.parametrize("method,quant", CASES, ids=[f"{m}-{q}" for m, q in CASES])
def test_train_save_reload_merge(method, quant, tiny_model_dir, tmp_path):
    recipe = make_recipe(tiny_model_dir, METHODS[method], quant)
    torch.manual_seed(0)
    model = build_model(recipe)
    before = {n: bits(p) for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert model.get_nb_trainable_parameters()[0] == sum(p.numel() for p in model.parameters() if p.requires_grad)

    train_steps(model)

    after = {n: bits(p) for n, p in model.named_parameters()}
    frozen_changed = [n for n in before if n not in trainable and not torch.equal(before[n], after[n])]
    assert frozen_changed == [], "the base must stay bit-identical"
    unchanged = [n for n in trainable if torch.equal(before[n], after[n])]
    assert unchanged == [], "every adapter tensor should move in 3 steps"

    trained = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_adapter(load_base_model(recipe.model, str(tiny_model_dir)), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded), trained, atol=RELOAD_ATOL[quant], rtol=0)

    if method in MERGEABLE:
        merged = load_adapter(merge_base(recipe, tiny_model_dir), tmp_path / "adapter").merge_and_unload()
        torch.testing.assert_close(logits(merged), trained, atol=MERGE_ATOL[quant], rtol=0)
    else:  # not mergeable: the reloaded adapter must generate what the trained one does
        prompt = batch()["input_ids"][:1, :6]
        kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        with torch.no_grad():  # as lorakit generates (PEFT's own generate() drops a prefix: lorakit.compat)
            expected = adapter_generate(model, prompt, **kwargs)
            assert torch.equal(adapter_generate(reloaded, prompt, **kwargs), expected)
        if method == "prefix":  # of logits the prefix moved away from the base
            base = logits(load_base_model(recipe.model, str(tiny_model_dir)))
            assert (trained - base).abs().max() > 100 * RELOAD_ATOL[quant]


@pytest.mark.parametrize("method", ["lora", "dora", "rslora", "ia3", "bottleneck"])
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_adapter_starts_at_the_base_exactly(method, quant, tiny_model_dir):
    """LoRA/DoRA B=0, IA3 ones, bottleneck up=0: before training the model is the base, bit for bit."""
    recipe = make_recipe(tiny_model_dir, METHODS[method], quant)
    base = logits(load_base_model(recipe.model, str(tiny_model_dir)))
    assert torch.equal(logits(build_model(recipe)), base)


def test_disabled_bottleneck_is_the_base(tiny_model_dir):
    recipe = make_recipe(tiny_model_dir, METHODS["bottleneck"])
    model = build_model(recipe)
    train_steps(model)
    with model.disable_adapter():
        disabled = logits(model)
    assert torch.equal(disabled, logits(load_base_model(recipe.model, str(tiny_model_dir))))
    assert not torch.equal(logits(model), disabled)


def test_bottleneck_saves_only_the_adapter(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    model = build_model(make_recipe(tiny_model_dir, {"method": "bottleneck", "r": 8, "placement": ["mlp"],
                                                     "layers_to_transform": [1], "nonlinearity": "gelu"}))
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bottleneck_config.json", "bottleneck_model.safetensors"]
    assert sorted(load_file(tmp_path / "bottleneck_model.safetensors")) == [
        "1.mlp.down.bias", "1.mlp.down.weight", "1.mlp.up.bias", "1.mlp.up.weight"
    ]
    # width 8 on hidden 64: down 64·8 + 8, up 8·64 + 64, one adapter
    assert model.get_nb_trainable_parameters()[0] == 2 * 64 * 8 + 8 + 64
    assert trainable_summary(model).startswith("trainable params: 1,096 ||")


# ----------------------------------------------------------------------------------------------------------
# Pass-through fields reach PEFT's config


def test_lora_pass_through_reaches_peft(tiny_model_dir):
    model = build_model(make_recipe(tiny_model_dir, {
        "method": "lora", "r": 4, "lora_alpha": 8, "use_rslora": True, "init_lora_weights": "gaussian",
        "target_modules": ["q_proj", "v_proj"],
        "bias": "lora_only", "layers_to_transform": [1], "rank_pattern": {"q_proj": 2},
        "alpha_pattern": {"q_proj": 16}, "modules_to_save": ["lm_head"],
    }))
    config = model.peft_config["default"]
    assert (config.use_rslora, config.init_lora_weights, config.bias) == (True, "gaussian", "lora_only")
    assert config.layers_to_transform == [1] and config.modules_to_save == ["lm_head"]
    layers = model.base_model.model.model.layers
    assert not hasattr(layers[0].self_attn.q_proj, "lora_A")  # layer 0 untouched
    q, v = layers[1].self_attn.q_proj, layers[1].self_attn.v_proj
    assert q.lora_A["default"].out_features == 2 and v.lora_A["default"].out_features == 4
    assert q.scaling["default"] == pytest.approx(16 / 2**0.5)  # rsLoRA: alpha/√r, per-module alpha and rank
    assert v.scaling["default"] == pytest.approx(8 / 4**0.5)
    assert any("modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)


def test_prompt_init_from_text_and_prefix_projection(tiny_model_dir):
    text = "Count to three"
    prompt = build_model(make_recipe(tiny_model_dir, {"method": "prompt", "num_virtual_tokens": 4,
                                                      "prompt_tuning_init_text": text}))
    config = prompt.peft_config["default"]
    assert config.prompt_tuning_init == "TEXT" and config.tokenizer_name_or_path == str(tiny_model_dir)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(text)["input_ids"]
    ids = (ids * 4)[:4]  # PEFT repeats the text's tokens up to num_virtual_tokens
    embeddings = prompt.get_input_embeddings().weight[ids]
    assert torch.equal(prompt.prompt_encoder["default"].embedding.weight.detach(), embeddings.detach())

    prefix = build_model(make_recipe(tiny_model_dir, {"method": "prefix", "num_virtual_tokens": 4,
                                                      "prefix_projection": True, "encoder_hidden_size": 16}))
    config = prefix.peft_config["default"]
    assert config.prefix_projection and config.encoder_hidden_size == 16


def test_ia3_defaults_are_peft_per_architecture(tiny_model_dir):
    model = build_model(make_recipe(tiny_model_dir, {"method": "ia3"}))
    config = model.peft_config["default"]
    assert config.target_modules == {"k_proj", "v_proj", "down_proj"} and config.feedforward_modules == {"down_proj"}
    model = build_model(make_recipe(tiny_model_dir, {"method": "ia3", "target_modules": ["q_proj", "up_proj"],
                                                     "feedforward_modules": ["up_proj"]}))
    assert model.peft_config["default"].feedforward_modules == {"up_proj"}


# ----------------------------------------------------------------------------------------------------------
# Recipe errors: exit 2, one line each, naming the key and the fix


def recipe_problems(model_dir, adapter: dict, **sections) -> list[str]:
    with pytest.raises(RecipeError) as info:
        make_recipe(model_dir, adapter, **sections)
    assert info.value.exit_code == EXIT_USAGE
    return info.value.problems


def test_unknown_pass_through_key_suggests(tiny_model_dir):
    assert recipe_problems(tiny_model_dir, {"method": "lora", "use_rslroa": True}) == [
        "adapter.use_rslroa: unknown key for method lora (LoraConfig); did you mean use_rslora?"
    ]
    [problem] = recipe_problems(tiny_model_dir, {"method": "lora", "num_virtual_tokens": 8})
    assert problem.endswith("it is an option of method prefix/prompt")
    [problem] = recipe_problems(tiny_model_dir, {"method": "bottleneck", "nonlinearty": "relu"})
    assert "BottleneckConfig" in problem and "did you mean nonlinearity?" in problem


def test_pass_through_values_judged_by_peft(tiny_model_dir):
    [problem] = recipe_problems(tiny_model_dir, {"method": "lora", "init_lora_weights": "loftq"})
    # PEFT asks for scipy first (the lorakit[loftq] extra), then for the loftq_config LoftQ needs
    assert problem.startswith("adapter: LoraConfig ") and ("scipy" in problem or "loftq_config" in problem)
    [problem] = recipe_problems(tiny_model_dir, {"method": "prompt", "num_virtual_tokens": 4,
                                                 "prompt_tuning_init": "txt"})
    assert problem == "adapter.prompt_tuning_init: must be one of TEXT, SAMPLE_VOCAB, RANDOM, got 'txt'"
    assert recipe_problems(tiny_model_dir, {"method": "prefix", "task_type": "SEQ_CLS", "num_virtual_tokens": 4}) == [
        "adapter.task_type: set by lorakit from the recipe and the model; remove it"
    ]


def test_lorakit_keys_a_method_does_not_use(tiny_model_dir):
    assert recipe_problems(tiny_model_dir, {"method": "ia3", "r": 8}) == [
        "adapter.r: not used by method ia3 (IA3 learns scaling vectors: no rank, alpha or dropout); remove it"
    ]
    [problem] = recipe_problems(tiny_model_dir, {"method": "prompt", "num_virtual_tokens": 4,
                                                 "target_modules": ["q_proj"], "lora_dropout": 0.1})
    assert problem.startswith("adapter.lora_dropout, adapter.target_modules: not used by method prompt")
    assert recipe_problems(tiny_model_dir, {"method": "prefix"}) == [
        "adapter.num_virtual_tokens: required for method prefix (e.g. num_virtual_tokens: 20)"
    ]


def test_method_defaults_resolved_in_the_schema(tiny_model_dir):
    lora = make_recipe(tiny_model_dir, {"method": "dora"}).adapter
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.target_modules) == (16, 32.0, 0.05, "all-linear")
    ia3 = make_recipe(tiny_model_dir, {"method": "ia3"}).adapter
    assert (ia3.r, ia3.lora_alpha, ia3.target_modules) == (None, None, None)
    assert make_recipe(tiny_model_dir, {"method": "bottleneck"}).adapter.r == 16


@pytest.mark.parametrize("method", list(METHODS))
def test_resolved_recipe_round_trips(method, tiny_model_dir):
    """recipe.yaml holds the resolved recipe (r: null for ia3 and the like): it must load back unchanged."""
    import yaml

    from lorakit.config.load import dump_recipe

    recipe = make_recipe(tiny_model_dir, METHODS[method])
    assert parse_recipe(yaml.safe_load(dump_recipe(recipe))) == recipe


def test_non_mergeable_methods_cannot_save_merged(tiny_model_dir):
    [problem] = recipe_problems(tiny_model_dir, METHODS["bottleneck"], output={"save": "merged"})
    assert problem.startswith("output.save: 'merged' needs a mergeable adapter.method (lora, dora, ia3)")
    [problem] = recipe_problems(tiny_model_dir, METHODS["prompt"], data={"train": "x.jsonl", "packing": True})
    assert problem.startswith("data.packing: not possible with adapter.method prompt")


@pytest.mark.parametrize("option", [{"layer_replication": [[0, 2], [1, 2]]}, {"use_qalora": True}])
def test_lora_variants_merge_refuses_cannot_save_merged(tiny_model_dir, option):
    """output.save: merged with a LoRA variant `lorakit merge` refuses trained the whole run and then failed at the
    merge (exit 2, the adapter saved); now the recipe is refused at validation."""
    adapter = {"method": "lora", "target_modules": ["q_proj", "v_proj"], **option}
    [problem] = recipe_problems(tiny_model_dir, adapter, output={"save": "both"})
    assert problem.startswith(f"output.save: 'both' cannot merge an adapter trained with adapter.{next(iter(option))}")
    assert make_recipe(tiny_model_dir, adapter).output.save == "adapter"


@pytest.mark.parametrize("adapter,message", [
    ({"method": "lora", "target_modules": ["qproj", "v_proj"]},
     "adapter.target_modules: 'qproj' matches no module (did you mean q_proj?); linear modules are q_proj, k_proj, "
     "v_proj, o_proj, gate_proj, up_proj, down_proj"),
    ({"method": "dora", "target_modules": r".*\.attn\..*"},
     r"adapter.target_modules: regex '.*\\.attn\\..*' matches no module"),
    ({"method": "ia3", "feedforward_modules": ["up_proj"]},
     "adapter.feedforward_modules: up_proj not in adapter.target_modules (k_proj, v_proj, down_proj)"),
    ({"method": "lora", "target_modules": "q_proj,v_proj"},  # --set adapter.target_modules=q_proj,v_proj
     "adapter.target_modules: regex 'q_proj,v_proj' matches no module (it must match the full name, e.g. "
     "model.layers.0.self_attn.q_proj); linear modules are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
     "down_proj; a list is written [q_proj, v_proj] (--set 'adapter.target_modules=[q_proj, v_proj]')"),
])
def test_target_errors_name_the_linear_modules(tiny_model_dir, adapter, message):
    with pytest.raises(UsageError) as info:
        build_model(make_recipe(tiny_model_dir, adapter))
    assert str(info.value).startswith(message) and info.value.exit_code == EXIT_USAGE


def test_feedforward_outside_explicit_targets_is_a_recipe_error(tiny_model_dir):
    [problem] = recipe_problems(tiny_model_dir, {"method": "ia3", "target_modules": ["q_proj"],
                                                 "feedforward_modules": ["down_proj"]})
    assert problem.startswith("adapter.feedforward_modules: down_proj not in adapter.target_modules (q_proj)")


def test_regex_targets_select_modules(tiny_model_dir):
    model = build_model(make_recipe(tiny_model_dir, {"method": "lora", "r": 2,
                                                     "target_modules": r".*layers\.1\.self_attn\.(q|v)_proj"}))
    adapted = sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A") and n.endswith("_proj"))
    assert [n.removeprefix("base_model.model.") for n in adapted] == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"
    ]


def test_cli_validate_unknown_key_exit_2(tmp_path, tiny_model_dir):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": "x.jsonl"},
                                    "train": {"max_steps": 1}, "adapter": {"method": "ia3", "feedforwrd_modules": []}}))
    result = cli("validate", path)
    assert result.exit_code == EXIT_USAGE
    assert "adapter.feedforwrd_modules: unknown key for method ia3 (IA3Config); did you mean feedforward_modules?" \
        in result.output and "Traceback" not in result.output


def test_validate_stays_free_of_torch_without_pass_through():
    code = (
        "import sys; from lorakit.config.load import parse_recipe\n"
        "for m in ('lora', 'ia3', 'bottleneck'):\n"
        "    parse_recipe({'model': {'name_or_path': 'x'}, 'adapter': {'method': m}, 'data': {'train': 'x'},"
        " 'train': {'max_steps': 1}})\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------------------------------------
# Quantized bases: k-bit preparation, checkpointing, the CPU workarounds and their sentinels


@pytest.mark.parametrize("upcast", [False, True])
def test_qlora_base_is_prepared_and_checkpointing_trains(tiny_model_dir, upcast):
    recipe = make_recipe(tiny_model_dir, {**METHODS["lora"], "lora_dropout": 0.0}, "nf4",
                         train={"max_steps": 1, "gradient_checkpointing": True})
    recipe.model.dtype = "bfloat16"  # compute and storage dtype of the 4-bit base
    recipe.model.upcast_unquantized = upcast  # unquantized weights: bf16 as in LoRA, or fp32 (PEFT's k-bit prep)
    model = build_model(recipe)
    base = model.get_base_model()
    q_proj = base.model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj).__name__ == "Linear4bit" and q_proj.weight.quant_type == "nf4"
    assert q_proj.weight.quant_state.nested  # model.double_quant defaults to true
    assert q_proj.compute_dtype == torch.bfloat16 and q_proj.weight.quant_storage == torch.bfloat16
    assert base.is_activation_checkpointing
    kept = torch.float32 if upcast else torch.bfloat16
    assert all(p.dtype == kept for n, p in base.named_parameters() if "norm" in n)
    assert base.get_input_embeddings().weight.dtype == base.get_output_embeddings().weight.dtype == kept
    train_steps(model, steps=1)
    # after an eval pass (where bitsandbytes would repack weights on CPU) training still computes the same grads
    grads = grads_before_and_after_eval(model)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=0)


def grads_before_and_after_eval(model) -> list[torch.Tensor]:
    """A LoRA B gradient from a fresh model, then again after an eval-mode forward (where bitsandbytes repacks)."""
    grads = []
    for evaluate_first in (False, True):
        if evaluate_first:
            logits(model)
        model.train()
        model.zero_grad()
        model(**batch()).loss.backward()
        grads.append(model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.grad.clone())
    return grads


def test_dora_int8_refused_on_cpu(tiny_model_dir):
    with pytest.raises(UsageError, match="dora on an int8 base does not run on CPU"):
        build_model(make_recipe(tiny_model_dir, METHODS["dora"], "int8"))


def _has_avx512bf16() -> bool:
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return has_avx512bf16()


@pytest.mark.skipif(not _has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
def test_bnb_cpu_repacking_still_breaks_qlora(tiny_model_dir):
    """Sentinel for lorakit.compat.keep_bnb_4bit_layout: when this fails, bitsandbytes is fixed; remove it."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, quantization_config=quant)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))
    grads = grads_before_and_after_eval(model)
    assert not torch.allclose(grads[0], grads[1], atol=1e-3)


def test_peft_dora_int8_cpu_still_broken(tiny_model_dir):
    """Sentinel for lorakit.compat.dora_int8_broken_on_cpu: when this fails, PEFT is fixed."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(AttributeError):
        for _ in range(2):
            model(**batch()).loss.backward()


def test_prefix_training_breaks_only_with_old_peft_on_new_transformers(tiny_model_dir, monkeypatch):
    """PEFT < 0.22 passes a prefix as past_key_values, an alias transformers keeps until 5.40: from then on prefix
    training would train a prefix the model never sees, so lorakit refuses that pair (exit 2, naming the fix)."""
    import peft
    import transformers

    from lorakit.compat import prefix_training_breaks

    assert prefix_training_breaks("0.21.2", "5.40.0") and prefix_training_breaks("0.21.2", "5.40.0.dev0")
    assert not prefix_training_breaks("0.21.2", "5.39.1") and not prefix_training_breaks("0.22.0", "5.40.0")
    assert not prefix_training_breaks()  # the installed (locked) pair trains prefixes: see the prefix-moves test
    recipe = make_recipe(tiny_model_dir, METHODS["prefix"])
    monkeypatch.setattr(peft, "__version__", "0.21.2")  # a pair this machine cannot install yet
    monkeypatch.setattr(transformers, "__version__", "5.40.0")
    with pytest.raises(UsageError, match=r"^adapter.method: prefix tuning with peft 0.21.2 under transformers "
                                         r"5.40.0: .*pip install 'peft>=0.22'$"):
        build_model(recipe)


# ----------------------------------------------------------------------------------------------------------
# 8-bit optimizers


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers(name):
    import bitsandbytes as bnb

    from lorakit.config.schema import TrainSection
    from lorakit.training.optim import build_optimizer, paging_warning

    layer = torch.nn.Linear(128, 64)  # 8,192 weights: above bitsandbytes' 4,096 minimum for 8-bit states
    optimizer = build_optimizer(layer, TrainSection(max_steps=1, optimizer=name, learning_rate=1e-2))
    assert type(optimizer) is (bnb.optim.PagedAdamW8bit if torch.cuda.is_available() and "paged" in name
                               else bnb.optim.AdamW8bit)
    before = layer.weight.detach().clone()
    layer(torch.randn(4, 128)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(before, layer.weight.detach())
    assert optimizer.state[layer.weight]["state1"].dtype == torch.uint8
    note = paging_warning(TrainSection(max_steps=1, optimizer=name))  # warned at the start of a run
    assert (note is not None) == (name == "paged_adamw_8bit" and not torch.cuda.is_available())


# ----------------------------------------------------------------------------------------------------------
# The real training loop


@pytest.mark.slow
@pytest.mark.parametrize("adapter,quant,optimizer", [
    (METHODS["lora"], "nf4", "adamw_8bit"),
    (METHODS["bottleneck"], "none", "paged_adamw_8bit"),
    (METHODS["prompt"], "int8", "adamw"),
], ids=["qlora-nf4", "bottleneck", "prompt-int8"])
def test_run_training_each_kind(adapter, quant, optimizer, tiny_model_dir, tmp_path, capsys):
    from lorakit.console import configure
    from lorakit.training.run import run_training

    data = recipe_dict(tiny_model_dir, write_data(tmp_path / "d.jsonl", 16), tmp_path / "run",
                       max_steps=3, optimizer=optimizer, eval_every=2)
    data["adapter"] = adapter
    data["model"]["quantization"] = quant
    data["data"]["eval_split"] = 0.25
    recipe = parse_recipe(data)
    configure()  # normal output: an earlier test's --json-logs or --quiet stays set in this process
    run = run_training(recipe)
    paged_on_cpu = optimizer == "paged_adamw_8bit" and not torch.cuda.is_available()
    assert ("warning: train.optimizer: paged_adamw_8bit" in capsys.readouterr().err) == paged_on_cpu
    base = load_base_model(recipe.model, str(tiny_model_dir))
    base_logits = logits(base)
    trained = logits(load_adapter(base, run / "adapter"))
    assert trained.isfinite().all() and not torch.equal(trained, base_logits)


def test_lora_bias_on_a_bias_less_layer_cannot_save_merged(tiny_model_dir, tmp_path):
    """adapter.lora_bias on Llama's bias-less projections with output.save: merged trained the whole run and then
    failed at the merge (exit 4: 'has a LoRA bias but the base layer has no bias'); now exit 2 before training.
    Qwen2's q/k/v carry a bias, so there the bias merges and the recipe builds."""
    from lorakit.testing import build_tiny_llama

    adapter = {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"], "lora_bias": True}
    with pytest.raises(UsageError, match=r"adapter.lora_bias: model.layers.0.self_attn.q_proj has no bias .*"
                                         r"\(output.save: merged\); set output.save: adapter"):
        build_model(make_recipe(tiny_model_dir, adapter, output={"save": "merged"}))
    assert build_model(make_recipe(tiny_model_dir, adapter)) is not None  # the adapter alone: PEFT trains it
    qwen2 = build_tiny_llama(tmp_path / "qwen2", architecture="qwen2")
    assert build_model(make_recipe(qwen2, adapter, output={"save": "both"})) is not None
    # Such an adapter saved alone: `lorakit merge` refused it as a damaged adapter (exit 4) with no way forward
    from peft import LoraConfig

    from lorakit.testing import build_random_adapter

    saved = build_random_adapter(tiny_model_dir, tmp_path / "biased", LoraConfig(
        r=4, target_modules=["q_proj"], lora_bias=True, init_lora_weights=False))
    result = cli("merge", saved, "-o", tmp_path / "merged")
    assert result.exit_code == 2 and "has a LoRA bias (lora_bias) but the base layer has none" in result.output
    assert "lorakit generate --adapter" in result.output and not (tmp_path / "merged").exists()


@pytest.mark.parametrize("adapter,message", [
    ({"method": "prefix", "num_virtual_tokens": 0}, "adapter.num_virtual_tokens: must be a positive integer"),
    ({"method": "prompt", "num_virtual_tokens": -3}, "adapter.num_virtual_tokens: must be a positive integer"),
    ({"method": "bottleneck", "scaling": 0}, "adapter.scaling: a nonzero number"),
])
def test_adapters_that_would_train_nothing_are_refused(tiny_model_dir, adapter, message):
    """num_virtual_tokens 0 built an adapter of 0 parameters and bottleneck scaling 0 one whose output vanishes: both
    trained a whole run at grad_norm 0 and saved an adapter equal to the base (exit 0), as lora_alpha 0 or
    learning_rate 0 would, which were already refused."""
    [problem] = recipe_problems(tiny_model_dir, adapter)
    assert problem.startswith(message), problem
