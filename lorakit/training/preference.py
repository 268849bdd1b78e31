"""Preference objectives (train.objective dpo, ipo, orpo, simpo): the published per-pair losses, computed from one
forward over a micro-batch's chosen and rejected sequences (padded rows, or all flattened into one row).

The reference model of DPO and IPO is the model itself with the adapter switched off (PEFT's disable_adapter:
no second copy of the weights, one forward without gradients), or log-probs computed once before training
(train.reference: precomputed) and carried in the batch as ``ref_logps``. ORPO and SimPO need no reference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lorakit.config.schema import TrainSection
from lorakit.data.formats import IGNORE_INDEX
from lorakit.training.loss import (
    Tally, _decoder, build_loss, eval_mode, fewest_logits, forward_hidden, head_unusable, linear_token_logps,
    shifted_targets,
)

# Objectives that compare length-normalised log-probs (the mean over an answer's tokens): IPO as TRL computes it,
# ORPO and SimPO as their papers define them. DPO uses the sum.
NORMALISED = {"dpo": False, "ipo": True, "orpo": True, "simpo": True}
NEEDS_REFERENCE = ("dpo", "ipo")

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen", "logps/rejected")


def live_reference(cfg: TrainSection) -> bool:
    """Whether every micro-batch runs the reference's forward (DPO/IPO with train.reference base), rather than
    reading log-probs computed before training (precomputed, init_from) or needing none (SFT, ORPO, SimPO)."""
    return cfg.objective in NEEDS_REFERENCE and cfg.reference not in ("precomputed", "init_from")


def build_training_loss(model, cfg: TrainSection):
    """The loss of train.objective for ``model`` (the unwrapped PEFT model): lorakit.training.loss for sft."""
    if cfg.objective == "sft":
        return build_loss(model, cfg.chunked_loss)
    return PreferenceLoss(model, cfg)


def pair_losses(cfg: TrainSection, chosen, rejected, ref_chosen=None, ref_rejected=None):
    """(loss, chosen reward, rejected reward) per pair, from the policy's (and the reference's) answer log-probs,
    summed (dpo) or averaged over the answer's tokens (ipo, orpo, simpo)."""
    if cfg.objective in ("dpo", "ipo"):
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        margin = chosen_ratio - rejected_ratio
        if cfg.objective == "dpo":  # Rafailov et al. 2023, eq. 7; label smoothing: Mitchell's conservative DPO
            z = cfg.beta * margin
            losses = -(1 - cfg.label_smoothing) * F.logsigmoid(z) - cfg.label_smoothing * F.logsigmoid(-z)
        else:  # Azar et al. 2023, eq. 17
            losses = (margin - 1 / (2 * cfg.beta)) ** 2
        return losses, cfg.beta * chosen_ratio.detach(), cfg.beta * rejected_ratio.detach()
    if cfg.objective == "simpo":  # Meng et al. 2024, eq. 6
        losses = -F.logsigmoid(cfg.beta * (chosen - rejected) - cfg.simpo_gamma)
        return losses, cfg.beta * chosen.detach(), cfg.beta * rejected.detach()
    # ORPO (Hong et al. 2024, eq. 6-7): NLL of the chosen answer (per token) - λ log σ(log odds ratio);
    # log(1 - p) as log(-expm1(log p)), exact where p is close to 1.
    log_odds = (chosen - rejected) - (torch.log(-torch.expm1(chosen)) - torch.log(-torch.expm1(rejected)))
    losses = -chosen - cfg.orpo_lambda * F.logsigmoid(log_odds)
    return losses, cfg.orpo_lambda * chosen.detach(), cfg.orpo_lambda * rejected.detach()


def sequence_index(batch: dict) -> tuple[torch.Tensor, int]:
    """The sequence each position belongs to, and how many sequences: one per padded row, or, in a flattened
    row, a new one wherever the position ids restart."""
    ids = batch["input_ids"]
    if "position_ids" in batch:
        starts = batch["position_ids"] == 0
        return starts.long().cumsum(-1) - 1, int(starts.sum())
    return torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids), ids.shape[0]


def answer_lengths(batch: dict) -> torch.Tensor:
    """Supervised targets per sequence (the answer's tokens; 0 for an idle sequence)."""
    index, count = sequence_index(batch)
    targets = shifted_targets(batch) != IGNORE_INDEX
    return torch.zeros(count, dtype=torch.long, device=index.device).index_add_(
        0, index.reshape(-1), targets.reshape(-1).long())


