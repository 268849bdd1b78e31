"""Preference objectives against an independent implementation of the published formulas, in fp32 on the tiny
model: per-batch loss, rewards and every adapter gradient within 1e-5, for DPO (with label smoothing), IPO, ORPO
and SimPO, on the chunked and the plain log-prob paths, padded and flattened, with LoRA, DoRA, an nf4 base and
activation checkpointing. At step 0 (B = 0) the DPO loss is ln 2.

The reference implementation runs each sequence alone through the model (no batching, no padding, the full
logits), takes log_softmax, and applies the papers' equations: DPO (Rafailov et al. 2023, eq. 7, with the
conservative label smoothing of Mitchell 2023), IPO (Azar et al. 2023, eq. 17, on length-averaged log-probs
as TRL computes it), SimPO (Meng et al. 2024, eq. 6), ORPO (Hong et al. 2024, eq. 6-7).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from lorakit.adapters.build import build_model
from lorakit.config.load import parse_recipe
from lorakit.data import collate, load_datasets, num_targets
from lorakit.models.loading import load_tokenizer
from lorakit.training.perf import choose_batching
from lorakit.training.preference import PreferenceLoss, build_training_loss
from run_helpers import write_pairs

LORA = {"method": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}
DORA = {**LORA, "method": "dora"}
SETTINGS = {"dpo": {"beta": 0.3, "label_smoothing": 0.1}, "ipo": {"beta": 0.5}, "simpo": {"beta": 2.0,
            "simpo_gamma": 0.7}, "orpo": {"orpo_lambda": 0.25}}


def setup(model_dir, tmp_path, objective="dpo", adapter=LORA, quantization="none", checkpointing=False,
          perturb=True, **train):
    data = write_pairs(tmp_path / "pairs.jsonl", 5)
    recipe = parse_recipe({
        "model": {"name_or_path": str(model_dir), "dtype": "float32", "quantization": quantization},
        "adapter": adapter,
        "data": {"train": str(data), "format": "preference", "max_seq_len": 128},
        "train": {"max_steps": 1, "objective": objective, "gradient_checkpointing": checkpointing,
                  **SETTINGS.get(objective, {}), **train},
    })
    model = build_model(recipe)
    if perturb:  # the policy away from the reference, so rewards and gradients are not trivial
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    tokenizer = load_tokenizer(recipe.model, str(model_dir))
    pairs = load_datasets(recipe.data, tokenizer, 0).train
    return recipe, model, tokenizer, pairs


def answer_logps(model, sequence):
    """(summed log-prob of the answer tokens, their number): the sequence alone, full logits, log_softmax."""
    ids = torch.tensor([sequence.input_ids])
    logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)
    mask = torch.tensor(sequence.labels[1:]) != -100
    return logps[mask].sum(), int(mask.sum())


def published(cfg, model, pairs):
    """(mean loss, [(chosen reward, rejected reward)], [(chosen logps, rejected logps)]) by the papers' formulas."""
    losses, rewards, logps = [], [], []
    for pair in pairs:
        (pc, nc), (pr, nr) = answer_logps(model, pair), answer_logps(model, pair.rejected)
        with torch.no_grad(), model.disable_adapter():
            rc, rr = answer_logps(model, pair)[0], answer_logps(model, pair.rejected)[0]
        if cfg.objective == "dpo":
            z = cfg.beta * ((pc - rc) - (pr - rr))
            ls = cfg.label_smoothing
            losses.append(-(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z))
            rewards.append((cfg.beta * (pc - rc), cfg.beta * (pr - rr)))
            logps.append((pc, pr))
        elif cfg.objective == "ipo":
            h = (pc / nc - rc / nc) - (pr / nr - rr / nr)
            losses.append((h - 1 / (2 * cfg.beta)) ** 2)
            rewards.append((cfg.beta * (pc - rc) / nc, cfg.beta * (pr - rr) / nr))
            logps.append((pc / nc, pr / nr))
        elif cfg.objective == "simpo":
            losses.append(-F.logsigmoid(cfg.beta / nc * pc - cfg.beta / nr * pr - cfg.simpo_gamma))
            rewards.append((cfg.beta * pc / nc, cfg.beta * pr / nr))
            logps.append((pc / nc, pr / nr))
        else:  # orpo: odds(y|x) = P(y|x) / (1 - P(y|x)), P the per-token mean likelihood
            a, b = pc / nc, pr / nr
            log_odds = (a - b) - (torch.log1p(-torch.exp(a)) - torch.log1p(-torch.exp(b)))
            losses.append(-a - cfg.orpo_lambda * F.logsigmoid(log_odds))
            rewards.append((cfg.orpo_lambda * a, cfg.orpo_lambda * b))
            logps.append((a, b))
    return torch.stack(losses).mean(), rewards, logps


def grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad()
    return out


def assert_same_grads(ours, theirs, atol=1e-5):
    assert theirs and ours.keys() == theirs.keys()
    for name, grad in theirs.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=atol, msg=name)


