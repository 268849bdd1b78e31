"""lorakit's preference losses against TRL 1.16, the reference implementation (a dev dependency, test-only).

Per pair, on random log-probs (fp64; ORPO fp32, as TRL computes it), for several β, ε, γ, λ: loss, gradient with
respect to the log-probs, and logged rewards, through TRL's real trainer objects built on the tiny model: DPO and
IPO by DPOTrainer's compute_loss, conservative DPO (label smoothing) and SimPO by CPOTrainer.cpo_loss, ORPO by
ORPOTrainer.odds_ratio_loss. End to end on the tiny model with the same LoRA weights: DPOTrainer tokenizes the same
chat pairs into the same tokens and masks as lorakit, and the batch's loss, adapter gradients and logged metrics
agree; SimPO's and ORPO's batches go through CPOTrainer's and ORPOTrainer's own collator and concatenated forward.

Where TRL's convention differs (docs/preference.md, "Compared with TRL"), the test asserts the documented relation.
"""

import json
import warnings
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
from trl.import_utils import TRLExperimentalWarning

from lorakit.config.schema import TrainSection
from lorakit.data import collate
from lorakit.training.preference import NORMALISED, build_training_loss, pair_losses
from test_preference import LORA, Accelerator, assert_same_grads, grads, setup

with warnings.catch_warnings():  # CPO and ORPO live in trl.experimental, which says so on import
    warnings.simplefilter("ignore", TRLExperimentalWarning)
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

ROW = {"prompt": [{"role": "user", "content": "Count to 3"}], "chosen": [{"role": "assistant", "content": "0 1 2"}],
       "rejected": [{"role": "assistant", "content": "the quick brown fox"}]}
PAIRS = 6


def trl_args(config, tmp_path, **kwargs):
    # bf16=False: TRL's configs default to bf16, which would leave accelerate's process-wide state (a singleton) in
    # bf16 mixed precision for every later Accelerator in this process; lorakit's refuses it (see the fixture below).
    return config(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, save_strategy="no", bf16=False,
                  **kwargs)


