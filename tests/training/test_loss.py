"""The chunked loss equals transformers' own loss (value and gradients) and needs less memory."""

import pytest
import torch
import torch.nn.functional as F

from lorakit.training.loss import (
    CPU_ROWS, CPU_VOCAB_BLOCK, _decoder, _head_reproduces_logits, build_loss, fewest_logits,
    linear_cross_entropy_sum, linear_token_logps, plain_loss,
)
from lorakit.training.perf import TensorMemoryTracker


def _lora(model, **kwargs):
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False: B != 0, so the adapter changes the logits and its gradients are not trivial.
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_dropout=0.0, init_lora_weights=False, **kwargs)
    return get_peft_model(model, config)


def _llama(vocab_size=512, hidden_size=64, num_hidden_layers=2, **kwargs):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2, use_cache=False, **kwargs)
    return LlamaForCausalLM(config).float()


def _batch(vocab_size=512, rows=3, length=12):
    """Right-padded rows of different lengths, prompts masked: the shape of lorakit's collated batches."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab_size, (rows, length), generator=g)
    labels, mask = ids.clone(), torch.ones_like(ids)
    for r in range(rows):
        end = length - 3 * r
        labels[r, : 2 + r] = -100  # prompt
        labels[r, end:], mask[r, end:] = -100, 0  # padding
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(loss_fn, model, batch, num_items):
    model.zero_grad()
    loss = loss_fn(model, batch, num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_chunked_loss_and_lora_gradients_equal_plain():
    model = _lora(_llama(), target_modules="all-linear")
    loss = build_loss(model, chunked=True)
    assert loss.kind == "chunked"
    batch = _batch()
    num_items = 17.0  # the window's supervised tokens: any normaliser, applied the same way
    plain, plain_grads = _loss_and_grads(plain_loss, model, batch, num_items)
    chunked, chunked_grads = _loss_and_grads(loss, model, batch, num_items)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    assert plain_grads.keys() == chunked_grads.keys() and plain_grads
    for name in plain_grads:
        torch.testing.assert_close(chunked_grads[name], plain_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    with torch.no_grad():  # evaluation: no gradients kept
        torch.testing.assert_close(loss(model, batch, 1), plain_loss(model, batch, 1), rtol=1e-5, atol=1e-4)


def test_the_models_own_head_computes_no_logits_in_the_chunked_loss():
    """The model's forward is asked for no logit position at all (an empty logits_to_keep), so its head costs
    nothing; a model whose forward cannot take that keeps the last position only."""
    model = _lora(_llama(), target_modules="all-linear")
    rows = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(out.shape[-2]))
    try:
        build_loss(model, chunked=True)(model, _batch(), 1.0).backward()
    finally:
        handle.remove()
    assert rows and rows[-1] == 0

    class LastOnly(torch.nn.Module):  # a forward that takes an int logits_to_keep only
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def forward(self, input_ids, logits_to_keep=0):
            if not isinstance(logits_to_keep, int):
                raise TypeError("logits_to_keep must be an int")
            return self.inner(input_ids=input_ids, logits_to_keep=logits_to_keep)

    plain = _llama()
    assert fewest_logits(LastOnly(plain), plain.model) == 1


def test_flattened_batch_chunked_loss_equals_padded_plain_loss(tiny_model_dir):
    """data.padding_free's layout (one flattened row, restarting positions) with the chunked loss gives the
    loss and LoRA gradients of transformers' loss on the padded batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.data import Example, collate

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = _lora(base, target_modules="all-linear")
    model.config.use_cache = False
    g = torch.Generator().manual_seed(3)
    examples = []
    for n, prompt in ((9, 4), (14, 6), (5, 2)):
        ids = torch.randint(0, 300, (n,), generator=g).tolist()
        examples.append(Example(ids, [-100] * prompt + ids[prompt:]))
    plain, plain_grads = _loss_and_grads(plain_loss, model, collate(examples, tokenizer), 10.0)
    flat_batch = collate(examples, tokenizer, padding_free=True)
    assert flat_batch["input_ids"].shape == (1, 28) and "attention_mask" not in flat_batch
    flat, flat_grads = _loss_and_grads(build_loss(model, chunked=True), model, flat_batch, 10.0)
    torch.testing.assert_close(flat, plain, rtol=1e-5, atol=1e-5)
    for name in plain_grads:
        torch.testing.assert_close(flat_grads[name], plain_grads[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_gradients_over_several_chunks(bias):
    """A trainable head (weight and bias) gets the gradients of the unchunked computation."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True) if bias else None
    targets = torch.randint(0, 50, (37,), generator=g)
    expected = F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="sum")
    wanted = [t for t in (hidden, weight, b) if t is not None]
    expected_grads = torch.autograd.grad(expected * 0.3, wanted)
    got = linear_cross_entropy_sum(hidden, weight, b, targets, chunk_rows=8)
    got_grads = torch.autograd.grad(got * 0.3, wanted)
    torch.testing.assert_close(got, expected)
    for e, g_ in zip(expected_grads, got_grads):
        torch.testing.assert_close(g_, e)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("block", [7, 50])
def test_frozen_head_in_vocabulary_blocks_equals_the_whole_softmax(bias, block):
    """A frozen head's loss and token log-probs taken a block of the vocabulary at a time (an online softmax; the
    CPU path), over several row chunks, equal the whole-vocabulary computation in value and gradient, also
    where the largest logit of a row turns up in a late block."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = 3 * torch.randn(50, 16, generator=g)  # large logits: the running max moves by tens between blocks
    weight[-1] = 4 * hidden.detach()[:5].mean(0)  # rows whose top logit is the vocabulary's last
    b = torch.randn(50, generator=g) if bias else None
    targets = torch.randint(0, 50, (37,), generator=g)
    scale = torch.rand(37, generator=g)

    logits = F.linear(hidden, weight, b)
    expected = F.cross_entropy(logits, targets, reduction="sum")
    expected_logps = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    got = linear_cross_entropy_sum(hidden, weight, b, targets, chunk_rows=8, vocab_block=block)
    got_logps = linear_token_logps(hidden, weight, b, targets, chunk_rows=8, vocab_block=block)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_logps, expected_logps)
    for e, g_ in ((expected, got), ((expected_logps * scale).sum(), (got_logps * scale).sum())):
        # gradients of size ~3 (W[target] - softmax @ W): fp32 rounding of the two summation orders, ~1e-5
        torch.testing.assert_close(torch.autograd.grad(g_, hidden)[0],
                                   torch.autograd.grad(e, hidden, retain_graph=True)[0], rtol=1e-5, atol=5e-5)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy_sum(hidden, weight, b, targets, vocab_block=block), expected)
        torch.testing.assert_close(linear_token_logps(hidden, weight, b, targets, vocab_block=block), expected_logps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [300, CPU_ROWS + 300])
