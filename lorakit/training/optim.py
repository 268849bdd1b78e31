"""The optimizer and the learning-rate schedule, built from the train section (LoRA+'s groups from the adapter's).

LoRA+ (adapter.loraplus_lr_ratio): PEFT's create_loraplus_optimizer groups the trainable tensors into A
(train.learning_rate), B and 1-d tensors (× the ratio; biases and DoRA magnitudes without weight decay) and LoRA
layers on embeddings (adapter.loraplus_lr_embedding). The groups are the optimizer's own, so the schedule
scales each and a checkpoint saves and restores each.
"""

from __future__ import annotations

import math

import torch

from lorakit.config.schema import AdapterSection, TrainSection


# torch's AdamW takes one fused kernel over every tensor on these devices (transformers' Trainer default since torch
# 2.8). Without it a CPU runs AdamW tensor by tensor: 12 ms a step for the bench's 56 LoRA tensors against 0.8 ms.
# The update is the same to float rounding (1 ulp apart after 50 steps, fp32).
FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(model, cfg: TrainSection, adapter: AdapterSection | None = None) -> torch.optim.Optimizer:
    """train.optimizer over the trainable tensors: one group, or LoRA+'s groups (adapter.loraplus_lr_ratio);
    torch's AdamW fused where it can be (FUSED_DEVICES)."""
    kwargs = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    cls = optimizer_class(cfg)
    if cls is torch.optim.AdamW and all(p.device.type in FUSED_DEVICES for p in model.parameters() if p.requires_grad):
        kwargs["fused"] = True
    if adapter is not None and adapter.loraplus_lr_ratio is not None:
        return build_loraplus_optimizer(model, cls, cfg, adapter, **kwargs)
    return cls([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate, **kwargs)


def optimizer_class(cfg: TrainSection) -> type[torch.optim.Optimizer]:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW
    import bitsandbytes as bnb

    # 8-bit Adam states (blockwise quantized; tensors under 4096 elements keep 32-bit states, as bitsandbytes
    # decides). Paging moves those states between GPU and host memory under pressure: on CPU there is nothing
    # to page, so the same 8-bit optimizer runs unpaged, and the run says so once (paging_warning).
    if cfg.optimizer == "paged_adamw_8bit" and torch.cuda.is_available():
        return bnb.optim.PagedAdamW8bit
    return bnb.optim.AdamW8bit


def paging_warning(cfg: TrainSection) -> str | None:
    """A warning when train.optimizer asks for paging where there is no GPU to page from (optimizer_class)."""
    if cfg.optimizer != "paged_adamw_8bit" or torch.cuda.is_available():
        return None
    return ("train.optimizer: paged_adamw_8bit pages optimizer state out of GPU memory; without a GPU there is "
            "nothing to page, so adamw_8bit (the same 8-bit AdamW, unpaged) is used")


def build_loraplus_optimizer(model, optimizer_cls, cfg, adapter, **kwargs):
    """``optimizer_cls`` (torch's AdamW or a bitsandbytes 8-bit AdamW) over PEFT's LoRA+ groups.

    train.weight_decay goes to PEFT as loraplus_weight_decay: PEFT would otherwise set 0 on every group.
    """
    from peft.optimizers import create_loraplus_optimizer

    if adapter.loraplus_lr_embedding is not None:
        kwargs["loraplus_lr_embedding"] = adapter.loraplus_lr_embedding
    optimizer = create_loraplus_optimizer(
        model, optimizer_cls, lr=cfg.learning_rate, loraplus_lr_ratio=adapter.loraplus_lr_ratio,
        loraplus_weight_decay=cfg.weight_decay, **kwargs,
    )
    # PEFT keeps all four groups, empty ones too (no LoRA on an embedding, no bias); torch.distributed.checkpoint,
    # which saves the optimizer state by parameter name (checkpoint.py), cannot restore more than one empty
    # group. An empty group has no state and no effect: drop them before the first step.
    optimizer.param_groups = [g for g in optimizer.param_groups if g["params"]]
    return optimizer


def describe_groups(optimizer) -> str:
    """``N groups: lr …`` of an optimizer, each group's tensor count and learning rate (the effective-settings
    block shows LoRA+ taking effect this way)."""
    groups = getattr(optimizer, "optimizer", optimizer).param_groups
    parts = [f"{len(g['params'])} tensors at lr {g.get('initial_lr', g['lr']):.3g}" for g in groups if g["params"]]
    return f"{len(parts)} group{'s' if len(parts) != 1 else ''}: " + "; ".join(parts)


def warmup_warning(cfg: TrainSection, total_steps: int) -> str | None:
    """A warning when train.warmup_steps is as long as the run: the rate would never reach train.learning_rate."""
    if cfg.warmup_ratio is not None or not cfg.warmup_steps or cfg.warmup_steps < total_steps:
        return None  # a ratio (< 1, the schema says) means what it says
    # the first step runs at LR 0 and each later one adds learning_rate / warmup: the last step's is the peak
    return (f"train.warmup_steps {cfg.warmup_steps} is not below the run's {total_steps} steps: the learning rate "
            f"never reaches train.learning_rate {cfg.learning_rate:g} (it peaks at "
            f"{cfg.learning_rate * (total_steps - 1) / cfg.warmup_steps:.3g}); lower train.warmup_steps or set "
            "train.warmup_ratio")


def build_scheduler(optimizer, cfg: TrainSection, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps if cfg.warmup_ratio is None else math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