class Accelerator:  # what Tally.means needs of accelerate's Accelerator in one process
    num_processes, device = 1, torch.device("cpu")


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "plain"])
@pytest.mark.parametrize("objective", ["dpo", "ipo", "simpo", "orpo"])
def test_loss_rewards_and_gradients_equal_the_published_formulas(tiny_model_dir, tmp_path, objective, chunked):
    recipe, model, tokenizer, pairs = setup(tiny_model_dir, tmp_path, objective, chunked_loss=chunked)
    model.train()
    loss_fn = build_training_loss(model, recipe.train)
    assert isinstance(loss_fn, PreferenceLoss) and loss_fn.kind == ("chunked" if chunked else "plain")
    expected, rewards, logps = published(recipe.train, model, pairs)
    expected.backward()
    theirs = grads(model)

    batch = collate(pairs, tokenizer)
    assert loss_fn.items(batch) == len(pairs)
    assert loss_fn.counts(batch) == (len(pairs), num_targets(batch["labels"]))
    tally = loss_fn.new_tally()
    loss = loss_fn(model, batch, len(pairs), tally)
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-5)
    assert_same_grads(grads(model), theirs)

    n = len(pairs)
    chosen, rejected = [float(c.detach()) for c, _ in rewards], [float(r.detach()) for _, r in rewards]
    want = {"rewards/chosen": sum(chosen) / n, "rewards/rejected": sum(rejected) / n,
            "rewards/margin": sum(c - r for c, r in zip(chosen, rejected)) / n,
            "rewards/accuracy": sum(c > r for c, r in zip(chosen, rejected)) / n,
            "logps/chosen": sum(float(c.detach()) for c, _ in logps) / n,
            "logps/rejected": sum(float(r.detach()) for _, r in logps) / n}
    got = tally.means(Accelerator())
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=2e-5), key  # fp32: ulp(172) is 1.5e-5


def test_dpo_loss_is_ln2_at_step_0(tiny_model_dir, tmp_path):
    """B = 0: the policy is the base bit for bit, so every pair's loss is -log σ(0) = ln 2; with dropout on."""
    recipe, model, tokenizer, pairs = setup(tiny_model_dir, tmp_path, adapter={**LORA, "lora_dropout": 0.1},
                                            perturb=False)
    model.train()
    loss_fn = build_training_loss(model, recipe.train)
    tally = loss_fn.new_tally()
    for pair in pairs:
        assert loss_fn(model, collate([pair], tokenizer), 1, tally).item() == torch.tensor(math.log(2)).item()
    four = loss_fn(model, collate(pairs[:4], tokenizer, padding_free=True), 4, tally)
    assert four.item() == pytest.approx(math.log(2), abs=1e-7)
    means = tally.means(Accelerator())
    assert means["rewards/chosen"] == means["rewards/rejected"] == means["rewards/accuracy"] == 0


