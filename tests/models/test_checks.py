"""lorakit.models.checks: what is refused before the weights load."""

from transformers import BloomConfig, GPT2Config, GPTJConfig, LlamaConfig

from lorakit.models.checks import positions_problem


def test_max_seq_len_beyond_a_position_table_is_refused():
    """GPT-2 with n_positions 32 and data.max_seq_len 128 ended in 'IndexError: index out of range in self' (exit 1)
    at the first longer row."""
    assert positions_problem(GPT2Config(n_positions=32), 128) == (
        "data.max_seq_len: 128 is more than the 32 positions this gpt2 model has a position table for "
        "(max_position_embeddings); set data.max_seq_len: 32 or less")
    assert positions_problem(GPTJConfig(n_positions=64), 65) is not None  # its sin/cos table is indexed too
    assert positions_problem(GPT2Config(n_positions=32), 32) is None
    assert positions_problem(LlamaConfig(max_position_embeddings=32), 128) is None  # RoPE: any position
    assert positions_problem(BloomConfig(), 10**6) is None  # ALiBi: no table


def test_weights_fingerprint_tells_checkpoints_apart_whatever_the_sharding(tiny_model_dir, tmp_path):
    """Another checkpoint of the same architecture (another seed: another fine-tune) differs, as does the same
    model in another dtype; the same weights in other shards do not."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorakit.models.checks import weights_fingerprint
    from lorakit.testing import build_tiny_llama

    ours = weights_fingerprint(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert weights_fingerprint(tmp_path / "sharded") == ours
    assert weights_fingerprint(build_tiny_llama(tmp_path / "other", seed=5)) != ours
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert weights_fingerprint(tmp_path / "bf16") not in (ours, None)
    assert weights_fingerprint(tmp_path) is None  # no safetensors here


def test_virtual_tokens_count_against_the_position_table(tmp_path):
    """Prompt and prefix tuning put adapter.num_virtual_tokens before every sequence: on GPT-2 with 64 positions,
    max_seq_len 64 plus 8 virtual tokens ended in 'IndexError: index out of range in self' (exit 1) at the first
    step; now exit 2 before the weights load, naming both keys."""
    from lorakit.testing import build_tiny_gpt2
    from run_helpers import cli, recipe_dict, write_data, write_recipe

    assert positions_problem(GPT2Config(n_positions=64), 56, 8) is None
    assert "set data.max_seq_len: 56 or less" in positions_problem(GPT2Config(n_positions=64), 64, 8)
    assert positions_problem(LlamaConfig(max_position_embeddings=64), 64, 8) is None
    model_dir = build_tiny_gpt2(tmp_path / "gpt2", n_positions=64)
    for method in ("prompt", "prefix"):
        recipe = recipe_dict(model_dir, write_data(tmp_path / "d.jsonl"), tmp_path / method,
                             {"method": method, "r": None, "lora_dropout": None, "target_modules": None,
                              "num_virtual_tokens": 8}, max_steps=1)
        recipe["data"]["max_seq_len"] = 64
        result = cli("train", write_recipe(tmp_path / f"{method}.yaml", recipe))
        assert result.exit_code == 2, result.output
        assert "data.max_seq_len: 64 plus adapter.num_virtual_tokens 8" in result.output
        assert not (tmp_path / method).exists()
