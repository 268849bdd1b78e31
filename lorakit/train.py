"""`lorakit train`: setup (data, model, optimizer, schedule), then one loop for every method and world size.

Reading order: run_training (setup) → fit (the loop) → the small helpers below it.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit import __version__
from lorakit.console import console, progress_bar
from lorakit.data import IGNORE_INDEX, Datasets, StepSampler, collate, load_datasets
from lorakit.errors import NonFiniteLossError, SafetyError, UsageError
from lorakit.model import build_model, load_tokenizer, resolve_model_path, trainable_summary
from lorakit.recipe import Recipe, TrainSection, dump_recipe


@dataclass
class RunPaths:
    root: Path

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"


def check_output_dir(root: Path) -> None:
    """Never write into a directory that already holds something: a user's run is not overwritten."""
    if root.exists() and not root.is_dir():
        raise SafetyError(f"output.dir: {str(root)!r} is a file; choose a directory with --output-dir")
    if root.is_dir() and any(root.iterdir()):
        raise SafetyError(
            f"output.dir: {str(root)!r} is not empty (it holds an earlier run); choose another with --output-dir "
            "or remove it"
        )


def run_training(recipe: Recipe, *, allow_pickle: bool = False) -> Path:
    """Train as the recipe says; returns the run directory."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    paths = RunPaths(Path(recipe.output.dir))
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.is_main_process:
        check_output_dir(paths.root)
    set_seed(recipe.train.seed)
    say = console(accelerator.is_main_process)

    # Data first: a data problem (exit 3) must show before minutes of model loading.
    model_path = resolve_model_path(recipe.model)
    tokenizer = load_tokenizer(recipe.model, model_path)
    data = load_datasets(recipe.data, tokenizer, recipe.train.seed)
    say(f"train data: {data.train_stats.summary()}")
    if data.eval_stats:
        say(f"eval data: {data.eval_stats.summary()}")

    model = build_model(recipe, model_path, allow_pickle)
    say(trainable_summary(model))

    sampler = StepSampler(
        num_examples=len(data.train),
        micro_batch_size=recipe.train.micro_batch_size,
        grad_accum=recipe.train.grad_accum,
        seed=recipe.train.seed,
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
    )
    total_steps = recipe.train.max_steps or recipe.train.epochs * sampler.steps_per_epoch
    optimizer = build_optimizer(model, recipe.train)
    scheduler = build_scheduler(optimizer, recipe.train, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    if accelerator.is_main_process:
        paths.root.mkdir(parents=True, exist_ok=True)
        paths.recipe.write_text(dump_recipe(recipe))
    accelerator.wait_for_everyone()

    fit(recipe, accelerator, model, tokenizer, optimizer, scheduler, data, sampler, total_steps, paths)

    if accelerator.is_main_process:
        save_adapter(accelerator.unwrap_model(model), tokenizer, recipe, paths.adapter, model_path)
        say(f"adapter saved to {paths.adapter}")
    accelerator.wait_for_everyone()
    return paths.root


def fit(recipe, accelerator, model, tokenizer, optimizer, scheduler, data: Datasets, sampler, total_steps, paths):
    """The loop, in nanoGPT's order: eval/checkpoint → accumulate micro-steps → clip → step → log → stop."""
    cfg = recipe.train
    metrics = MetricsLog(paths.metrics, accelerator.is_main_process)
    trainable = [p for p in model.parameters() if p.requires_grad]
    tokens_seen, t_last, tokens_last = 0, time.perf_counter(), 0
    model.train()
    with progress_bar(accelerator.is_main_process, total_steps) as bar:
        for step in range(total_steps):
            if cfg.eval_every and step and step % cfg.eval_every == 0 and data.eval:
                metrics.write({"step": step, "eval_loss": evaluate(model, tokenizer, data.eval, cfg, accelerator)})
            if cfg.save_every and step and step % cfg.save_every == 0:
                save_checkpoint(accelerator, model, tokenizer, recipe, paths, step)

            batches = [collate([data.train[i] for i in idx], tokenizer) for idx in sampler.micro_batches(step)]
            # Normalise by the supervised tokens of the whole window on all ranks, so every token weighs the
            # same whatever the micro-batch, accumulation or world size. DDP averages gradients over ranks,
            # hence the world-size factor inside num_items.
            window_tokens = reduce_sum(accelerator, sum(supervised_targets(b) for b in batches))
            num_items = window_tokens / accelerator.num_processes
            step_loss = torch.zeros((), device=accelerator.device)
            for i, batch in enumerate(batches):
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                sync = i == len(batches) - 1  # gradients are all-reduced on the last micro-step only
                with nullcontext() if sync else accelerator.no_sync(model):
                    loss = model(**batch, num_items_in_batch=num_items).loss
                    accelerator.backward(loss)
                step_loss += loss.detach()
            step_loss = accelerator.reduce(step_loss, reduction="mean").item() * accelerator.num_processes

            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = float(accelerator.clip_grad_norm_(trainable, max_norm))
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                raise NonFiniteLossError(
                    f"step {step + 1}: loss {step_loss} / grad norm {grad_norm} is not finite; nothing was saved from "
                    "this step. Likely causes: learning rate too high (train.learning_rate), float16 overflow "
                    "(use bfloat16 or float32), or corrupt data rows"
                )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            tokens_seen += int(window_tokens)
            if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps:
                now = time.perf_counter()
                tps = (tokens_seen - tokens_last) / max(now - t_last, 1e-9)
                t_last, tokens_last = now, tokens_seen
                metrics.write(
                    {
                        "step": step + 1,
                        "epoch": sampler.epoch_of(step),
                        "loss": round(step_loss, 6),
                        "lr": lr,
                        "grad_norm": round(grad_norm, 6),
                        "tokens": tokens_seen,
                        "tokens_per_s": round(tps, 2),
                    }
                )
            bar.update(step + 1, loss=step_loss, lr=lr, tps=tokens_seen / max(bar.elapsed, 1e-9))

    if data.eval:
        metrics.write({"step": total_steps, "eval_loss": evaluate(model, tokenizer, data.eval, cfg, accelerator)})