def test_preference_objectives_turn_the_base_models_dropout_off(tmp_path):
    """GPT-2 has dropout 0.1 in its embeddings, attention and residuals. The reference runs without dropout, so
    with the base's dropout on in the policy's forward a DPO run started at losses 0.667-0.696 instead of ln 2.
    TRL's preference trainers turn it off (disable_dropout); so does lorakit, keeping the adapter's own dropout
    as the recipe sets it. SFT keeps the base's dropout, as transformers' Trainer does."""
    from lorakit.testing import build_tiny_gpt2
    from lorakit.training.effective import _objective

    gpt2 = build_tiny_gpt2(tmp_path / "gpt2")
    recipe, model, tokenizer, pairs = setup(gpt2, tmp_path, adapter={**LORA, "lora_dropout": 0.1}, perturb=False)
    base = [m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_" not in n]
    assert base and set(base) == {0.0}
    assert {m.lora_dropout["default"].p for m in model.modules() if hasattr(m, "lora_dropout")} == {0.1}
    model.train()
    loss_fn = build_training_loss(model, recipe.train)
    tally = loss_fn.new_tally()
    for pair in pairs:
        assert loss_fn(model, collate([pair], tokenizer), 1, tally).item() == pytest.approx(math.log(2), abs=1e-6)
    assert "the base model's own dropout off" in _objective(recipe.train)

    sft = parse_recipe({"model": {"name_or_path": str(gpt2), "dtype": "float32"}, "adapter": LORA,
                        "data": {"train": "x.jsonl"}, "train": {"max_steps": 1}})
    assert {m.p for m in build_model(sft).modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
    assert "dropout" not in _objective(sft.train)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("adapter,quantization", [(LORA, "none"), (DORA, "none"), (LORA, "nf4")],
                         ids=["lora", "dora", "qlora-nf4"])
def test_flattened_pairs_equal_the_formulas(tiny_model_dir, tmp_path, adapter, quantization, checkpointing):
    """Chosen and rejected flattened into one row (data.padding_free, per-example attention), on LoRA, DoRA, a
    4-bit base, with activation checkpointing: the same loss and gradients as each sequence alone."""
    recipe, model, tokenizer, pairs = setup(tiny_model_dir, tmp_path, "dpo", adapter, quantization, checkpointing)
    atol = 1e-4 if quantization == "nf4" else 1e-5
    model.train()
    expected, _, _ = published(recipe.train, model, pairs)
    expected.backward()
    theirs = grads(model)
    assert choose_batching(recipe, model, None).padding_free
    loss_fn = build_training_loss(model, recipe.train)
    flat = collate(pairs, tokenizer, padding_free=True)
    assert loss_fn.counts(flat) == (len(pairs), num_targets(flat["labels"]))
    loss = loss_fn(model, flat, len(pairs))
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=atol)
    assert_same_grads(grads(model), theirs, atol)


def test_precomputed_reference_equals_the_adapter_switched_off(tiny_model_dir, tmp_path):
    from lorakit.training.preference import compute_reference

    recipe, model, tokenizer, pairs = setup(tiny_model_dir, tmp_path, "dpo")
    model.train()
    loss_fn = build_training_loss(model, recipe.train)
    live = loss_fn(model, collate(pairs, tokenizer), len(pairs))
    for pair, logps in zip(pairs, compute_reference(loss_fn, pairs, tokenizer, 2)):
        pair.ref_logps = logps
    assert model.training  # handed back as it was
    stored = loss_fn(model, collate(pairs, tokenizer), len(pairs))
    torch.testing.assert_close(stored, live, rtol=1e-6, atol=1e-6)


def test_an_idle_pair_adds_nothing_but_reaches_every_adapter_weight(tiny_model_dir, tmp_path):
    from lorakit.data.shards import idle_batch

    recipe, model, tokenizer, pairs = setup(tiny_model_dir, tmp_path, "orpo")
    loss_fn = build_training_loss(model, recipe.train)
    batch = collate([idle_batch(pairs[0])], tokenizer)
    assert loss_fn.items(batch) == 0
    loss = loss_fn(model, batch, 3)
    loss.backward()
    assert loss.item() == 0.0
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and not p.grad.any() for p in trainable)


def test_efficiency_counts_the_live_reference_forward(tiny_model_dir, tmp_path):
    """DPO with train.reference base runs one more forward per micro-batch (the adapter off, no backward): the
    FLOPs formula adds it, by the ratio torch's counter sees against a reference-free objective on the same pairs;
    precomputed log-probs and ORPO/SimPO add nothing."""
    from torch.utils.flop_counter import FlopCounterMode

    from lorakit.training.perf import ModelShape, Work
    from lorakit.training.preference import live_reference

    counted = {}
    for objective in ("dpo", "simpo"):
        (tmp_path / objective).mkdir()
        recipe, model, tokenizer, pairs = setup(tiny_model_dir, tmp_path / objective, objective)
        model.train()
        loss_fn = build_training_loss(model, recipe.train)
        with FlopCounterMode(display=False) as counter:
            loss_fn(model, collate(pairs, tokenizer), len(pairs)).backward()
        counted[objective] = counter.get_total_flops()
        assert live_reference(recipe.train) == (objective == "dpo")
    work = Work()
    work.add(pairs)
    with_reference = ModelShape.of(model, reference_forward=True).flops(work, False)
    assert with_reference / ModelShape.of(model).flops(work, False) == pytest.approx(
        counted["dpo"] / counted["simpo"], rel=0.05)
    assert not live_reference(recipe.train.model_copy(update={"objective": "dpo", "reference": "precomputed"}))


def test_a_precomputed_reference_is_computed_in_the_training_batch_layout(tiny_model_dir, tmp_path):
    """B = 0: a reference precomputed in the layout the training batches have (flattened under data.padding_free,
    the default) is the policy bit for bit: every reward exactly 0. It was always computed padded, and rounding
    made some chosen rewards higher at step 0 (rewards/accuracy 0.25 on a train.reference init_from run)."""
    from lorakit.training.preference import attach_reference

    recipe, model, tokenizer, _ = setup(tiny_model_dir, tmp_path, "dpo", perturb=False, reference="precomputed")
    loss_fn = build_training_loss(model, recipe.train)
    data = load_datasets(recipe.data.model_copy(update={"cache": False}), tokenizer, 0)
    padding_free = choose_batching(recipe, model, None).padding_free
    attach_reference(recipe, loss_fn, data, tokenizer, lambda line: None, padding_free=padding_free)
    pairs = [data.train[i] for i in range(len(data.train))]
    assert padding_free and all(pair.ref_logps is not None for pair in pairs)
    tally = loss_fn.new_tally()
    for start in range(0, len(pairs), 2):
        loss_fn(model, collate(pairs[start : start + 2], tokenizer, padding_free=padding_free), 1, tally)
    means = tally.means(Accelerator())
    assert means["rewards/chosen"] == means["rewards/rejected"] == means["rewards/accuracy"] == 0
