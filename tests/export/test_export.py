"""`lorakit export`: GGUF models read back by transformers' GGUF loader (a second, independent reader) with the same
tokens and logits, the tokenizer and every stop token in the metadata, refusals before any work, atomic output,
gguf-lora files, the Ollama Modelfile and the vLLM check."""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM, Qwen2Config
from transformers import Qwen2ForCausalLM

from lorakit.data.chat import TEMPLATE_DIR
from lorakit.errors import UsageError
from lorakit.export import gguf_model
from lorakit.export.ollama import emulate, translate, _turns
from lorakit.export.run import check_output, export_gguf
from lorakit.testing import (
    build_random_adapter, build_sentencepiece_style_tokenizer, build_tiny_llama, build_tokenizer,
)
from run_helpers import cli

QUIET = {"log": lambda message: None, "progress": False}


def fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}, reader


def _small_model(cls, config_cls, out, tokenizer, **extra):
    config = config_cls(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)
    torch.manual_seed(0)
    cls(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("llama3"), tokenizer_style="llama3")


@pytest.fixture(scope="module")
def lora_adapter(tiny_model_dir, tmp_path_factory):
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return build_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("lora") / "adapter", config)


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0", "q4_0"])
def test_every_quant_reads_back_in_transformers_with_the_same_logits(quant, tiny_model_dir, tmp_path):
    out = tmp_path / f"model-{quant}.gguf"
    result = cli("export", tiny_model_dir, "--quant", quant, "-o", out, "--verify")
    assert result.exit_code == 0, result.output
    assert "same tokens" in result.output and out.is_file()
    meta, reader = fields(out)
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == gguf_model._qtypes()[quant][0]
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight"} <= names
    assert not list(tmp_path.glob(".*"))  # no temporary left


def test_tokenizer_chat_template_and_every_stop_token_are_in_the_metadata(llama3_dir, tmp_path):
    out = tmp_path / "m.gguf"
    report = export_gguf(llama3_dir, out, **QUIET)
    tokenizer = AutoTokenizer.from_pretrained(llama3_dir)
    eos, eot = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")
    meta, _ = fields(out)
    assert report.stop_ids == [eos, eot]
    assert meta["tokenizer.ggml.eos_token_id"] == eos and meta["tokenizer.ggml.eot_token_id"] == eot
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert tokens[eot] == "<|eot_id|>" and types[eot] == types[eos] == gguf.TokenType.CONTROL
    assert len(meta["tokenizer.ggml.merges"]) > 0
    # transformers rebuilds the same tokenizer from the file.
    read_back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 2?"}], tokenize=False)
    assert read_back(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_qwen2_and_mistral(arch, tmp_path):
    tokenizer = build_tokenizer()
    if arch == "qwen2":  # biases on q/k/v, tied embeddings, no RoPE row regrouping
        model = _small_model(Qwen2ForCausalLM, Qwen2Config, tmp_path / "m", tokenizer, tie_word_embeddings=True)
    else:
        model = _small_model(MistralForCausalLM, MistralConfig, tmp_path / "m", tokenizer)
    out = tmp_path / "m.gguf"
    report = export_gguf(model, out, quant="f16", verify=True, **QUIET)
    assert report.kl < 1e-4
    meta, reader = fields(out)
    assert meta["general.architecture"] == {"qwen2": "qwen2", "mistral": "llama"}[arch]
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) == (arch == "mistral")
    assert ("blk.0.attn_q.bias" in names) == (arch == "qwen2")


