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
