"""estimate-memory for a preference objective: a micro-batch of b pairs costs what 2b sequences cost, plus DPO/IPO's
reference forward (no gradients, before the policy's) where it is not precomputed."""

import pytest
from transformers import LlamaConfig

from lorakit.config.schema import AdapterSection
from lorakit.memory.estimate import estimate
from lorakit.memory.lines import Settings
from lorakit.memory.profile import inspect_model
from lorakit.memory.report import Flags, report


@pytest.fixture(scope="module")
def profile():
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return inspect_model(config, AdapterSection(r=8, target_modules=["q_proj", "v_proj"]))


def by_key(est):
    return {line.key: line.bytes for line in est.lines}


@pytest.mark.parametrize("objective, reference", [("dpo", "base"), ("ipo", "base"), ("dpo", "precomputed"),
                                                  ("orpo", None), ("simpo", None)])
def test_pairs_cost_two_sequences_and_the_reference_runs_without_gradients(profile, objective, reference):
    pairs = by_key(estimate(profile, Settings(batch_size=2, seq_len=64, objective=objective, reference=reference)))
    sequences = by_key(estimate(profile, Settings(batch_size=4, seq_len=64)))
    for key in ("activations", "logits_and_loss", "backward_transient", "weights", "optimizer_states"):
        assert pairs[key] == sequences[key], key
    if reference == "base":
        assert 0 < pairs["reference_forward"] < pairs["activations"] + pairs["logits_and_loss"]
    else:
        assert "reference_forward" not in pairs


def test_the_objective_flag(tiny_model_dir):
    text, data = report(None, Flags(model=str(tiny_model_dir), objective="dpo", batch_size=2), None, True)
    assert "dpo, reference base; micro-batch 2 pairs (4 sequences: chosen and rejected)" in text
    assert "reference forward" in text and data["bytes"]["reference_forward"] > 0
    # 2 pairs are 4 sequences; DPO leaves the LoRA dropout off (its default), so its masks are not counted.
    _, sft = report(None, Flags(model=str(tiny_model_dir), batch_size=4), None, False)
    assert sft["bytes"]["activations"] > data["bytes"]["activations"]
    _, sft = report(None, Flags(model=str(tiny_model_dir), batch_size=4, overrides=["adapter.lora_dropout=0"]), None,
                    False)
    assert sft["bytes"]["activations"] == data["bytes"]["activations"]


def test_estimate_memory_objective_option(tiny_model_dir):
    from run_helpers import cli

    result = cli("estimate-memory", "--model", tiny_model_dir, "--objective", "dpo", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    assert "micro-batch 2 pairs (4 sequences" in result.output and "reference forward" in result.output
    refused = cli("estimate-memory", "--model", tiny_model_dir, "--objective", "kto")
    assert refused.exit_code == 2 and "--objective: must be sft" in refused.output