def test_sentencepiece_style_tokenizer(tmp_path):
    """Llama 2 / Mistral 7B tokenizers: tokenizer model "llama" with byte tokens and scores."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_sentencepiece_style_tokenizer()
    model = _small_model(LlamaForCausalLM, LlamaConfig, tmp_path / "m", tokenizer, bos_token_id=tokenizer.bos_token_id)
    out = tmp_path / "m.gguf"
    export_gguf(model, out, verify=True, **QUIET)  # the same token ids through transformers' reader
    meta, _ = fields(out)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_bos_token"] is True
    byte = tokenizer.convert_tokens_to_ids("<0xC3>")
    assert meta["tokenizer.ggml.token_type"][byte] == gguf.TokenType.BYTE


def test_llama3_rope_scaling_writes_rope_freqs(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    hp = gguf_model.Hyper.from_config({"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128,
                                       "num_attention_heads": 4, "vocab_size": 10, "rope_parameters": rope}, tmp_path)
    factors = gguf_model.llama3_rope_factors(hp)
    assert factors.shape == (8,) and factors[0] == 1.0 and factors[-1] == 8.0  # high frequencies kept, low scaled


def test_adapter_target_is_merged_on_the_fly(tiny_model_dir, lora_adapter, tmp_path):
    result = cli("merge", lora_adapter, "-o", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    export_gguf(tmp_path / "merged", tmp_path / "from-merged.gguf", **QUIET)
    export_gguf(lora_adapter.parent, tmp_path / "from-run.gguf", **QUIET)  # a run directory: its adapter/
    a, b = fields(tmp_path / "from-merged.gguf")[1], fields(tmp_path / "from-run.gguf")[1]
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        assert np.array_equal(x.data, y.data), x.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["from-merged.gguf", "from-run.gguf", "merged"]


def test_rope_rows_are_regrouped_or_verify_fails(tiny_model_dir, tmp_path, monkeypatch):
    """--verify has teeth: without the q/k regrouping the logits differ, exit 1, and nothing is written."""
    monkeypatch.setattr(gguf_model, "permute_for_rope", lambda w, heads: w)
    out = tmp_path / "m.gguf"
    result = cli("export", tiny_model_dir, "-o", out, "--verify")
    assert result.exit_code == 1 and "self_attn.k_proj.weight reads back 1.3 away" in result.output, result.output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_refusals_come_before_any_work(tiny_model_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "gpt2")
    result = cli("export", tmp_path / "gpt2", "-o", tmp_path / "g.gguf")
    assert result.exit_code == 2 and "supported: Llama, Mistral, Qwen2, SmolLM" in result.output, result.output
    existing = tmp_path / "mine.gguf"
    existing.write_text("the user's file")
    result = cli("export", tiny_model_dir, "-o", existing)
    assert result.exit_code == 5 and "--overwrite" in result.output
    assert existing.read_text() == "the user's file"
    assert cli("export", tiny_model_dir, "-o", tmp_path / "x.bin").exit_code == 2
    assert cli("export", tiny_model_dir, "-o", tmp_path / "q.gguf", "--quant", "q5_k").exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "mine.gguf"]


def test_the_output_suffix_is_read_in_any_case(tmp_path):
    """-o Model.GGUF is written under the name typed, as lorakit reads Model.GGUF as a model (before: exit 2,
    'the output is a .gguf file; name it Model.gguf')."""
    assert check_output(tmp_path / "Model.GGUF", overwrite=False) == tmp_path / "Model.GGUF"
    with pytest.raises(UsageError, match="name it model.gguf"):
        check_output(tmp_path / "model.bin", overwrite=False)


def test_a_failed_write_leaves_the_old_file(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    export_gguf(tiny_model_dir, out, **QUIET)
    before = out.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf_model, "write_tensors", broken)
    with pytest.raises(OSError):
        export_gguf(tiny_model_dir, out, overwrite=True, **QUIET)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# ----------------------------------------------------------------------------------------------------------
# Ollama


@pytest.mark.parametrize("template", sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja")))
def test_every_shipped_template_translates_to_ollama(template):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (TEMPLATE_DIR / f"{template}.jinja").read_text()
    assert translate(tokenizer) is not None
    turns = _turns(tokenizer)
    conversation = [{"role": r, "content": f"turn {i}"} for i, r in enumerate(["user", "assistant", "user"])]
    assert emulate(turns, conversation) == tokenizer.apply_chat_template(conversation, tokenize=False,
                                                                         add_generation_prompt=True)


def test_a_default_system_turn_is_kept_and_replaced_by_a_given_one():
    """SmolLM2/Qwen2-style templates write a default system turn when the conversation has none."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
        + tokenizer.chat_template)
    turns = _turns(tokenizer)
    assert "if ne (index .Messages 0).Role" in translate(tokenizer)
    for roles in (["system", "user"], ["user", "assistant", "user"]):
        conversation = [{"role": r, "content": f"turn {i}"} for i, r in enumerate(roles)]
        assert emulate(turns, conversation) == tokenizer.apply_chat_template(conversation, tokenize=False,
                                                                             add_generation_prompt=True)


