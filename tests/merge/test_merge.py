"""`lorakit merge`: merged logits equal PEFT's adapter logits per method, QLoRA base precision, refusals with
their exit codes, atomic output, and a merged model that loads without PEFT."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from safetensors import safe_open
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from lorakit.cli.main import app
from lorakit.errors import VerificationError
from lorakit.merge.verify import check_verification, verify_merge
from lorakit.merge.merge import merge_adapter, read_mergeable_adapter
from lorakit.merge.plan import round_trip_weight
from lorakit.merge.plan import meta_model, plan_merge
from lorakit.testing import build_random_adapter, build_tiny_llama, build_tokenizer
from lorakit.merge.weights_io import list_tensors

IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 64, 128, 300]])
QUIET = {"log": lambda message: None}
METHODS = {
    "lora": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    "dora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
                       init_lora_weights=False),
    "rslora": LoraConfig(r=8, lora_alpha=4, target_modules=["k_proj", "o_proj", "up_proj"], use_rslora=True,
                         alpha_pattern={"up_proj": 16}, init_lora_weights=False),
    "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                     init_ia3_weights=False),
    "lora+embed+head": LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"],
                                  init_lora_weights=False),
}


def logits(model_or_dir, ids=IDS) -> torch.Tensor:
    model = model_or_dir
    if isinstance(model_or_dir, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(model_or_dir, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(ids).logits.float()


def adapter_logits(base_dir, adapter_dir) -> torch.Tensor:
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return logits(PeftModel.from_pretrained(base, adapter_dir))


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: build_random_adapter(tiny_model_dir, root / name, config, seed=i, magnitude_jitter=0.2)
        for i, (name, config) in enumerate(METHODS.items())
    }


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """GPT-2 stores its linear layers as Conv1D (fan_in_fan_out) and ties lm_head to wte."""
    out = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = build_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# ----------------------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("method", list(METHODS))
def test_merged_logits_equal_adapter_logits(method, adapters, tiny_model_dir, tmp_path):
    expected = adapter_logits(tiny_model_dir, adapters[method])
    assert (expected - logits(tiny_model_dir)).abs().max() > 1e-2  # the adapter really changes the model
    report = merge_adapter(adapters[method], tmp_path / "out", verify=False, **QUIET)
    diff = (logits(tmp_path / "out") - expected).abs().max().item()
    print(f"{method}: max |merged - adapter| logit = {diff:.2e}")
    assert diff <= 1e-4
    assert report.method == {"ia3": "ia3", "dora": "dora", "rslora": "lora+rslora"}.get(method, "lora")


@pytest.mark.parametrize("config", [
    LoraConfig(r=4, target_modules=["c_attn", "wte"], init_lora_weights=False, fan_in_fan_out=True),
    LoraConfig(r=4, target_modules=["c_attn", "c_fc"], use_dora=True, init_lora_weights=False, fan_in_fan_out=True),
    IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], init_ia3_weights=False,
              fan_in_fan_out=True),
], ids=["lora-conv1d-tied-embedding", "dora-conv1d", "ia3-conv1d"])
def test_fan_in_fan_out_and_tied_embeddings(config, tiny_gpt2, tmp_path):
    adapter = build_random_adapter(tiny_gpt2, tmp_path / "adapter", config, magnitude_jitter=0.2)
    expected = adapter_logits(tiny_gpt2, adapter)
    report = merge_adapter(adapter, tmp_path / "out", verify=False, **QUIET)
    assert (logits(tmp_path / "out") - expected).abs().max() <= 1e-4
    touches_embedding = "wte" in config.target_modules
    assert report.untied_embeddings == touches_embedding
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] != touches_embedding


def test_sharded_bfloat16_output_is_streamed_and_verified(adapters, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    report = merge_adapter(adapters["lora"], out, dtype="bfloat16", max_shard_size="40KB", verify=True, **QUIET)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(report.files) > 2 and sorted(set(index["weight_map"].values())) == sorted(report.files)
    expected = {t.key for t in list_tensors(tiny_model_dir)}
    assert set(index["weight_map"]) == expected
    for name in report.files:
        with safe_open(out / name, framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert report.kl is not None and report.kl < 1e-2  # verification ran and passed
    provenance = json.loads((out / "lorakit_merge.json").read_text())
    assert provenance["base_precision"] == "original" and provenance["dtype"] == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert (logits(merged) - adapter_logits(tiny_model_dir, adapters["lora"])).abs().max() < 0.1


def test_verification_gate_exits_1_when_logits_differ(adapters, tiny_model_dir):
    adapter = read_mergeable_adapter(adapters["lora"])
    _, model = meta_model(Path(tiny_model_dir))
    plan = plan_merge(adapter, list_tensors(Path(tiny_model_dir)), model, None, False, 10**9)
    # The unmerged base as the "merged" model: the check must see the adapter's whole effect.
    max_abs, kl = verify_merge(adapter, Path(tiny_model_dir), Path(tiny_model_dir), plan, "cpu")
    with pytest.raises(VerificationError) as raised:
        check_verification(max_abs, kl, torch.float32)
    assert raised.value.exit_code == 1 and "--no-verify" in str(raised.value)


# ----------------------------------------------------------------------------------------------------------
# QLoRA


NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)


def load_nf4(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=NF4)


@pytest.fixture(scope="module")
def qlora_adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA trained (here: randomly initialised) on the NF4-quantized base, with lorakit's record of that,
    and the logits of that adapter on that 4-bit base."""
    out = tmp_path_factory.mktemp("qlora") / "adapter"
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    build_random_adapter(tiny_model_dir, out, config, model=load_nf4(tiny_model_dir))
    record = {"base_model": str(tiny_model_dir), "base_model_path": str(tiny_model_dir), "quantization": "nf4",
              "double_quant": True, "dtype": "float32", "method": "lora"}
    (out / "lorakit.json").write_text(json.dumps(record))
    return out, logits(PeftModel.from_pretrained(load_nf4(tiny_model_dir), out))


