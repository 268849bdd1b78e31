"""LoraDropout: LoRA's input dropout with 16 random bits per element on the CPU (lorakit.adapters.dropout)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.adapters.dropout import LoraDropout, use_lora_dropout, uses_lora_dropout


def kept(p: float, shape=(1024, 256), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    out = LoraDropout(p).train()(torch.ones(shape))
    return out != 0, out


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_each_element_is_kept_with_probability_one_minus_p_and_the_expectation_is_the_input(p):
    mask, out = kept(p)
    threshold = round((1 - p) * 2**16)
    assert torch.equal(out[mask], torch.full_like(out[mask], 2**16 / threshold))  # inverted dropout's scale
    sigma = (p * (1 - p) / mask[:, ::4].numel()) ** 0.5
    # Each of the four 16-bit fields of a 64-bit draw keeps its share: a draw of 63 bits (random_() without
    # the full range) would keep far fewer in the field holding the top bits.
    for field in range(4):
        assert abs(mask[:, field::4].float().mean().item() - (1 - p)) < 5 * sigma, field
    assert abs(out.mean().item() - 1) < 5 * sigma * 2  # E[out] = x


def test_masks_follow_torchs_generator_and_differ_between_draws():
    assert torch.equal(kept(0.1, seed=3)[0], kept(0.1, seed=3)[0])
    assert not torch.equal(kept(0.1, seed=3)[0], kept(0.1, seed=4)[0])
    torch.manual_seed(0)
    dropout = LoraDropout(0.1).train()
    assert not torch.equal(dropout(torch.ones(64, 64)), dropout(torch.ones(64, 64)))


def test_gradient_is_the_mask_times_the_scale():
    x = torch.randn(37, 48, requires_grad=True)  # an odd number of elements: the last draw is partly used
    torch.manual_seed(1)
    out = LoraDropout(0.2).train()(x)
    out.sum().backward()
    mask = out != 0
    assert torch.equal(x.grad, mask.float() * (2**16 / round(0.8 * 2**16)))
    assert torch.allclose(out, x.detach() * x.grad)


def test_bfloat16_inputs_keep_their_dtype():
    torch.manual_seed(0)
    out = LoraDropout(0.1).train()(torch.ones(16, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and ((out == 0) | (out > 1)).all()


@pytest.mark.parametrize("p", [0.0, 1.0, 1e-6])
def test_eval_mode_and_no_op_probabilities_are_nn_dropout(p):
    x = torch.randn(8, 8)
    assert torch.equal(LoraDropout(0.3).eval()(x), x)
    torch.manual_seed(0)
    ours = LoraDropout(p).train()(x)
    torch.manual_seed(0)
    assert torch.equal(ours, nn.Dropout(p).train()(x))


def test_swapped_into_every_lora_layer_and_back(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    layers = [m for m in model.modules() if hasattr(m, "lora_dropout")]
    keys = set(model.state_dict())
    assert use_lora_dropout(model) == len(layers) > 0
    assert all(type(m.lora_dropout["default"]) is LoraDropout for m in layers) and uses_lora_dropout(model)
    assert set(model.state_dict()) == keys  # dropout holds no weights: the adapter saves as before
    assert use_lora_dropout(model) == 0  # already swapped
    assert not uses_lora_dropout(model.to("meta"))  # elsewhere than the CPU the masks are nn.Dropout's
    assert use_lora_dropout(model, fast=False) == len(layers)
    assert all(type(m.lora_dropout["default"]) is nn.Dropout for m in layers)


def test_the_bottleneck_adapters_dropout_is_lora_dropout(tiny_model_dir):
    """adapter.dropout of a bottleneck adapter drew nn.Dropout's CPU masks (bernoulli_, 64 random bits per element)."""
    from transformers import AutoModelForCausalLM

    from lorakit.adapters.bottleneck import BottleneckAdapter, BottleneckModel
    from lorakit.config.methods import BottleneckConfig

    model = BottleneckModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir), BottleneckConfig(r=4, dropout=0.1))
    adapters = [m for m in model.modules() if isinstance(m, BottleneckAdapter)]
    assert adapters and all(type(a.dropout) is LoraDropout and a.dropout.p == 0.1 for a in adapters)
    assert uses_lora_dropout(model)


def test_under_torch_compile_it_is_nn_dropout_without_a_graph_break():
    torch._dynamo.reset()
    compiled = torch.compile(LoraDropout(0.1).train(), backend="eager", fullgraph=True)  # a break would raise
    out = compiled(torch.ones(64, 32))
    assert ((out == 0) | ((out - 1 / 0.9).abs() < 1e-6)).all() and (out == 0).any()