def test_ollama_modelfile(llama3_dir, tmp_path):
    out = tmp_path / "m.gguf"
    result = cli("export", llama3_dir, "-o", out, "--ollama")
    assert result.exit_code == 0, result.output
    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./m.gguf\n")
    assert 'PARAMETER stop "<|eot_id|>"' in modelfile and 'PARAMETER stop "<|end_of_text|>"' in modelfile
    assert "<|start_header_id|>assistant<|end_header_id|>" in modelfile and "{{ .Content }}" in modelfile
    assert "ollama create" in result.output
    again = cli("export", llama3_dir, "-o", tmp_path / "other.gguf", "--ollama")  # the Modelfile exists: refused
    assert again.exit_code == 5 and not (tmp_path / "other.gguf").exists()


# ----------------------------------------------------------------------------------------------------------
# gguf-lora


def test_gguf_lora_file(lora_adapter, tmp_path):
    out = tmp_path / "a.gguf"
    result = cli("export", lora_adapter, "--format", "gguf-lora", "--quant", "f32", "-o", out, "--verify")
    assert result.exit_code == 0, result.output
    meta, reader = fields(out)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora" and meta["adapter.lora.alpha"] == 0
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 14  # 7 linear modules x 2 layers, an A and a B each
    b = torch.from_numpy(np.array(tensors["blk.0.ffn_up.weight.lora_b"].data)).reshape(128, 4)
    from safetensors.torch import load_file

    saved = load_file(lora_adapter / "adapter_model.safetensors")
    expected = saved["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"] * (8 / 4)  # scaling folded in
    assert torch.allclose(b, expected)


def test_gguf_lora_refuses_what_llama_cpp_cannot_apply(tiny_model_dir, tmp_path):
    dora = build_random_adapter(tiny_model_dir, tmp_path / "dora", LoraConfig(
        r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False))
    result = cli("export", dora, "--format", "gguf-lora", "-o", tmp_path / "d.gguf")
    assert result.exit_code == 2 and "--format gguf" in result.output, result.output
    saved = build_random_adapter(tiny_model_dir, tmp_path / "mts", LoraConfig(
        r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False))
    result = cli("export", saved, "--format", "gguf-lora", "-o", tmp_path / "s.gguf")
    assert result.exit_code == 2 and "modules_to_save" in result.output, result.output
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_lora_on_the_lm_head_names_the_cause(tied, tmp_path):
    """PEFT saves a LoRA-targeted LM head whole beside its A/B. On a tied head the refusal is the tying (llama.cpp
    has no output weight apart from token_embd), not "modules_to_save or new tokens"; untied, it names the head."""
    model = _small_model(Qwen2ForCausalLM, Qwen2Config, tmp_path / "m", build_tokenizer(), tie_word_embeddings=tied)
    adapter = build_random_adapter(model, tmp_path / "a", LoraConfig(
        r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    result = cli("export", adapter, "--format", "gguf-lora", "-o", tmp_path / "a.gguf")
    assert result.exit_code == 2 and f"lorakit export {adapter} --format gguf -o FILE.gguf" in result.output
    if tied:
        assert "LoRA on lm_head, an LM head tied to the input embeddings" in result.output, result.output
        assert "modules_to_save" not in result.output
    else:
        assert "a LoRA on the LM head, which PEFT saves whole" in result.output, result.output
    assert not list(tmp_path.glob("*.gguf"))


def test_every_method_without_a_gguf_lora_form_is_refused_by_name(tiny_model_dir, tmp_path):
    """gguf-lora (and the vLLM check, exit 4) refuse every method but LoRA. gguf-lora names the method and what to do (a merged GGUF for mergeable methods, lorakit generate for the
    others, which no GGUF can hold); a bottleneck run or adapter is recognised as one, not as a missing adapter,
    for both formats; every refusal is exit 2 before any file is written."""
    from peft import IA3Config, PrefixTuningConfig, PromptTuningConfig
    from transformers import AutoModelForCausalLM

    from lorakit.adapters.bottleneck import BottleneckModel
    from lorakit.config.methods import BottleneckConfig

    configs = {"ia3": IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj"], feedforward_modules=[]),
               "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
               "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)}
    adapters = {name: build_random_adapter(tiny_model_dir, tmp_path / name, c) for name, c in configs.items()}
    run = tmp_path / "bn-run"
    BottleneckModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir), BottleneckConfig(r=4)).save_pretrained(
        run / "adapter")
    adapters["bottleneck"] = run
    for name, path in adapters.items():
        result = cli("export", path, "--format", "gguf-lora", "-o", tmp_path / f"{name}.gguf")
        article = "an" if name == "ia3" else "a"  # 'a ia3 adapter' before
        assert result.exit_code == 2 and f": {article} {name} adapter" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
        expected = "--format gguf -o" if name == "ia3" else "no GGUF can hold it"
        assert expected in result.output, result.output
        assert ("lorakit generate" in result.output) == (name != "ia3")  # ia3 merges: export that instead
        result = cli("export", path, "--check", "vllm")
        assert result.exit_code == 4 and "vLLM serves LoRA adapters only" in result.output, result.output
    result = cli("export", run, "--format", "gguf", "-o", tmp_path / "bn.gguf")
    assert result.exit_code == 2 and "bottleneck adapters add" in result.output, result.output
    assert not list(tmp_path.glob("*.gguf"))


# ----------------------------------------------------------------------------------------------------------
# vLLM


def test_vllm_check(tiny_model_dir, lora_adapter, tmp_path):
    result = cli("export", lora_adapter, "--check", "vllm")
    assert result.exit_code == 0, result.output
    assert f"--lora-modules adapter={lora_adapter.resolve()}" not in result.output  # RUN/adapter is named RUN
    assert "vllm serve" in result.output and "--enable-lora" in result.output and "--max-lora-rank 8" in result.output
    dora = build_random_adapter(tiny_model_dir, tmp_path / "dora", LoraConfig(
        r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False))
    result = cli("export", dora, "--check", "vllm")
    assert result.exit_code == 4 and "use_dora" in result.output
    wide = build_random_adapter(tiny_model_dir, tmp_path / "wide", LoraConfig(
        r=32, target_modules=["q_proj"], init_lora_weights=False))
    result = cli("export", wide, "--check", "vllm", "--max-lora-rank", "16")
    assert result.exit_code == 4 and "--max-lora-rank 32" in result.output
    # PEFT's layer replication (the tiny model's 2 layers as 0, 1, 1): an adapter for a 3-layer model (it passed)
    stacked = build_random_adapter(tiny_model_dir, tmp_path / "stacked", LoraConfig(
        r=4, target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]], init_lora_weights=False))
    result = cli("export", stacked, "--check", "vllm")
    assert result.exit_code == 4, result.output
    assert "layer_replication [[0, 2], [1, 2]]: the adapter belongs to a 3-layer model" in " ".join(
        result.output.split())


