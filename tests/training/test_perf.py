"""Model FLOPs, the efficiency record, the tensor-memory tracker, padding-free detection and the speed knobs."""

import json

import pytest
import torch

from lorakit.errors import UsageError
from lorakit.training.loss import build_loss
from lorakit.models.loading import enable_activation_checkpointing
from lorakit.training.perf import (
    ModelShape,
    TensorMemoryTracker,
    Work,
    apply_speed_knobs,
    efficiency,
    flattening_probe,
    padding_free_supported,
)


def _lora_llama(layers=4, checkpointing=False, attn="eager"):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False, attn_implementation=attn)
    base = LlamaForCausalLM(config)
    if checkpointing:
        enable_activation_checkpointing(base)
    return get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear", lora_dropout=0.0))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_flops_match_torch_flop_counter(checkpointing):
    """The formula agrees with the matmuls torch counts in one real forward+backward of the chunked loss.

    Eager attention computes the full T×T square (the counter sees it), so the work counts T² pairs here;
    layer 0 skips the input gradients of its frozen projections, hence a few percent of slack.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = _lora_llama(checkpointing=checkpointing)
    model.train()
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :20] = -100
    loss = build_loss(model, chunked=True)
    with FlopCounterMode(display=False) as counter:
        loss(model, {"input_ids": ids, "labels": labels}, 1.0).backward()
    work = Work(tokens=64, targets=int((labels[0, 1:] != -100).sum()), attention_pairs=64 * 64)
    predicted = ModelShape.of(model).flops(work, checkpointing)
    assert predicted == pytest.approx(counter.get_total_flops(), rel=0.05)


def test_work_counts_each_packed_example():
    from lorakit.data import Example

    a = Example([1, 2, 3], [-100, 2, 3])
    b = Example([4, 5], [-100, 5])
    packed = Example(a.input_ids + b.input_ids, a.labels + b.labels, seq_lens=[3, 2])
    separate, together = Work(), Work()
    separate.add([a, b])
    together.add([packed])
    assert separate == together == Work(tokens=5, targets=3, attention_pairs=6 + 3)


def test_efficiency_record():
    model = _lora_llama(layers=2)
    work = Work(tokens=1000, targets=400, attention_pairs=50_000)
    record = efficiency(7, work, 2.0, ModelShape.of(model), False, torch.device("cpu"), torch.float32)
    assert record["step"] == 7
    assert record["tokens_per_s"] == 200 and record["input_tokens_per_s"] == 500
    assert record["achieved_flops"] == pytest.approx(record["flops_per_token"] * 500, rel=1e-3)
    assert 0 < record["mfu"] < 1 and "matmul probe, float32" in record["peak_flops_source"]
    json.dumps(record)


def test_tensor_memory_tracker_counts_new_storages_once():
    weight = torch.zeros(1000)  # made before the mode: not counted, nor are its views
    with TensorMemoryTracker() as tracker:
        view = weight[10:]
        a = torch.ones(256, 256)  # 256 KiB
        b = a.t()  # a view: no new storage
        a.add_(1)  # in place: no new storage
        del a, b, view
        c = torch.ones(128, 128)  # 64 KiB, after a was freed
    assert tracker.peak == 256 * 256 * 4
    assert tracker.current == c.nbytes


def test_padding_free_detection():
    """The probe sees transformers keep flattened examples apart, and sees prompt tuning mix them."""
    from peft import PromptTuningConfig, get_peft_model

    assert flattening_probe(_lora_llama(layers=1, attn="sdpa"))
    assert flattening_probe(_lora_llama(layers=1, attn="eager"))
    # Prompt tuning prepends virtual tokens and PEFT drops the position ids: flattened examples would mix.
    base = _lora_llama(layers=1).get_base_model()
    prompt = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert not flattening_probe(prompt)
    assert not padding_free_supported(prompt)


def test_batching_choice():
    """Random order unless data.group_by_length asks for grouping; flattened rows with per-example attention on
    sdpa and eager, padded ones only with data.padding_free: false or where flattened examples would mix."""
    from peft import PromptTuningConfig, get_peft_model

    from lorakit.config.load import parse_recipe
    from lorakit.training.perf import choose_batching

    def recipe(**data):
        return parse_recipe({"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl", **data},
                             "train": {"max_steps": 1, "micro_batch_size": 4, "grad_accum": 1}})

    lengths = [4, 40, 8, 30, 12, 6]
    for attn in ("sdpa", "eager"):
        model = _lora_llama(layers=1, attn=attn)
        chosen = choose_batching(recipe(), model, None)
        assert chosen.padding_free and chosen.lengths is None
        assert chosen.note == ("padding-free, random order: each micro-batch flattened into one row "
                               f"(per-example {attn} attention)")
        assert model.config._attn_implementation == f"lorakit_varlen_{attn}"
        assert choose_batching(recipe(group_by_length=True), model, lengths).lengths == lengths
        padded = choose_batching(recipe(padding_free=False), _lora_llama(layers=1, attn=attn), None)
        assert not padded.padding_free and padded.lengths is None
    assert choose_batching(recipe(packing=True), _lora_llama(layers=1), None).padding_free
    prompt = get_peft_model(_lora_llama(layers=1).get_base_model(),
                            PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    mixed = choose_batching(recipe(), prompt, None)
    assert not mixed.padding_free and "mixes" in mixed.note and prompt.config._attn_implementation == "eager"


def test_liger_knob_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UsageError, match="train.liger"):
        apply_speed_knobs(_lora_llama(layers=1), compile=False, liger=True)


def test_attn_implementation_reaches_the_model(tiny_model_dir):
    from lorakit.models.loading import load_base_model
    from lorakit.config.schema import ModelSection

    for name in ("eager", "sdpa"):
        model = load_base_model(ModelSection(name_or_path=str(tiny_model_dir), attn_implementation=name),
                                str(tiny_model_dir))
        assert model.config._attn_implementation == name


@pytest.mark.slow
def test_train_ends_with_an_efficiency_record(tiny_model_dir, tmp_path):
    from lorakit.config.load import parse_recipe
    from lorakit.training.run import run_training

    rows = [{"instruction": f"say {i}", "input": "", "output": "ok " * (1 + i % 5)} for i in range(8)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = parse_recipe({
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(data)},
        "train": {"max_steps": 2, "micro_batch_size": 2, "grad_accum": 1, "log_every": 1},
        "output": {"dir": str(tmp_path / "run")},
    })
    run = run_training(recipe)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2
    assert last["tokens_per_s"] > 0 and last["flops_per_token"] > 0 and 0 < last["mfu"] < 1


def test_evaluation_is_padding_free_like_training():
    """evaluate() flattens its batches when training does (one row per micro-batch, no pad tokens) and gets the
    padded evaluation's loss."""
    from types import SimpleNamespace

    from lorakit.data.formats import Example
    from lorakit.testing import build_tokenizer
    from lorakit.training.loop import evaluate
    from lorakit.training.perf import choose_batching
    from lorakit.config.load import parse_recipe

    model, tokenizer = _lora_llama(layers=2, attn="sdpa"), build_tokenizer()
    recipe = parse_recipe({"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "train": {"max_steps": 1}})
    assert choose_batching(recipe, model, None).padding_free  # registers the per-example attention
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (5, 17, 9, 30, 12):
        ids = torch.randint(3, 1000, (n,), generator=g).tolist()
        examples.append(Example(ids, [-100] * 2 + ids[2:], 2))
    cfg, loss = SimpleNamespace(micro_batch_size=2), build_loss(model, True)
    one_process = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"))  # no global state
    rows = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: rows.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    flat = evaluate(model, tokenizer, examples, cfg, one_process, loss, padding_free=True)
    assert [r[0] for r in rows] == [1, 1, 1] and sum(r[1] for r in rows) == sum(len(e) for e in examples)
    rows.clear()
    padded = evaluate(model, tokenizer, examples, cfg, one_process, loss)
    hook.remove()
    assert [r[0] for r in rows] == [2, 2, 1]
    # Padded batches take the examples in order of length (5, 9 | 12, 17 | 30): widths 9, 17, 30, 82 positions
    # in all, against 17, 30, 12 (106) in data order.
    assert [r[1] for r in rows] == [9, 17, 30]
    assert flat["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-5)