class PreferenceLoss:
    """The loss the loop calls for a preference objective: mean per-pair loss over the window's pairs.

    Same contract as lorakit.training.loss.Loss: ``fn(model, batch, num_items)`` returns the summed loss of the
    micro-batch's pairs / num_items, ``items`` counts pairs (``counts``: and supervised tokens), a ``tally``
    passed to the call (from ``new_tally()``) collects the rewards and log-probs."""

    def __init__(self, model, cfg: TrainSection):
        self.model, self.cfg = model, cfg  # model: unwrapped; the reference is it with the adapter off
        head = model.get_output_embeddings()
        why = "train.chunked_loss is false" if not cfg.chunked_loss else head_unusable(model)
        if not why and head.weight.requires_grad:
            why = "the output layer trains"
        self.kind, self.reason = ("plain", why) if why else ("chunked", "")
        self.head, self.decoder = head, _decoder(model)
        self.keep = fewest_logits(model, self.decoder) if self.kind == "chunked" else 1

    def new_tally(self) -> Tally:
        return Tally(METRICS)

    def describe(self) -> str:
        ref = f", reference {self.cfg.reference}" if self.cfg.objective in NEEDS_REFERENCE else ""
        return f"loss: {self.cfg.objective}{ref}, log-probs {self.kind}" + (f" ({self.reason})" if self.reason else "")

    def items(self, batch: dict) -> int:
        return self.counts(batch)[0]

    def counts(self, batch: dict) -> tuple[int, int]:
        """(pairs with both answers supervised, supervised tokens of every sequence) of ``batch``, in one pass."""
        lengths = answer_lengths(batch)
        pairs = lengths.shape[0] // 2
        return int(((lengths[:pairs] > 0) & (lengths[pairs:] > 0)).sum()), int(lengths.sum())

    def sequence_logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-prob of each sequence's supervised tokens, their count), fp32, from one forward."""
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels", "ref_logps")}
        targets = shifted_targets(batch).reshape(-1)
        keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        index, count = sequence_index(batch)
        index, targets = index.reshape(-1)[keep], targets[keep]
        if self.kind == "chunked":  # the head over supervised positions only, a chunk of logits at a time
            hidden, _ = forward_hidden(model, self.decoder, inputs, logits_to_keep=self.keep)
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
            logps = linear_token_logps(hidden, self.head.weight, self.head.bias, targets)
        else:
            logits = model(**inputs).logits
            logits = logits.reshape(-1, logits.shape[-1]).index_select(0, keep).float()
            logps = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
        sums = torch.zeros(count, dtype=torch.float32, device=logps.device).index_add(0, index, logps)
        counts = torch.zeros(count, dtype=torch.float32, device=logps.device).index_add_(
            0, index, torch.ones_like(logps))
        return sums, counts

    @torch.no_grad()
    def reference_logps(self, batch: dict, adapter_on: bool = False) -> torch.Tensor:
        """Summed log-probs of every sequence under the reference: precomputed, or the adapter switched off (or, to
        precompute train.reference init_from, on)."""
        if "ref_logps" in batch:
            return batch["ref_logps"].float()
        with nullcontext() if adapter_on else self.model.disable_adapter():
            return self.sequence_logps(self.model, batch)[0]

    def __call__(self, model, batch: dict, num_items: float, tally: Tally | None = None) -> torch.Tensor:
        """The micro-batch's summed pair losses / num_items; its rewards and log-probs added to ``tally`` if given."""
        # The reference first: its forward keeps nothing, so it never overlaps the policy's saved activations.
        reference = self.reference_logps(batch) if self.cfg.objective in NEEDS_REFERENCE else None
        sums, counts = self.sequence_logps(model, batch)
        pairs = sums.shape[0] // 2
        valid = (counts[:pairs] > 0) & (counts[pairs:] > 0)  # an idle pair (every label -100) adds nothing
        scale = counts.clamp(min=1) if NORMALISED[self.cfg.objective] else 1
        policy = sums / scale
        # Invalid pairs get a harmless stand-in (-1) so no inf reaches the graph; the where keeps them connected.
        stand_in = torch.full_like(policy, -1.0)
        policy = torch.where(torch.cat([valid, valid]), policy, stand_in)
        ref = [None, None]
        if reference is not None:
            reference = torch.where(torch.cat([valid, valid]), reference / scale, stand_in)
            ref = [reference[:pairs], reference[pairs:]]
        chosen, rejected = policy[:pairs], policy[pairs:]
        losses, chosen_rewards, rejected_rewards = pair_losses(self.cfg, chosen, rejected, *ref)
        if tally is not None:
            reported = (chosen_rewards, rejected_rewards, chosen_rewards - rejected_rewards,
                        (chosen_rewards > rejected_rewards).float(), chosen.detach(), rejected.detach())
            tally.add(torch.stack([t[valid].sum() for t in reported]), valid.sum())
        return torch.where(valid, losses, torch.zeros_like(losses)).sum() / num_items


