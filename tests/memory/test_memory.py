"""lorakit estimate-memory: exact counts against PEFT on meta models, every breakdown line against a hand
computation, bitsandbytes constants against a really quantized model, JSON shape, fit-advice monotonicity, CLI."""

import json
import math
import subprocess
import sys
import time

import pytest
import torch
import yaml
from typer.testing import CliRunner

from lorakit.cli.main import app
from lorakit.memory.lines import GiB, Settings
from lorakit.memory.estimate import estimate
from lorakit.memory.profile import inspect_model
from lorakit.memory.report import compare_methods, fit_advice, largest, parse_size
from lorakit.models.presets import config_from_dict, load_model_config, preset_names, read_preset
from lorakit.config.schema import AdapterSection

runner = CliRunner()
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def peft_counts(config, targets, r=8, **extra):
    """The reference: PEFT's own count on the whole model built on the meta device."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=r, target_modules=targets, **extra))
    return peft_model.get_nb_trainable_parameters()


def scaled(preset: str, **dims):
    """A preset's architecture with small dimensions (every family-specific key kept)."""
    data = read_preset(preset)
    data.update(dims)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in data:
            data[key] = 0
    return config_from_dict(data, preset)


SMALL = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
             vocab_size=300)
FAMILIES = {
    "llama": (scaled("llama-3.1-8b", **SMALL), ["q_proj", "v_proj"]),
    "mistral": (scaled("mistral-7b", **SMALL), QKVO),
    "qwen2": (scaled("qwen2.5-7b", **SMALL), ["q_proj", "k_proj", "down_proj"]),
    "gemma2": (scaled("gemma-2-2b", **SMALL, head_dim=16), ["q_proj", "up_proj"]),
    "phi3": (scaled("phi-3-mini", **{**SMALL, "num_key_value_heads": 4}), ["qkv_proj", "o_proj"]),
    "gpt2": (scaled("gpt2", n_embd=64, n_head=4, n_layer=3, vocab_size=300), ["c_attn"]),
    "mixtral": (scaled("mixtral-8x7b", **SMALL, num_local_experts=4), ["q_proj", "o_proj"]),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("all_linear", [False, True])
def test_counts_equal_peft_on_meta_models(family, all_linear):
    config, targets = FAMILIES[family]
    targets = "all-linear" if all_linear else targets
    # PEFT adapts Mixtral's fused expert parameters under all-linear, and those take no dropout.
    dropout = 0.0 if family == "mixtral" else 0.05
    profile = inspect_model(config, AdapterSection(r=8, target_modules=targets, lora_dropout=dropout))
    assert (profile.trainable_params, profile.total_params) == peft_counts(config, targets, lora_dropout=dropout)
    assert sum(profile.adapter_tensors) == profile.trainable_params


def test_mistral_7b_exact_figure():
    config, _ = load_model_config("mistral-7b")
    profile = inspect_model(config, AdapterSection(r=16, target_modules=QKVO))
    assert profile.base_params == 7_241_732_096
    assert (profile.trainable_params, profile.total_params) == (13_631_488, 7_255_363_584)


@pytest.mark.parametrize("extra", [{}, {"layers_to_transform": [0, 5, 33]}])
def test_many_layers_extrapolate_exactly(extra):
    """Over 32 identical layers two are adapted and multiplied; layer-specific options adapt every layer."""
    config = scaled("llama-2-70b", **{**SMALL, "num_hidden_layers": 34})
    for targets in (["q_proj", "v_proj"], "all-linear")[: 1 if extra else 2]:  # PEFT: layers need a target list
        profile = inspect_model(config, AdapterSection(r=4, target_modules=targets, **extra))
        assert (profile.trainable_params, profile.total_params) == peft_counts(config, targets, r=4, **extra)
        adapted = set(extra["layers_to_transform"]) if extra else set(range(34))
        assert {m.layer for m in profile.lora_modules} == adapted


def test_presets_record_their_source_and_parameter_count():
    from lorakit.models.meta import build_meta_model

    names = preset_names()
    for required in ("llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "llama-3.1-8b",
                     "llama-3.1-70b", "llama-3.1-405b", "mistral-7b", "mixtral-8x7b", "qwen2.5-0.5b", "qwen2.5-72b",
                     "gemma-2-2b", "gemma-2-9b", "gemma-2-27b", "phi-3-mini", "gpt2"):
        assert required in names
    for name in names:
        source = read_preset(name)["_source"]
        assert source["file"] == "config.json" and "/" in source["hub_id"]
        config, _ = load_model_config(name)
        assert sum(p.numel() for p in build_meta_model(config).parameters()) == source["parameters"], name


# ----------------------------------------------------------------------------------------------------------
# Every line against a hand computation (tiny Llama: h 64, q 64, kv 32, i 128, V 512, 2 layers, head_dim 16)

H, Q, KV, I, V, L, HD, HEADS = 64, 64, 32, 128, 512, 2, 16, 4
BASE = V * H * 2 + L * (H * Q + 2 * H * KV + Q * H + 3 * H * I + 2 * H) + H


def test_loss_path_follows_lorakit_loss(tiny):
    from lorakit.memory.activations import loss_path

    assert loss_path(tiny, Settings()) == "chunked"
    assert loss_path(tiny, Settings(chunked_loss=False)) == "plain"
    assert loss_path(tiny, Settings(gpus=2, strategy="fsdp")) == "plain"  # a sharded head runs in the forward
    assert loss_path(tiny, Settings(gpus=2, strategy="ddp")) == "chunked"
    on_head = inspect_model(tiny_config(), AdapterSection(r=8, target_modules=["q_proj", "lm_head"]))
    assert loss_path(on_head, Settings()) == "plain"
    prompt = inspect_model(tiny_config(), AdapterSection(method="prompt", num_virtual_tokens=4))
    assert loss_path(prompt, Settings()) == "plain"
    gemma, _ = FAMILIES["gemma2"]
    assert loss_path(inspect_model(gemma, AdapterSection(r=8, target_modules=["q_proj"])), Settings()) == "plain"


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=HEADS,
                       num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny():
    return inspect_model(tiny_config(), AdapterSection(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.05))


def lines(est):
    return {line.key: line.bytes for line in est.lines}


def test_lines_lora_bf16_by_hand(tiny):
    b, s, e, r = 2, 16, 2, 8
    T = b * s
    adapter = L * (r * (H + Q) + r * (H + KV))
    assert tiny.base_params == BASE and tiny.trainable_params == adapter and tiny.buffer_bytes == 2 * (HD // 2) * 4
    got = lines(estimate(tiny, Settings(batch_size=b, seq_len=s, dtype="bfloat16")))
    assert got["weights"] == BASE * e + tiny.buffer_bytes
    assert got["adapter_weights"] == got["gradients"] == adapter * 4
    assert got["optimizer_states"] == 2 * adapter * 4 + 4 * (4 * L)
    norm, attention, mlp = T * (4 * H + 4), T * (2 * Q + 2 * KV) * e + T * HEADS * 4, 3 * T * I * e
    lora_no_mask = T * r * 4 + T * H * 4  # layer 0: the embeddings are frozen, so no dropout mask is kept
    lora = T * r * 4 + T * H * (4 + 1)
    layer0 = 2 * lora_no_mask + attention + norm + mlp  # layer 0's input norm keeps nothing
    layer1 = norm + 2 * lora + attention + norm + mlp
    assert got["activations"] == layer0 + layer1 + norm + 2 * s * HD * e
    # chunked loss (the default): one chunk of n = T - b rows; on a GPU logsumexp adds an fp32 temporary
    n = T - b
    chunk = max(n * V * 8, n * V * (4 + e) + n * H * e)
    # the decoder's output, caught by a hook, is freed once the supervised rows are selected: no T·h term; the
    # model's own head computes no logits (an empty logits_to_keep): no b·V term
    assert got["logits_and_loss"] == chunk + 2 * n * H * e + 24 * T
    plain = lines(estimate(tiny, Settings(batch_size=b, seq_len=s, dtype="bfloat16", chunked_loss=False)))
    assert plain["logits_and_loss"] == 12 * T * V + 16 * T
    assert got["backward_transient"] == T * (I + 2 * H) * e
    assert got["optimizer_step"] == adapter * 4  # foreach AdamW on a GPU: sqrt(v) of every trainable param
    assert got["framework_overhead"] == GiB
    static = got["weights"] + got["adapter_weights"] + got["gradients"] + got["optimizer_states"]
    training = got["activations"] + max(got["logits_and_loss"], got["backward_transient"])
    total = static + max(training, got["optimizer_step"]) + GiB
    assert estimate(tiny, Settings(batch_size=b, seq_len=s)).total_bytes == total


@pytest.mark.parametrize("adapter", [dict(method="ia3"), dict(method="bottleneck"),
                                     dict(method="prefix", num_virtual_tokens=4),
                                     dict(method="prompt", num_virtual_tokens=4)])
def test_methods_without_lora_modules_keep_every_layers_activations(adapter):
    """IA3, bottleneck, prefix and prompt train something in (or before) every layer, so gradients flow through
    all of them and each keeps its activations. The estimate counted none (nothing was kept 'before the first
    adapted module', and there were no LoRA modules to find): 0.03 GiB of activations for Mistral-7B at 4 × 512
    tokens, where a tiny CPU run measured twice the estimated total (scripts/bench_memory.py's tracker: IA3 30.7
    MiB measured, 14.1 estimated; now 27.2)."""
    b, s, e = 2, 16, 4
    T = b * s
    got = lines(estimate(inspect_model(tiny_config(), AdapterSection(**adapter)), Settings(batch_size=b, seq_len=s,
                                                                                             dtype="float32")))
    norm, attention, mlp = T * (4 * H + 4), T * (2 * Q + 2 * KV) * e + T * HEADS * 4, 3 * T * I * e
    assert got["activations"] == L * (2 * norm + attention + mlp) + norm + 2 * s * HD * e


@pytest.mark.parametrize("checkpointing", [False, True])
def test_cpu_loss_line_by_hand(tiny, checkpointing):
    """On a CPU a frozen head's loss holds one block of the vocabulary (lorakit.training.loss._blocked_logps), not
    whole-vocabulary chunks: the line is that block's peak (measured against the loss in tests/training/test_loss.py)
    plus the same terms as on a GPU."""
    from lorakit.memory.estimate import _blocked_peak
    from lorakit.training.loss import CPU_ROWS, CPU_VOCAB_BLOCK

    b, s, e = 2, 16, 2
    T, n = b * s, b * s - b
    settings = Settings(batch_size=b, seq_len=s, dtype="bfloat16", device="cpu", gradient_checkpointing=checkpointing)
    got = lines(estimate(tiny, settings))
    block = _blocked_peak(n, CPU_ROWS, min(CPU_VOCAB_BLOCK, V), H, e)
    assert block == n * V * (4 + e) + n * H * (4 + e) + 48 * n  # V < CPU_VOCAB_BLOCK: one block, one chunk
    kept = 2 * T * H * e if checkpointing else 0
    assert got["logits_and_loss"] == block + 2 * n * H * e + kept + 24 * T


@pytest.mark.parametrize("upcast", [False, True])
def test_lines_qlora_checkpointing_by_hand(tiny, upcast):
    b, s, r = 1, 32, 8
    # model.upcast_unquantized (prepare_model_for_kbit_training) runs the residual stream in fp32; else bf16
    T, e, kept = b * s, 4 if upcast else 2, "float32" if upcast else "bfloat16"
    weights = [H * Q, H * KV, H * KV, Q * H, H * I, H * I, I * H] * L
    blocks = [math.ceil(n / 64) for n in weights]
    est = estimate(tiny, Settings(batch_size=b, seq_len=s, quantization="nf4", double_quant=True,
                                  gradient_checkpointing=True, upcast_unquantized=upcast))
    parts = est.line("weights").parts
    assert parts["nf4"] == sum(n // 2 for n in weights)
    assert parts["nf4_constants"] == sum(blocks) + 4 * sum(math.ceil(k / 256) for k in blocks) + 1092 * len(weights)
    assert parts[kept] == (BASE - sum(weights)) * e
    got = lines(est)
    norm = T * (4 * H + 4)
    assert got["activations"] == L * T * H * e + norm + 2 * s * HD * e
    layer1 = norm + 2 * (T * r * 4 + T * H * (4 + 1)) + T * (2 * Q + 2 * KV) * e + T * HEADS * 4 + norm + 3 * T * I * e
    assert got["backward_transient"] == T * (I + 2 * H) * e + layer1 + H * I * 2  # + one dequantized weight


def test_lines_full_finetuning_by_hand(tiny):
    b, s, e = 1, 8, 2
    T = b * s
    got = lines(estimate(tiny, Settings(method="full", batch_size=b, seq_len=s, dtype="bfloat16", chunked_loss=False)))
    assert got["weights"] - tiny.buffer_bytes == got["gradients"] == BASE * e
    assert got["adapter_weights"] == 0
    assert got["optimizer_states"] == 2 * BASE * e + 4 * len(tiny.base_tensors)
    norm = T * (4 * H + 4) + T * H * e
    # the inputs of q/k/v, gate/up and down; o_proj reads the attention output sdpa keeps anyway
    layer = 2 * norm + T * (2 * Q + 2 * KV) * e + T * HEADS * 4 + 3 * T * I * e + T * (H + H + I) * e
    assert got["activations"] == L * layer + norm + T * H * e + 2 * s * HD * e  # + the head's input
    chunked = lines(estimate(tiny, Settings(method="full", batch_size=b, seq_len=s, dtype="bfloat16")))
    assert chunked["activations"] == got["activations"] - T * H * e  # the chunked loss applies the head itself


def test_8bit_optimizer_and_per_device(tiny):
    profile = inspect_model(tiny_config(), AdapterSection(r=64, target_modules=["q_proj"]))
    opt = estimate(profile, Settings(optimizer="paged_adamw_8bit")).line("optimizer_states")
    assert opt.bytes == 2 * L * (2 * 4096 + 8 * 16) + 2048 and opt.parts["pageable"] == 0
    ddp = estimate(tiny, Settings(gpus=2, strategy="ddp"))
    assert ddp.per_device_bytes == ddp.total_bytes + ddp.line("gradients").bytes
    fsdp = estimate(tiny, Settings(gpus=4, strategy="fsdp"))
    one = lines(fsdp)  # every line is for one GPU; FSDP shards the static ones
    static = one["weights"] + one["adapter_weights"] + one["gradients"] + one["optimizer_states"]
    outside = 2 * V * H + H
    per_layer = (one["weights"] - outside * 2 - tiny.buffer_bytes) // L
    training = one["activations"] + max(one["logits_and_loss"], one["backward_transient"])
    gathered = outside * 2 + 2 * per_layer
    assert fsdp.per_device_bytes == static // 4 + max(gathered + training, one["optimizer_step"] // 4) + GiB


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bytes_equal_a_really_quantized_model(tiny_model_dir, double_quant):
    """Packed weights and every quantization constant, as bitsandbytes stores them."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                               bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, quantization_config=quant)
    packed = consts = 0
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            packed += module.weight.numel() * module.weight.element_size()
            state = module.weight.quant_state
            tensors = [state.absmax, state.code]
            if double_quant:
                tensors += [state.offset, state.state2.absmax, state.state2.code]
            consts += sum(t.numel() * t.element_size() for t in tensors)
    config, _ = load_model_config(str(tiny_model_dir))
    parts = estimate(inspect_model(config, AdapterSection()), Settings(quantization="nf4", double_quant=double_quant,
                                                                      device="cpu")).line("weights").parts
    assert (parts["nf4"], parts["nf4_constants"]) == (packed, consts)
    from peft import get_peft_model

    from lorakit.config.methods import build_peft_config

    real = get_peft_model(model, build_peft_config(AdapterSection())).get_nb_trainable_parameters()
    profile = inspect_model(config, AdapterSection())
    assert (profile.trainable_params, profile.total_params) == real


# ----------------------------------------------------------------------------------------------------------
# Reference points, fit advice


@pytest.fixture(scope="module")
def mistral():
    config, source = load_model_config("mistral-7b")
    return inspect_model(config, AdapterSection(r=16, target_modules=QKVO), "mistral-7b", source)


def test_reference_points_of_the_seed():
    config, _ = load_model_config("llama-2-70b")
    profile = inspect_model(config, AdapterSection(r=16, target_modules=QKVO))
    full = dict(compare_methods(profile, Settings(batch_size=1, seq_len=512)))["full (float32)"]
    static = sum(full.line(k).bytes for k in ("weights", "gradients", "optimizer_states"))
    assert static == pytest.approx(16 * profile.base_params, rel=1e-6) and 1.0e12 < static < 1.2e12  # ~1.1 TB
    config, _ = load_model_config("llama-65b")
    qlora = inspect_model(config, AdapterSection(r=64, target_modules="all-linear"))
    settings = Settings(quantization="nf4", batch_size=1, seq_len=512, gradient_checkpointing=True,
                        optimizer="paged_adamw_8bit")
    assert fit_advice(qlora, settings, parse_size("48GB")).fits


@pytest.mark.parametrize("adapter, labels", [
    (dict(r=8, target_modules=["q_proj"]), ("lora (bfloat16)", "qlora (nf4)")),
    (dict(method="dora", r=8, target_modules=["q_proj"]), ("dora (bfloat16)", "qdora (nf4)")),
    (dict(method="ia3"), ("ia3 (bfloat16)", "ia3 (nf4)")),
    (dict(method="prompt", num_virtual_tokens=4), ("prompt (bfloat16)", "prompt (nf4)")),
    (dict(method="prefix", num_virtual_tokens=4), ("prefix (bfloat16)", "prefix (nf4)")),
    (dict(method="bottleneck", r=8), ("bottleneck (bfloat16)", "bottleneck (nf4)")),
])
def test_comparison_rows_name_the_recipes_method(adapter, labels):
    """The adapter rows are the recipe's method (their trainable counts are its own), not always lora/qlora."""
    profile = inspect_model(tiny_config(), AdapterSection(**adapter))
    rows = dict(compare_methods(profile, Settings(dtype="bfloat16")))
    assert list(rows) == ["full (float32)", "full (bfloat16)", *labels]
    assert rows[labels[0]].trainable_params == rows[labels[1]].trainable_params == estimate(
        profile, Settings()).trainable_params < rows["full (bfloat16)"].trainable_params


def test_fit_advice_is_monotone(mistral):
    settings = Settings(batch_size=4, seq_len=2048)
    need = [estimate(mistral, Settings(batch_size=b, seq_len=2048)).per_device_bytes for b in range(1, 9)]
    assert need == sorted(need) and len(set(need)) == len(need)
    need = [estimate(mistral, Settings(batch_size=2, seq_len=n)).per_device_bytes for n in (256, 512, 1024, 4096)]
    assert need == sorted(need)
    previous = None
    for gb in (16, 24, 40, 80, 141):
        advice = fit_advice(mistral, settings, gb * GiB)
        if previous:
            assert advice.max_batch_size >= previous.max_batch_size and advice.max_seq_len >= previous.max_seq_len
            assert advice.fits >= previous.fits
        for b in (advice.max_batch_size, advice.max_batch_size + 1):
            if b:
                fits = estimate(mistral, Settings(batch_size=b, seq_len=2048)).per_device_bytes <= gb * GiB
                assert fits == (b == advice.max_batch_size)
        for _, bytes_after, fits in advice.changes:
            assert fits == (bytes_after <= gb * GiB)
        previous = advice
    advice = fit_advice(mistral, settings, 24 * GiB)
    assert not advice.fits and any(fits and "gradient_checkpointing" in what for what, _, fits in advice.changes)
    what, bytes_after, fits = fit_advice(mistral, settings, 12 * GiB).changes[-1]  # no single change is enough
    assert what.startswith("together: ") and "4-bit base" in what and fits and bytes_after <= 12 * GiB


def test_largest_and_sizes():
    assert largest(lambda n: n <= 37, 1000) == 37 and largest(lambda n: False, 10) == 0
    assert parse_size("24GB") == parse_size("24 GiB") == 24 * GiB and parse_size("512MB") == 512 * 2**20


# ----------------------------------------------------------------------------------------------------------
# CLI


def test_cli_text_and_explain():
    result = runner.invoke(app, ["estimate-memory", "--model", "mistralai/Mistral-7B-v0.1", "--targets",
                                 "q_proj,k_proj,v_proj,o_proj", "--explain", "--gpu-memory", "24GB"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "trainable params: 13,631,488 || all params: 7,255,363,584" in out
    assert "= 7,241,732,096 params × 2 B (bfloat16)" in out and "chunked loss (lorakit.training.loss)" in out
    assert "Comparison" in out and "full (float32)" in out and "does not fit" in out


def test_cli_json_carries_every_formula_explain_prints():
    text = runner.invoke(app, ["estimate-memory", "--model", "mistral-7b", "--gpus", "2", "--explain"]).stdout
    result = runner.invoke(app, ["estimate-memory", "--model", "mistral-7b", "--gpus", "2", "--json"])
    data = json.loads(result.stdout)
    shown = [*data["formulas"].values(), *data["activation_formulas"], data["peak_formula"], data["per_device_formula"]]
    explained = [line.strip().removeprefix("= ") for line in text.splitlines() if line.startswith("      ")]
    assert explained and sorted(explained) == sorted(shown)


def test_cli_json_shape_and_recipe_overrides(tiny_model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir), "quantization": "nf4"},
        "adapter": {"r": 4, "target_modules": ["q_proj"]},
        "data": {"train": "x.jsonl", "max_seq_len": 64, "packing": True},
        "train": {"max_steps": 1, "micro_batch_size": 2, "gradient_checkpointing": True},
    }))
    result = runner.invoke(app, ["estimate-memory", str(recipe), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"total_params", "trainable_params", "bytes", "total_bytes", "per_device_bytes"} <= set(data)
    assert set(data["bytes"]) == {"weights", "adapter_weights", "gradients", "optimizer_states", "activations",
                                  "logits_and_loss", "backward_transient", "optimizer_step", "framework_overhead"}
    b = data["bytes"]
    training = b["activations"] + max(b["logits_and_loss"], b["backward_transient"])
    assert data["total_bytes"] == data["per_device_bytes"] == (
        b["weights"] + b["adapter_weights"] + b["gradients"] + b["optimizer_states"]
        + max(training, b["optimizer_step"]) + b["framework_overhead"])
    s = data["settings"]
    assert (s["quantization"], s["batch_size"], s["seq_len"], s["gradient_checkpointing"]) == ("nf4", 2, 64, True)
    assert data["trainable_params"] == 2 * 4 * (64 + 64)
    result = runner.invoke(app, ["estimate-memory", str(recipe), "--json", "--batch-size", "3", "--method", "lora",
                                 "--no-gradient-checkpointing", "--model", str(tiny_model_dir / "config.json")])
    s = json.loads(result.stdout)["settings"]
    assert (s["quantization"], s["batch_size"], s["gradient_checkpointing"]) == ("none", 3, False)
    # --method lora drops the recipe's 4-bit-only keys with its quantization (else refused: no effect there)
    text = recipe.read_text()
    recipe.write_text(text.replace("quantization: nf4", "quantization: nf4\n  double_quant: false\n  upcast_unquantized: true"))
    result = runner.invoke(app, ["estimate-memory", str(recipe), "--json", "--method", "lora",
                                 "--model", str(tiny_model_dir / "config.json")])
    assert result.exit_code == 0 and json.loads(result.stdout)["settings"]["quantization"] == "none", result.output


@pytest.mark.parametrize("args, said", [
    (["--method", "lora", "--set", "model.double_quant=false"], "model.double_quant: only applies to a 4-bit base"),
    (["--objective", "sft", "--set", "train.beta=0.1"], "train.beta is for dpo/ipo/simpo: not used by train.objective"),
    (["--method", "lora", "--set", "model.quantization=nf4"],
     "--set model.quantization=nf4: --method lora sets model.quantization to none; drop one of the two"),
    (["--objective", "dpo", "--set", "data.format=chat"],
     "--set data.format=chat: --objective dpo sets data.format to preference; drop one of the two"),
    (["--r", "8", "--set", "adapter.r=16"], "--set adapter.r=16: --r 8 sets adapter.r to 8; drop one of the two"),
])
def test_a_key_the_user_sets_takes_effect_or_is_refused(tiny_model_dir, args, said):
    """--method and --objective drop the recipe's keys they leave without effect, never the user's --set keys, and
    a flag never overrides a --set without a word. Before: each printed an estimate (exit 0), the --set ignored."""
    result = runner.invoke(app, ["estimate-memory", "--model", str(tiny_model_dir), *args])
    assert result.exit_code == 2 and said in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_flag_and_a_set_that_agree_are_accepted(tiny_model_dir):
    args = ["--r", "4", "--set", "adapter.r=4", "--targets", "q_proj", "--set", "adapter.target_modules=[q_proj]"]
    result = runner.invoke(app, ["estimate-memory", "--model", str(tiny_model_dir), "--json", *args])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["trainable_params"] == 2 * 4 * (64 + 64)


def test_cli_json_logs_mode_emits_one_event():
    result = runner.invoke(app, ["--json-logs", "estimate-memory", "--model", "qwen2.5-0.5b", "--r", "8"])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    estimate_events = [e for e in events if e["event"] == "memory_estimate"]
    lora = 8 * 24 * (2 * (896 + 896) + 2 * (896 + 128) + 3 * (896 + 4864))  # r × layers × (in + out) per module
    assert len(estimate_events) == 1 and estimate_events[0]["total_params"] == 494_032_768 + lora


@pytest.mark.parametrize("args, text", [
    (["--model", "acme/no-such-model"], "offline presets: "),
    (["--model", "mistral-7b", "--gpu-memory", "lots"], "--gpu-memory"),
    (["--model", "mistral-7b", "--gpu-memory", "0GB"], "--gpu-memory 0GB: must be more than 0"),  # no advice, no word
    (["--model", "mistral-7b", "--gpu-memory", "-1GB"], "--gpu-memory -1GB: must be more than 0"),  # was "cannot read"
    (["--model", "mistral-7b", "--gpu-memory", ""], "--gpu-memory: cannot read ''"),  # was ignored
    (["--model", "mistral-7b", "--method", "bogus"], "--method"),
    (["--model", "mistral-7b", "--optimizer", "sgd"], "--optimizer: must be"),  # the flag, not train.optimizer
    (["--model", "mistral-7b", "--targets", "qproj"], "q_proj"),
    (["--model", "mistral-7b", "--targets", ""], "--targets '': empty"),  # was ignored
    (["--model", "mistral-7b", "--strategy", "fsdp"], "--strategy fsdp shards over several GPUs"),  # one GPU
    ([], "RECIPE or --model"),
    (["--model", "mistral-7b", "--json", "--explain"], "--explain: --json already gives each line's formula"),
])
def test_cli_errors_exit_2(args, text):
    result = runner.invoke(app, ["estimate-memory", *args])
    assert result.exit_code == 2 and text in result.output, result.output


def test_405b_preset_estimates_in_under_5_seconds():
    config, _ = load_model_config("llama-3.1-405b")
    start = time.perf_counter()
    profile = inspect_model(config, AdapterSection())
    estimate(profile, Settings())
    assert time.perf_counter() - start < 5
    assert profile.base_params == 405_853_388_800 and profile.total_params == 405_853_388_800 + profile.trainable_params


@pytest.mark.slow
def test_cli_as_a_subprocess():
    result = subprocess.run([sys.executable, "-m", "lorakit", "estimate-memory", "--model", "llama-3.1-8b", "--json",
                             "--method", "qlora", "--gpus", "8", "--strategy", "fsdp", "--gpu-memory", "24GB"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["total_params"] == 8_030_261_248 + data["trainable_params"]
    assert data["per_device_bytes"] < data["total_bytes"] and data["fit"]["budget_bytes"] == 24 * GiB


def test_fsdp_estimates_name_what_lorakit_train_refuses(tiny):
    def notes(**settings):
        return " | ".join(estimate(tiny, Settings(gpus=2, strategy="fsdp", **settings)).notes)

    assert "refuses" not in notes(quantization="nf4")
    assert "refuses adamw_8bit under FSDP" in notes(optimizer="adamw_8bit")
    assert "refuses model.upcast_unquantized under FSDP" in notes(quantization="nf4", upcast_unquantized=True)
    assert "int8" in notes(quantization="int8")
    assert "refuses" not in " | ".join(estimate(tiny, Settings(optimizer="adamw_8bit")).notes)  # one GPU


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_tokens_lengthen_sequences_or_attention(method):
    """Prompt tuning prepends its virtual tokens to every sequence, so every layer keeps b·(s + v) positions;
    prefix tuning joins v keys/values to every attention. The estimate counted neither (settings_from read no
    adapter.num_virtual_tokens): at 8 virtual tokens on 2 × 256 it was 2.6% and 3.9% under the measured peak."""
    from dataclasses import replace

    from lorakit.config.schema import Recipe
    from lorakit.memory.report import Flags, settings_from

    b, s, v, e = 2, 16, 4, 4
    recipe = Recipe.model_validate({"model": {"name_or_path": "x", "dtype": "float32"}, "data": {"train": "d.jsonl",
                                    "max_seq_len": s}, "train": {"micro_batch_size": b, "max_steps": 1},
                                    "adapter": {"method": method, "num_virtual_tokens": v}})
    settings = settings_from(recipe, Flags())
    assert (settings.prompt_tokens, settings.prefix_tokens) == ((v, 0) if method == "prompt" else (0, v))
    got = lines(estimate(inspect_model(tiny_config(), recipe.adapter), settings))
    seq = s + v if method == "prompt" else s
    T = b * seq
    norm, mlp = T * (4 * H + 4), 3 * T * I * e
    attention = T * (2 * Q + 2 * KV) * e + T * HEADS * 4 + (2 * b * v * KV * e if method == "prefix" else 0)
    assert got["activations"] == L * (2 * norm + attention + mlp) + norm + 2 * (s + v) * HD * e
    full = replace(settings, method="full")  # full fine-tuning's rows of the comparison have no virtual tokens
    profile = inspect_model(tiny_config(), recipe.adapter)
    plain = replace(full, prompt_tokens=0, prefix_tokens=0)
    assert estimate(profile, full).total_bytes == estimate(profile, plain).total_bytes