# ----------------------------------------------------------------------------------------------------------
# Builders


def build_optimizer(model, cfg: TrainSection) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                  weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    raise UsageError(f"train.optimizer: {cfg.optimizer!r} is not supported yet; use adamw")


def build_scheduler(optimizer, cfg: TrainSection, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps if cfg.warmup_ratio is None else math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


# ----------------------------------------------------------------------------------------------------------
# Loop helpers


def supervised_targets(batch) -> int:
    """Tokens the loss is computed on: labels are shifted by one inside the model's loss."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def reduce_sum(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return float(value)
    t = torch.tensor(float(value), device=accelerator.device, dtype=torch.float64)
    return float(accelerator.reduce(t, reduction="sum"))


@torch.no_grad()
def evaluate(model, tokenizer, examples, cfg: TrainSection, accelerator) -> float:
    """Token-weighted mean loss over the eval set, each rank taking every world_size-th example."""
    model.eval()
    mine = examples[accelerator.process_index :: accelerator.num_processes]
    total, count = 0.0, 0
    for i in range(0, len(mine), cfg.micro_batch_size):
        batch = collate(mine[i : i + cfg.micro_batch_size], tokenizer)
        n = supervised_targets(batch)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        total += float(model(**batch, num_items_in_batch=1).loss)  # num_items=1: the summed loss
        count += n
    model.train()
    return round(reduce_sum(accelerator, total) / max(reduce_sum(accelerator, count), 1), 6)


class MetricsLog:
    """metrics.jsonl (rank 0 only): one JSON object per log step or evaluation."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
        console(True)(shown)


# ----------------------------------------------------------------------------------------------------------
# Saving


def save_adapter(model, tokenizer, recipe: Recipe, out: Path, model_path: str) -> None:
    """DIR/adapter: PEFT's own files (PeftModel.from_pretrained loads them), the tokenizer, and lorakit.json."""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta = {
        "base_model": recipe.model.name_or_path,
        "base_model_path": str(Path(model_path).resolve()) if Path(model_path).exists() else model_path,
        "revision": recipe.model.revision,
        "quantization": recipe.model.quantization,
        "double_quant": recipe.model.double_quant,
        "dtype": recipe.model.dtype,
        "method": recipe.adapter.method,
        "lorakit_version": __version__,
    }
    (out / "lorakit.json").write_text(json.dumps(meta, indent=2) + "\n")


def save_checkpoint(accelerator, model, tokenizer, recipe: Recipe, paths: RunPaths, step: int) -> None:
    from lorakit.checkpoint import write_checkpoint

    if accelerator.is_main_process:
        write_checkpoint(paths.checkpoints, step, accelerator.unwrap_model(model), recipe)
    accelerator.wait_for_everyone()