# ----------------------------------------------------------------------------------------------------------
# train.reference: precomputed


@torch.no_grad()
def compute_reference(loss: PreferenceLoss, examples: list, tokenizer, micro_batch_size: int,
                      adapter_on: bool = False, padding_free: bool = False) -> list:
    """Each pair's reference log-probs (chosen, rejected) in one pass, micro_batch_size pairs at a time, in eval
    mode (no dropout), with the adapter switched off (``adapter_on``: as it is, for train.reference init_from);
    ``padding_free``: flattened, as the training batches are, so a policy at its reference matches it bit for bit."""
    from lorakit.data.batching import collate

    model = loss.model
    device = model.get_input_embeddings().weight.device
    out = []
    with eval_mode(model):
        for start in range(0, len(examples), micro_batch_size):
            # without stored log-probs, so the reference is computed, not read back
            chunk = [dataclasses.replace(e, ref_logps=None) for e in examples[start : start + micro_batch_size]]
            batch = {k: v.to(device) for k, v in collate(chunk, tokenizer, padding_free).items()}
            logps = loss.reference_logps(batch, adapter_on).tolist()
            out += list(zip(logps[: len(chunk)], logps[len(chunk):]))
    return out


def reference_key(recipe) -> str:
    """What the reference log-probs depend on besides the data: the base model (its files' names, sizes and
    times, where it is a local directory), how it is loaded, and for init_from the adapter's weights."""
    def files(name: str | None) -> list:
        path = Path(name or "").expanduser()
        return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file()) \
            if name and path.is_dir() else []

    adapter = recipe.adapter.init_from if recipe.train.reference == "init_from" else None
    material = {"model": recipe.model.model_dump(mode="json"), "files": files(recipe.model.name_or_path),
                "adapter": files(adapter), "chunked": recipe.train.chunked_loss,
                "padding_free": recipe.data.padding_free}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]


def attach_reference(recipe, loss: PreferenceLoss, data, tokenizer, say, device=None,
                     padding_free: bool = False) -> None:
    """train.reference precomputed or init_from: every train and eval pair gets its reference log-probs, read from
    the data cache when this model's are stored there, else computed (and stored) on ``device``, where
    accelerator.prepare puts the model next anyway."""
    from lorakit.data import cache

    key = reference_key(recipe)
    splits = {"train": data.train, "eval": data.eval}
    stored = cache.load_reference(data.cache_key, key) if data.cache_key else None
    if stored is None or any(len(stored.get(name, [])) != len(ex) for name, ex in splits.items()):
        if device is not None:
            loss.model.to(device)
        adapter_on = recipe.train.reference == "init_from"
        stored = {name: compute_reference(loss, ex, tokenizer, recipe.train.micro_batch_size, adapter_on, padding_free)
                  for name, ex in splits.items()}
        if data.cache_key:
            cache.save_reference(data.cache_key, key, stored)
        say(f"reference log-probs: computed for {len(data.train)} train and {len(data.eval)} eval pairs")
    else:
        say("reference log-probs: from the data cache")
    train = np.asarray(stored["train"], dtype=np.float64).reshape(-1, 2)
    data.reference = [round(float(v), 6) for v in train.mean(0)] if len(train) else None
    for name, examples in splits.items():
        if hasattr(examples, "ref_logps"):  # a token store builds its examples on access: it holds the values
            examples.ref_logps = np.asarray(stored[name], dtype=np.float32).reshape(-1, 2)
            continue
        for example, logps in zip(examples, stored[name]):
            example.ref_logps = tuple(logps)