@pytest.fixture(autouse=True, scope="module")
def fresh_accelerate_state():
    """TRL's trainers initialise accelerate's shared state; later tests in this process (lorakit runs in-process)
    must start from none, as a `lorakit train` process does."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def build_trainer(kind, model_dir, tmp_path, rows=(ROW,), model=None, peft_config=None, **kwargs):
    """A real TRL trainer on the tiny model (a fresh copy unless ``model``): construction takes a fraction of a
    second, so every β, ε, γ, λ gets its own."""
    config, trainer = {"dpo": (DPOConfig, DPOTrainer), "cpo": (CPOConfig, CPOTrainer),
                       "orpo": (ORPOConfig, ORPOTrainer)}[kind]
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    extra = {"peft_config": peft_config} if peft_config is not None else {}
    built = trainer(model=model, args=trl_args(config, tmp_path, **kwargs), train_dataset=Dataset.from_list(list(rows)),
                    processing_class=AutoTokenizer.from_pretrained(model_dir), **extra)
    built.model.train()  # as Trainer.train() leaves it (precomputing the reference put it in eval mode)
    return built


def random_pairs(dtype=torch.float64, seed=0):
    """Per-token log-probs of PAIRS chosen then PAIRS rejected answers of 1-7 tokens (zero past each answer's end),
    with a few answers close to certain (ORPO's 1 - P near 0); the leaf the gradients are taken against."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 8, (2 * PAIRS,), generator=g)
    mask = torch.arange(7)[None, :] < lengths[:, None]
    scale = torch.tensor([5.0, 0.5, 1e-3, 3.0, 8.0, 1e-2] * 2)[:, None]
    per_token = -(torch.rand(2 * PAIRS, 7, generator=g, dtype=torch.float64) * scale).to(dtype) * mask
    reference = -(torch.rand(2 * PAIRS, generator=g, dtype=torch.float64) * 20 * lengths).to(dtype)
    return per_token.requires_grad_(), mask, lengths, reference


def lorakit_pair(cfg, per_token, mask, lengths, reference, i):
    """lorakit's pair_losses for pair i, on summed or per-token mean log-probs as PreferenceLoss passes them (its
    NORMALISED table)."""
    scale = lengths.to(per_token.dtype) if NORMALISED[cfg.objective] else torch.ones_like(reference)
    policy = (per_token * mask).sum(1) / scale
    ref = reference / scale
    refs = (ref[i], ref[PAIRS + i]) if cfg.objective in ("dpo", "ipo") else ()
    return pair_losses(cfg, policy[i], policy[PAIRS + i], *refs)


def grad_of(value, leaf):
    (grad,) = torch.autograd.grad(value, leaf, retain_graph=True)
    return grad


def assert_each_pair_equal(cfg, pairs, theirs, tol=1e-12):
    """lorakit's loss, its gradient with respect to every per-token log-prob, and the rewards of each pair equal
    ``theirs(i)``: TRL's (loss, chosen reward, rejected reward) of pair i."""
    per_token, mask, lengths, reference = pairs
    for i in range(PAIRS):
        ours, chosen, rejected = lorakit_pair(cfg, per_token, mask, lengths, reference, i)
        loss, trl_chosen, trl_rejected = theirs(i)
        torch.testing.assert_close(ours, loss, rtol=tol, atol=tol)
        torch.testing.assert_close(grad_of(ours, per_token), grad_of(loss, per_token), rtol=10 * tol, atol=tol)
        torch.testing.assert_close(torch.stack([chosen, rejected]), torch.stack([trl_chosen, trl_rejected]))


class PerTokenLogps:
    """Stands in for the model DPOTrainer's compute_loss calls (``model(..., labels=..., fused_lm_head=True)``,
    TRL's fused head): returns the given per-token log-probs, zero off the answers as the fused head does, so TRL's
    own code (its sums, its IPO length averaging, its loss and logged rewards) runs on chosen numbers."""

    def __init__(self, per_token):
        self.per_token = per_token

    def __call__(self, **_):
        zeros = torch.zeros_like(self.per_token.detach())
        return SimpleNamespace(log_probs=self.per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def dpo_trainer_pair(trainer, per_token, mask, reference, i):
    """TRL DPOTrainer.compute_loss on pair i alone (its precomputed-reference path: the reference log-probs come in
    the batch), and the rewards it logs."""
    prompt = 2
    rows = [i, PAIRS + i]
    width = prompt + 7
    completion = torch.zeros(2, width, dtype=torch.long)
    completion[:, prompt:] = mask[rows].long()
    attention = completion.clone()
    attention[:, :prompt] = 1
    # position t scores token t + 1 (TRL's shift): the answer's tokens from position prompt - 1
    shifted = torch.cat([torch.zeros(2, prompt - 1, dtype=per_token.dtype), per_token[rows] * mask[rows]], dim=1)
    inputs = {"input_ids": torch.zeros(2, width, dtype=torch.long), "attention_mask": attention,
              "completion_mask": completion, "ref_chosen_logps": reference[i : i + 1],
              "ref_rejected_logps": reference[PAIRS + i : PAIRS + i + 1]}
    loss = trainer.compute_loss(PerTokenLogps(shifted), inputs)
    trainer.log({"loss": 0.0})
    logged = trainer.state.log_history[-1]
    return loss, logged["rewards/chosen"], logged["rewards/rejected"]


@pytest.mark.parametrize("objective,beta", [("dpo", 0.05), ("dpo", 0.3), ("dpo", 2.0), ("ipo", 0.1), ("ipo", 0.5),
                                            ("ipo", 2.0)])
def test_dpo_and_ipo_equal_trl_dpo_trainer(tiny_model_dir, tmp_path, objective, beta):
    """Loss and gradient per pair equal DPOTrainer's (loss_type sigmoid / ipo). Rewards: equal for DPO; for IPO
    TRL logs β·(summed log-ratio) while its loss (and lorakit's rewards) use the per-token mean, so lorakit's IPO
    reward × the answer's length = TRL's."""
    trainer = build_trainer("dpo", tiny_model_dir, tmp_path, beta=beta,
                            loss_type=["sigmoid" if objective == "dpo" else objective], precompute_ref_log_probs=True)
    cfg = TrainSection(objective=objective, beta=beta, max_steps=1)
    pairs = random_pairs()
    per_token, mask, lengths, reference = pairs
    tokens = lengths.double() if objective == "ipo" else torch.ones(2 * PAIRS, dtype=torch.float64)

    def theirs(i):
        loss, chosen, rejected = dpo_trainer_pair(trainer, per_token, mask, reference, i)
        return loss, chosen / tokens[i], rejected / tokens[PAIRS + i]

    assert_each_pair_equal(cfg, pairs, theirs)


@pytest.mark.parametrize("beta,label_smoothing", [(0.1, 0.1), (0.5, 0.25), (2.0, 0.4)])
def test_conservative_dpo_equals_trl_cpo_sigmoid_on_log_ratios(tiny_model_dir, tmp_path, beta, label_smoothing):
    """train.label_smoothing is conservative DPO (Mitchell 2023): -(1-ε) log σ(βh) - ε log σ(-βh). TRL 1.16's
    DPOTrainer has no such loss (its label_smoothing only reaches robust, exo_pair and aot; sigmoid ignores it), but
    CPOTrainer's sigmoid loss is that formula on the log-prob difference, with no reference: given the log-ratios
    log π - log π_ref as its log-probs it is conservative DPO. Loss, gradient and rewards equal."""
    trainer = build_trainer("cpo", tiny_model_dir, tmp_path, beta=beta, label_smoothing=label_smoothing,
                            loss_type="sigmoid")
    cfg = TrainSection(objective="dpo", beta=beta, label_smoothing=label_smoothing, max_steps=1)
    pairs = random_pairs()
    per_token, mask, lengths, reference = pairs
    ratios = (per_token * mask).sum(1) - reference
    losses, chosen, rejected = trainer.cpo_loss(ratios[:PAIRS], ratios[PAIRS:])
    assert_each_pair_equal(cfg, pairs, lambda i: (losses[i], chosen[i], rejected[i]))


@pytest.mark.parametrize("beta,gamma", [(2.0, 0.0), (2.0, 0.5), (10.0, 1.6), (0.5, 3.0)])
def test_simpo_equals_trl_cpo_simpo(tiny_model_dir, tmp_path, beta, gamma):
    """SimPO is CPOTrainer's loss_type simpo with cpo_alpha 0 (no NLL term) on per-token mean log-probs (TRL averages
    for simpo): -log σ(β(ā_w - ā_l) - γ). Loss, gradient and rewards (β·ā) equal."""
    trainer = build_trainer("cpo", tiny_model_dir, tmp_path, beta=beta, simpo_gamma=gamma, loss_type="simpo",
                            cpo_alpha=0.0)
    cfg = TrainSection(objective="simpo", beta=beta, simpo_gamma=gamma, max_steps=1)
    pairs = random_pairs()
    per_token, mask, lengths, reference = pairs
    means = (per_token * mask).sum(1) / lengths
    losses, chosen, rejected = trainer.cpo_loss(means[:PAIRS], means[PAIRS:])
    assert_each_pair_equal(cfg, pairs, lambda i: (losses[i], chosen[i], rejected[i]))


@pytest.mark.parametrize("orpo_lambda", [0.1, 0.25, 1.0])
def test_orpo_equals_trl_odds_ratio_loss_plus_the_papers_nll(tiny_model_dir, tmp_path, orpo_lambda):
    """ORPO per pair: lorakit's loss = -ā_w (the paper's L_SFT: the chosen answer's per-token mean NLL) + TRL's
    odds-ratio term -ORPOTrainer.odds_ratio_loss (β there is λ); TRL adds its NLL once per batch from the logits
    instead (see the end-to-end test). In fp32, as TRL casts. Loss, gradient and rewards (λ·ā) equal."""
    trainer = build_trainer("orpo", tiny_model_dir, tmp_path, beta=orpo_lambda)
    cfg = TrainSection(objective="orpo", orpo_lambda=orpo_lambda, max_steps=1)
    pairs = random_pairs(torch.float32)
    per_token, mask, lengths, reference = pairs
    means = (per_token * mask).sum(1) / lengths
    ratio, chosen, rejected, _, _ = trainer.odds_ratio_loss(means[:PAIRS], means[PAIRS:])
    assert_each_pair_equal(cfg, pairs, lambda i: (-means[i] - ratio[i], chosen[i], rejected[i]), tol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# End to end on the tiny model: a batch of pairs, the same tokens and LoRA weights


def chat_rows(path):
    """The pairs file's rows as TRL's conversational preference rows: lorakit renders a plain prompt as one user turn
    and each answer as the assistant's."""
    rows = [json.loads(line) for line in open(path)]
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]


@pytest.mark.parametrize("objective", ["dpo", "ipo"])
def test_a_batch_equals_trl_dpo_trainer_end_to_end(tiny_model_dir, tmp_path, objective):
    """DPOTrainer, given the chat rows and a LoRA of the same shape (the reference: its adapter switched off, as
    lorakit's train.reference base), loaded with lorakit's perturbed adapter weights: it tokenizes every pair into
    lorakit's tokens and answer masks, and the batch's loss, every adapter gradient and (DPO) the logged rewards and
    log-probs equal lorakit's. DPO without label smoothing: TRL's sigmoid loss has none."""
    recipe, model, tokenizer, pairs = setup(tiny_model_dir, tmp_path, objective, label_smoothing=0.0) \
        if objective == "dpo" else setup(tiny_model_dir, tmp_path, objective)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=0.0, target_modules="all-linear")
    trainer = build_trainer("dpo", tiny_model_dir, tmp_path, rows=chat_rows(tmp_path / "pairs.jsonl"), model=base,
                            peft_config=peft_config, beta=recipe.train.beta,
                            loss_type=["sigmoid" if objective == "dpo" else objective])
    ours, theirs = dict(model.named_parameters()), dict(trainer.model.named_parameters())
    assert ours.keys() == theirs.keys()
    with torch.no_grad():
        for name, param in theirs.items():
            param.copy_(ours[name])

    rows = [trainer.train_dataset[i] for i in range(len(pairs))]
    for pair, row in zip(pairs, rows):
        prompt = [-100] * len(row["prompt_ids"])
        assert pair.input_ids == row["prompt_ids"] + row["chosen_ids"] and pair.labels == prompt + row["chosen_ids"]
        rejected = pair.rejected
        assert rejected.input_ids == row["prompt_ids"] + row["rejected_ids"]
        assert rejected.labels == prompt + row["rejected_ids"]

    model.train()
    trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    trl_loss.backward()
    trl_grads = grads(trainer.model)
    trainer.log({"loss": 0.0})
    logged = trainer.state.log_history[-1]
    loss_fn = build_training_loss(model, recipe.train)
    tally = loss_fn.new_tally()
    loss = loss_fn(model, collate(pairs, tokenizer), len(pairs), tally)
    loss.backward()
    torch.testing.assert_close(loss.detach(), trl_loss.detach(), rtol=1e-5, atol=1e-5)
    assert_same_grads(grads(model), trl_grads)
    if objective == "dpo":
        ours = tally.means(Accelerator())
        for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
            assert ours[key] == pytest.approx(logged[key], rel=1e-5, abs=1e-5), key
        assert ours["rewards/margin"] == pytest.approx(logged["rewards/margins"], rel=1e-5, abs=1e-5)
        assert ours["rewards/accuracy"] == pytest.approx(logged["rewards/accuracies"])


def trl_features(pair):
    """A lorakit pair as the tokenized row CPOTrainer's and ORPOTrainer's collator takes."""
    prompt = pair.labels.index(next(t for t in pair.labels if t != -100))
    row = {"prompt_input_ids": pair.input_ids[:prompt], "prompt_attention_mask": [1] * prompt}
    for side, seq in (("chosen", pair), ("rejected", pair.rejected)):
        row |= {f"{side}_input_ids": seq.input_ids, f"{side}_attention_mask": [1] * len(seq.input_ids),
                f"{side}_labels": seq.labels}
    return row


@pytest.mark.parametrize("objective", ["simpo", "orpo"])
def test_a_batch_through_trl_cpo_and_orpo_trainers(tiny_model_dir, tmp_path, objective):
    """lorakit's tokens through CPOTrainer's / ORPOTrainer's own collator, concatenated forward (per-token mean
    log-probs) and loss, on lorakit's model. (Their legacy tokenizer appends an EOS after the chat template's
    end-of-turn, so the tokens are lorakit's rather than theirs.) SimPO: loss, adapter gradients and logged metrics
    equal. ORPO: the odds-ratio part and the metrics equal; TRL's NLL term is the mean over every token of the batch's
    chosen sequences, prompt included (checked here by hand), where lorakit takes the paper's per-pair mean NLL of
    the chosen answer."""
    recipe, model, tokenizer, pairs = setup(tiny_model_dir, tmp_path, objective)
    cfg = recipe.train
    if objective == "simpo":
        trainer = build_trainer("cpo", tiny_model_dir, tmp_path, rows=chat_rows(tmp_path / "pairs.jsonl"), model=model,
                                beta=cfg.beta, simpo_gamma=cfg.simpo_gamma, loss_type="simpo", cpo_alpha=0.0)
    else:
        trainer = build_trainer("orpo", tiny_model_dir, tmp_path, rows=chat_rows(tmp_path / "pairs.jsonl"),
                                model=model, beta=cfg.orpo_lambda)
    assert trainer.model is model
    batch = trainer.data_collator([trl_features(pair) for pair in pairs])
    trl_loss, metrics = trainer.get_batch_loss_metrics(model, batch)
    trl_loss.backward()
    trl_grads = grads(model)
    loss_fn = build_training_loss(model, cfg)
    tally = loss_fn.new_tally()
    loss = loss_fn(model, collate(pairs, tokenizer), len(pairs), tally)
    loss.backward()
    ours = tally.means(Accelerator())
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert ours[key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-5), key
    assert ours["rewards/margin"] == pytest.approx(metrics["rewards/margins"], rel=1e-5, abs=1e-5)
    assert ours["rewards/accuracy"] == pytest.approx(metrics["rewards/accuracies"])
    if objective == "simpo":
        torch.testing.assert_close(loss.detach(), trl_loss.detach(), rtol=1e-5, atol=1e-5)
        assert_same_grads(grads(model), trl_grads)
        return
    # ours = mean(-ā_w) + mean(-λ log σ(log odds)); TRL's = its NLL + the same odds-ratio mean
    assert loss.item() + ours["logps/chosen"] == pytest.approx(trl_loss.item() - metrics["nll_loss"], rel=1e-5, abs=1e-6)
    with torch.no_grad():  # the two NLL terms by hand, from the chosen sequences' logits
        ids, attention = batch["chosen_input_ids"], batch["chosen_attention_mask"]
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        every_token, answer = attention[:, 1:] == 1, batch["chosen_labels"][:, 1:] != -100
    assert metrics["nll_loss"] == pytest.approx(float(nll[every_token].mean()), rel=1e-5)
    per_pair = (nll * answer).sum(1) / answer.sum(1)
    assert -ours["logps/chosen"] == pytest.approx(float(per_pair.mean()), rel=1e-5)
