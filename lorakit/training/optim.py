"""The optimizer and the learning-rate schedule, built from the train section."""

from __future__ import annotations

import math

import torch

from lorakit.config.schema import NO_WARMUP_SCHEDULERS, TrainSection


def build_optimizer(model, cfg: TrainSection) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                  weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    # 8-bit Adam states (blockwise quantized; tensors under 4096 elements keep 32-bit states, as bitsandbytes
    # decides). Paging moves those states between GPU and host memory under pressure: on CPU there is nothing
    # to page, so the same 8-bit optimizer runs unpaged, and the run says so once.
    if cfg.optimizer == "paged_adamw_8bit" and torch.cuda.is_available():
        return bnb.optim.PagedAdamW8bit(params, **kwargs)
    if cfg.optimizer == "paged_adamw_8bit":
        import warnings

        warnings.warn("train.optimizer: paged_adamw_8bit pages optimizer state out of GPU memory; without a GPU "
                      "there is nothing to page, so adamw_8bit (the same 8-bit AdamW, unpaged) is used")
    return bnb.optim.AdamW8bit(params, **kwargs)


def build_scheduler(optimizer, cfg: TrainSection, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps if cfg.warmup_ratio is None else math.ceil(cfg.warmup_ratio * total_steps)
    if warmup and cfg.lr_scheduler in NO_WARMUP_SCHEDULERS:
        import warnings

        key = "train.warmup_steps" if cfg.warmup_ratio is None else "train.warmup_ratio"
        warnings.warn(f"{key}: the {cfg.lr_scheduler} schedule has no warmup, so it is ignored; use "
                      "constant_with_warmup (or another schedule) to warm up")
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
