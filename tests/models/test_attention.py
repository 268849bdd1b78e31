"""Per-example attention (lorakit.models.attention): a flattened micro-batch learns exactly what the padded one does.

Loss and adapter gradients of the same examples, flattened through the per-example sdpa/eager attention
that choose_batching installs, against padded through transformers' own attention, in fp32: Llama and Qwen2
style models, with and without activation checkpointing, LoRA, DoRA and an nf4 base, and packed rows.
"""

import pytest
import torch

from lorakit.data import Example, collate, pack_examples
from lorakit.adapters.build import build_model
from lorakit.config.load import parse_recipe
from lorakit.models.loading import load_tokenizer
from lorakit.testing import build_tiny_llama
from lorakit.training.loss import build_loss
from lorakit.training.perf import choose_batching

LORA = {"method": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}
DORA = {**LORA, "method": "dora"}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_dir(request, tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp(request.param), architecture=request.param)


def setup(model_dir, adapter=LORA, quantization="none", checkpointing=False, attention="sdpa", **data):
    recipe = parse_recipe({
        "model": {"name_or_path": str(model_dir), "dtype": "float32", "quantization": quantization,
                  "attn_implementation": attention},
        "adapter": adapter,
        "data": {"train": "unused.jsonl", **data},
        "train": {"max_steps": 1, "gradient_checkpointing": checkpointing},
    })
    model = build_model(recipe)
    with torch.no_grad():  # B = 0 at the start: give the adapter weight so its gradients see the attention
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return recipe, model, load_tokenizer(recipe.model, str(model_dir))


def examples(lengths=(9, 23, 5, 14), seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(5, 300, (n,), generator=g).tolist()
        out.append(Example(ids, [-100] * (n // 3) + ids[n // 3 :]))
    return out


def loss_and_grads(model, batch):
    model.zero_grad()
    model.train()
    loss = build_loss(model, chunked=True)(model, batch, 10.0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(flat, padded, atol):
    torch.testing.assert_close(flat[0], padded[0], rtol=1e-5, atol=atol)
    assert padded[1] and padded[1].keys() == flat[1].keys()
    for name, grad in padded[1].items():
        torch.testing.assert_close(flat[1][name], grad, rtol=1e-4, atol=atol, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("adapter,quantization", [(LORA, "none"), (DORA, "none"), (LORA, "nf4")],
                         ids=["lora", "dora", "qlora-nf4"])
def test_flattened_equals_padded(model_dir, adapter, quantization, checkpointing):
    recipe, model, tokenizer = setup(model_dir, adapter, quantization, checkpointing)
    batch = examples()
    padded = loss_and_grads(model, collate(batch, tokenizer))  # the model's own sdpa, before the switch
    chosen = choose_batching(recipe, model, None)
    assert chosen.padding_free and model.config._attn_implementation == "lorakit_varlen_sdpa"
    flat_batch = collate(batch, tokenizer, padding_free=True)
    assert flat_batch["input_ids"].shape == (1, sum(len(e) for e in batch))
    assert_same(loss_and_grads(model, flat_batch), padded, atol=1e-4 if quantization == "nf4" else 1e-5)
    # Padded batches (evaluation) through the switched model still get transformers' own mask and kernel.
    assert_same(loss_and_grads(model, collate(batch, tokenizer)), padded, atol=1e-5)


def test_flattened_equals_padded_eager(model_dir):
    recipe, model, tokenizer = setup(model_dir, attention="eager")
    batch = examples()
    padded = loss_and_grads(model, collate(batch, tokenizer))
    assert choose_batching(recipe, model, None).padding_free
    assert model.config._attn_implementation == "lorakit_varlen_eager"
    assert_same(loss_and_grads(model, collate(batch, tokenizer, padding_free=True)), padded, atol=1e-5)


def test_packed_rows_equal_padded(model_dir):
    recipe, model, tokenizer = setup(model_dir, packing=True, max_seq_len=32)
    batch = examples((9, 23, 5, 14, 7, 17))
    padded = loss_and_grads(model, collate(batch, tokenizer))
    rows = pack_examples(batch, 32, seed=0)
    assert len(rows) < len(batch)
    assert choose_batching(recipe, model, None).padding_free
    assert_same(loss_and_grads(model, collate(rows, tokenizer)), padded, atol=1e-5)


def test_examples_do_not_mix_and_sliding_window_is_kept():
    """Directly on the attention function: a flattened row equals each example alone, also where a sliding
    window shorter than the example cuts the keys (as transformers' own sliding-window mask does)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sliding_window_causal_mask_function, sdpa_mask

    from lorakit.models.attention import varlen_eager, varlen_sdpa

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    g = torch.Generator().manual_seed(0)
    lengths = [6, 11, 1, 8]
    q = torch.randn(1, 4, sum(lengths), 8, generator=g)
    k, v = torch.randn(1, 2, sum(lengths), 8, generator=g), torch.randn(1, 2, sum(lengths), 8, generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    for window in (None, 4):
        alone, start = [], 0
        for n in lengths:
            mask = None
            if window is not None:
                mask = sdpa_mask(batch_size=1, q_length=n, kv_length=n, allow_is_causal_skip=False,
                                 mask_function=sliding_window_causal_mask_function(window))
            s = slice(start, start + n)
            alone.append(sdpa_attention_forward(module, q[:, :, s], k[:, :, s], v[:, :, s], mask, scaling=0.3)[0])
            start += n
        expected = torch.cat(alone, dim=1)
        for attention in (varlen_sdpa, varlen_eager):
            got, _ = attention(module, q, k, v, None, scaling=0.3, sliding_window=window, position_ids=positions)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