def test_train_warns_at_start_when_vllm_cannot_serve_the_adapter(tiny_model_dir, tmp_path):
    from run_helpers import recipe_dict, write_data, write_recipe

    recipe = recipe_dict(tiny_model_dir, write_data(tmp_path / "d.jsonl"), tmp_path / "run", {"method": "dora"},
                         max_steps=1)
    result = cli("train", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 0, result.output
    [line] = [line for line in result.stderr.splitlines() if "vLLM" in line]  # on stderr, before training
    assert line.startswith("warning: vLLM will not serve this adapter") and "use_dora" in line
    plain = recipe_dict(tiny_model_dir, write_data(tmp_path / "d.jsonl"), tmp_path / "run2", max_steps=1)
    assert "vLLM" not in cli("train", write_recipe(tmp_path / "r2.yaml", plain)).output


def test_the_start_warning_follows_the_build(tiny_model_dir, tmp_path):
    """A misspelt target (qproj) drew "vLLM has no LoRA layer for qproj" before the error naming the typo; the
    warning now comes once PEFT has built the adapter, which also resolves a regular expression's modules."""
    from run_helpers import recipe_dict, write_data, write_recipe

    data = write_data(tmp_path / "d.jsonl")
    typo = recipe_dict(tiny_model_dir, data, tmp_path / "run", {"target_modules": ["qproj"]}, max_steps=1)
    result = cli("train", write_recipe(tmp_path / "r.yaml", typo))
    assert result.exit_code == 2 and "qproj" in result.output and "vLLM" not in result.output
    from lorakit.testing import build_tiny_gpt2

    regex = recipe_dict(build_tiny_gpt2(tmp_path / "gpt2", n_positions=128), data, tmp_path / "run2",
                        {"target_modules": ".*c_attn"}, max_steps=1)
    result = cli("train", write_recipe(tmp_path / "r2.yaml", regex))
    assert result.exit_code == 0, result.output
    [line] = [line for line in result.stderr.splitlines() if "vLLM" in line]  # a regex said nothing before
    assert "LoRA on c_attn: vLLM has no LoRA layer for them" in line


@pytest.mark.parametrize("adapter", [{"method": "prefix", "num_virtual_tokens": 4}, {"method": "prompt",
                                     "num_virtual_tokens": 4}, {"method": "bottleneck"}])
def test_the_start_warning_sends_an_unmergeable_adapter_to_generate_not_to_merge(adapter):
    """The warning told prefix/prompt/bottleneck runs that llama.cpp/Ollama would serve the adapter and that
    `lorakit merge` gives a model vLLM serves; merge and GGUF export refuse all three."""
    from lorakit.config.schema import AdapterSection
    from lorakit.adapters.vllm import warn_if_not_servable

    said = []
    warn_if_not_servable(AdapterSection(**adapter), said.append)
    [line] = said
    assert "vLLM will not serve this adapter" in line and "lorakit merge` gives" not in line
    assert "nor will a merged model or llama.cpp/Ollama" in line and "`lorakit generate`" in line


def test_the_start_warning_names_layer_replication():
    """adapter.layer_replication got no vLLM warning at start; merge refuses it too, so the line says neither helps."""
    from lorakit.config.schema import AdapterSection
    from lorakit.adapters.vllm import warn_if_not_servable

    said = []
    warn_if_not_servable(AdapterSection(layer_replication=[[0, 2], [1, 2]]), said.append)
    [line] = said
    assert "layer_replication [[0, 2], [1, 2]]: the adapter belongs to a 3-layer model" in line
    assert "nor will a merged model or llama.cpp/Ollama (layer_replication: not a plain weight update)" in line


def test_export_guards_its_output_like_every_other_command(llama3_dir, tmp_path):
    """--overwrite moves the old file aside (never replaced in place), an output inside the model folder is
    refused (exit 5), and a second process on the same output is refused while the first holds its lock."""
    from lorakit.runlock import OutputLock

    out = tmp_path / "m.gguf"
    out.write_bytes(b"the user's earlier export")
    refused = cli("export", llama3_dir, "-o", out)
    assert refused.exit_code == 5 and out.read_bytes() == b"the user's earlier export"
    replaced = cli("export", llama3_dir, "-o", out, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("m.gguf.replaced-")]
    assert len(aside) == 1 and aside[0].read_bytes() == b"the user's earlier export"
    assert out.read_bytes()[:4] == b"GGUF"

    inside = cli("export", llama3_dir, "-o", Path(llama3_dir) / "model.gguf")
    assert inside.exit_code == 5 and "lies inside the base model" in inside.output
    assert not (Path(llama3_dir) / "model.gguf").exists()

    held = tmp_path / "held.gguf"
    with OutputLock(held, lambda _: None, "-o"):
        busy = cli("export", llama3_dir, "-o", held)
    assert busy.exit_code == 5 and not held.exists()


def test_export_help_names_every_quant_type():
    """--quant's help is written by hand (the export modules import gguf, too heavy for --help): it must name
    every type each format takes."""
    from lorakit.export.gguf_lora import LORA_QUANTS

    help_text = " ".join(cli("export", "--help").output.split())
    named = help_text.split("--quant", 1)[1].split("[default", 1)[0]
    whole, lora = named.split("gguf-lora:")
    assert all(q in whole for q in gguf_model.QUANTS) and all(q in lora for q in LORA_QUANTS), named


@pytest.mark.parametrize("args, needle", [
    (["--check", "vllm", "-o", "x.gguf"], "-o would do nothing"),
    (["--check", "vllm", "--quant", "q8_0", "--verify"], "--quant, --verify would do nothing"),
    (["--max-lora-rank", "16", "-o", "x.gguf"], "--max-lora-rank applies only with --check vllm"),
])
def test_export_refuses_options_that_would_do_nothing(lora_adapter, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    result = cli("export", lora_adapter, *args)
    assert result.exit_code == 2 and needle in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())