def test_cpu_loss_memory_is_what_estimate_memory_says(dtype, rows):
    """On a CPU the loss holds one block of logits (CPU_ROWS × CPU_VOCAB_BLOCK), not rows × vocabulary: the peak of
    its tensors is the estimate's figure (lorakit.memory.estimate._blocked_peak) to within a few per cent."""
    from lorakit.memory.estimate import _blocked_peak

    vocab, hidden = 32768, 64
    e = torch.finfo(dtype).bits // 8
    weight = (0.02 * torch.randn(vocab, hidden)).to(dtype)
    h = torch.randn(rows, hidden, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,))
    with TensorMemoryTracker() as tracker:
        linear_cross_entropy_sum(h, weight, None, targets)
    estimate = _blocked_peak(rows, CPU_ROWS, CPU_VOCAB_BLOCK, hidden, e) + rows * hidden * e  # + the gradient kept
    assert tracker.peak <= estimate <= 1.1 * tracker.peak, (tracker.peak, estimate)
    assert tracker.peak < min(rows, CPU_ROWS) * vocab * 4 / 4  # a quarter of one chunk of whole-vocabulary logits


def test_chunked_loss_step_needs_less_memory_at_32k_vocabulary():
    """Peak tensor memory of forward+backward falls: no [batch, seq, 32k] fp32 logits and their gradient."""
    model = _lora(_llama(vocab_size=32768, hidden_size=32), target_modules=["q_proj", "v_proj"])
    batch = _batch(vocab_size=32768, rows=4, length=128)
    chunked = build_loss(model, chunked=True)
    peaks = {}
    for name, fn in (("plain", plain_loss), ("chunked", chunked)):
        model.zero_grad()
        with TensorMemoryTracker() as tracker:
            fn(model, batch, 100.0).backward()
        peaks[name] = tracker.peak
    logits_bytes = 4 * 128 * 32768 * 4
    assert peaks["chunked"] < peaks["plain"] - logits_bytes, peaks