def test_round_trip_is_the_weight_the_4bit_base_holds(tiny_model_dir):
    from peft.utils.integrations import dequantize_module_weight

    # Before any forward pass: on CPU, bitsandbytes repacks 4-bit weights for its kernels at the first forward.
    layer = "model.layers.1.mlp.gate_proj"
    held = dequantize_module_weight(load_nf4(tiny_model_dir).get_submodule(layer))
    weight = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).get_submodule(layer).weight
    record = {"quantization": "nf4", "double_quant": True, "dtype": "float32"}
    assert not torch.equal(weight.data, held)
    assert torch.equal(round_trip_weight(weight.data, record), held)


def test_qlora_dequantized_base_is_closer_to_what_was_trained(qlora_adapter, tmp_path):
    adapter, reference = qlora_adapter
    default = merge_adapter(adapter, tmp_path / "default", verify=True, **QUIET)
    original = merge_adapter(adapter, tmp_path / "original", base_precision="original", verify=False, **QUIET)
    assert default.base_precision == "dequantized" and original.base_precision == "original"
    gap_dequantized = (logits(tmp_path / "default") - reference).abs().max().item()
    gap_original = (logits(tmp_path / "original") - reference).abs().max().item()
    print(f"max |merged - adapter on nf4 base|: dequantized {gap_dequantized:.2e}, original {gap_original:.2e}")
    assert gap_dequantized < gap_original / 5


# ----------------------------------------------------------------------------------------------------------
# Refusals


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("other"), hidden_size=32, intermediate_size=64)