def test_plain_loss_where_the_head_cannot_run_apart():
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    on_head = _lora(_llama(), target_modules=["q_proj", "lm_head"])
    loss = build_loss(on_head, chunked=True)
    assert loss.kind == "plain" and "carries an adapter" in loss.reason  # not "a Linear, not a plain Linear"
    prompt = get_peft_model(_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    loss = build_loss(prompt, chunked=True)
    assert loss.kind == "plain" and loss.reason == "prompt tuning adds virtual tokens inside the forward"
    prefix = get_peft_model(_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert build_loss(prefix, chunked=True).describe() == (  # what eval.json records as loss_path
        "loss: plain (prefix tuning adds virtual tokens inside the forward)")
    assert build_loss(_lora(_llama(), target_modules=["q_proj"]), chunked=False).kind == "plain"


def test_plain_loss_when_the_model_transforms_its_logits():
    """Gemma-2 soft-caps its logits after the head: the config key, and the one-forward probe alone, notice."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5)
    model = _lora(Gemma2ForCausalLM(config).float(), target_modules=["q_proj"])
    loss = build_loss(model, chunked=True)
    assert loss.kind == "plain" and "final_logit_softcapping" in loss.reason
    assert not _head_reproduces_logits(model, model.get_output_embeddings(), _decoder(model))
    llama = _lora(_llama(), target_modules=["q_proj"])
    assert _head_reproduces_logits(llama, llama.get_output_embeddings(), _decoder(llama))


def test_chunked_loss_keeps_no_layer_outputs_in_bfloat16():
    """The decoder's output is caught by a hook: unlike output_hidden_states=True (the control below), no layer's
    output is kept beyond what the backward needs, which in bf16 saves (layers − 1) × tokens × hidden × 2 B."""
    from lorakit.training.loss import shifted_targets

    layers, rows, length, hidden = 8, 4, 128, 256
    model = _lora(_llama(hidden_size=hidden, num_hidden_layers=layers).to(torch.bfloat16), target_modules=["q_proj"])
    batch = _batch(rows=rows, length=length)
    head, chunked = model.get_output_embeddings(), build_loss(model, chunked=True)
    assert chunked.kind == "chunked"

    def with_hidden_states(model, batch, num_items):  # the control: what the chunked loss did before the hook
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**inputs, output_hidden_states=True, logits_to_keep=1)  # alive until the loss is computed
        targets = shifted_targets(batch).reshape(-1)
        keep = (targets != -100).nonzero().squeeze(1)
        h = out.hidden_states[-1].reshape(-1, hidden)[keep]
        return linear_cross_entropy_sum(h, head.weight, None, targets[keep]) / num_items

    peaks, losses = {}, {}
    for name, fn in (("control", with_hidden_states), ("chunked", chunked)):
        model.zero_grad()
        with TensorMemoryTracker() as tracker:
            losses[name] = fn(model, batch, 100.0)
            losses[name].backward()
        peaks[name] = tracker.peak
    torch.testing.assert_close(losses["chunked"], losses["control"])
    saved = (layers - 1) * rows * length * hidden * 2
    assert peaks["chunked"] <= peaks["control"] - 0.9 * saved, (peaks, saved)


def test_the_loop_counts_each_micro_batchs_supervised_tokens_once(tiny_model_dir, tmp_path, monkeypatch):
    """The window's items and its supervised tokens (the logged "tokens") come from one count per micro-batch."""
    import json

    import lorakit.training.loop as loop
    import lorakit.training.loss as loss
    from lorakit.config.load import parse_recipe
    from lorakit.data.formats import num_targets
    from lorakit.training.run import run_training
    from run_helpers import recipe_dict, write_data

    counted = []

    def counting(labels):
        n = num_targets(labels)
        if hasattr(labels, "ndim"):  # a collated micro-batch, not one example's list
            counted.append(n)
        return n

    for module in (loop, loss):
        monkeypatch.setattr(module, "num_targets", counting, raising=False)
    data = write_data(tmp_path / "d.jsonl", 8)
    run = run_training(parse_recipe(recipe_dict(tiny_model_dir, data, tmp_path / "run", max_steps=2)))
    assert len(counted) == 2 * 2  # 2 steps × 2 micro-batches, counted once each
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in logged if "loss" in r] == [sum(counted[:2]), sum(counted)]