def test_non_mergeable_methods_exit_2_and_point_to_generate(tiny_model_dir, adapters, tmp_path):
    prompt = build_random_adapter(tiny_model_dir, tmp_path / "prompt",
                                  PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    p_tuning = build_random_adapter(tiny_model_dir, tmp_path / "p_tuning",  # a method lorakit does not train
                                    PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    prefix = build_random_adapter(tiny_model_dir, tmp_path / "prefix",  # generates too (tests/tools/test_generate.py)
                                  PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    bottleneck = tmp_path / "bottleneck"
    bottleneck.mkdir()
    (bottleneck / "bottleneck_config.json").write_text("{}")
    for adapter in (prompt, p_tuning, prefix, bottleneck):
        result = invoke("merge", adapter, "--output", tmp_path / "out")
        assert result.exit_code == 2, result.output
        assert "lorakit generate" in result.output and "no weight update" in result.output
        assert "merge_and_unload" not in result.output  # PEFT cannot merge these either
    assert not (tmp_path / "out").exists()


def test_shape_or_recorded_base_mismatch_exits_4(adapters, tiny_model_dir, other_model_dir, tmp_path):
    result = invoke("merge", adapters["lora"], "--output", tmp_path / "a", "--base", other_model_dir)
    assert result.exit_code == 4 and "does not fit" in result.output, result.output
    recorded = tmp_path / "recorded"
    shutil.copytree(adapters["ia3"], recorded)
    (recorded / "lorakit.json").write_text(json.dumps({"base_model_path": str(tiny_model_dir)}))
    result = invoke("merge", recorded, "--output", tmp_path / "b", "--base", other_model_dir)
    assert result.exit_code == 4 and "not the model the adapter was trained on" in result.output, result.output


def test_pickle_weights_and_non_empty_output_exit_5(adapters, tiny_model_dir, tmp_path):
    pickled = tmp_path / "pickled-base"
    shutil.copytree(tiny_model_dir, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict(), pickled / "pytorch_model.bin")
    result = invoke("merge", adapters["lora"], "--output", tmp_path / "a", "--base", pickled)
    assert result.exit_code == 5 and "--allow-pickle" in result.output, result.output
    result = invoke("merge", adapters["lora"], "--output", tmp_path / "a", "--base", pickled, "--allow-pickle",
                    "--no-verify")
    assert result.exit_code == 0, result.output
    assert (logits(tmp_path / "a") - adapter_logits(tiny_model_dir, adapters["lora"])).abs().max() <= 1e-4
    result = invoke("merge", adapters["lora"], "--output", tmp_path / "a", "--no-verify")
    assert result.exit_code == 5 and "--overwrite" in result.output, result.output
    assert invoke("merge", adapters["lora"], "--output", tmp_path / "a", "--no-verify", "--overwrite").exit_code == 0


def test_overwrite_moves_the_old_output_aside_and_only_replaces_lorakit_outputs(adapters, tmp_path):
    """--overwrite never deletes: the earlier merged model is kept whole as OUT.replaced-*; a folder lorakit did
    not write (no marker) is never replaced."""
    out = tmp_path / "out"
    assert invoke("merge", adapters["lora"], "--output", out, "--no-verify").exit_code == 0
    (out / "notes.txt").write_text("mine")
    result = invoke("merge", adapters["lora"], "--output", out, "--no-verify", "--overwrite")
    assert result.exit_code == 0 and "moved to" in result.output, result.output
    (aside,) = tmp_path.glob("out.replaced-*")
    assert (aside / "notes.txt").read_text() == "mine" and (aside / "config.json").is_file()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    result = invoke("merge", adapters["lora"], "--output", notes, "--no-verify", "--overwrite")
    assert result.exit_code == 5 and "lorakit did not write" in result.output, result.output
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]


def test_dequantized_precision_needs_a_quantized_record_exit_2(adapters, tmp_path):
    result = invoke("merge", adapters["lora"], "--output", tmp_path / "o", "--base-precision", "dequantized")
    assert result.exit_code == 2 and "use original" in result.output, result.output
    assert invoke("merge", adapters["lora"], "--output", tmp_path / "o", "--dtype", "int4").exit_code == 2


def test_non_finite_merge_leaves_no_output_and_no_temporary(adapters, tiny_model_dir, tmp_path):
    huge = tmp_path / "huge"
    shutil.copytree(adapters["lora"], huge)
    from safetensors.torch import load_file, save_file

    tensors = load_file(huge / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if "layers.1.mlp.up_proj.lora_B" in k)  # late: earlier shards get written
    tensors[key] = tensors[key] * 1e6
    save_file(tensors, huge / "adapter_model.safetensors")
    stale = tmp_path / ".out.lorakit-tmp-999999999"  # left by a killed merge (no such process)
    stale.mkdir()
    result = invoke("merge", huge, "--output", tmp_path / "out", "--dtype", "float16", "--max-shard-size", "30KB")
    assert result.exit_code == 4 and "not finite" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge"]


@pytest.mark.slow
def test_cli_subprocess_and_output_loads_without_peft(adapters, tiny_model_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-m", "lorakit", "merge", str(adapters["dora"]), "-o", str(out)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "verify: max |Δlogit|" in done.stdout and "base precision: original" in done.stdout
    torch.save(adapter_logits(tiny_model_dir, adapters["dora"]), tmp_path / "expected.pt")
    script = (
        "import sys, torch\n"
        "sys.modules['peft'] = None  # any `import peft` now fails\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32).eval()\n"
        f"expected = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        "with torch.no_grad():\n"
        "    print((model(ids).logits - expected).abs().max().item())\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert loaded.returncode == 0, loaded.stderr
    assert float(loaded.stdout.strip().splitlines()[-1]) <= 1e-4


@pytest.mark.slow
def test_bench_script_smoke(tmp_path):
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_merge.py"
    result = subprocess.run(
        [sys.executable, str(script), "--hidden", "32", "--layers", "2", "--intermediate", "64", "--heads", "4",
         "--kv-heads", "2", "--rank", "4", "--shard-size", "30KB", "--json", "--workdir", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["max_abs_diff"] <= 1e-5 and data["input_shards"] >= 2, result.stderr
    assert data["lorakit"]["peak_rss_bytes"] > 0 and data["peft"]["peak_rss_bytes"] > 0


@pytest.mark.parametrize("size, expected", [
    ("5GB", 5 * 10**9), ("5gb", 5 * 10**9), ("5Gb", 5 * 10**9), ("5 GB", 5 * 10**9), ("5G", 5 * 10**9),
    ("2GiB", 2 * 2**30), ("2gib", 2 * 2**30), ("500MB", 500 * 10**6), ("40KB", 40_000), ("1.5GB", 1_500_000_000),
    ("123", 123), (4096, 4096),
])
def test_shard_sizes_are_bytes_in_any_case(size, expected):
    """transformers reads '5gb' and '5Gb' as gigabits (625 MB shards); a --max-shard-size is always bytes."""
    from lorakit.merge.merge import shard_bytes

    assert shard_bytes(size) == expected


@pytest.mark.parametrize("size, message", [("-5GB", "must be more than 0"), ("0GB", "must be more than 0"),
                                           ("5 bananas", "expected a size such as 5GB"), ("", "expected a size")])
def test_shard_sizes_that_are_no_size_are_refused(size, message):
    from lorakit.errors import UsageError
    from lorakit.merge.merge import shard_bytes

    with pytest.raises(UsageError, match=message):
        shard_bytes(size)
