"""The training loop, in nanoGPT's order: checkpoint/eval → accumulate micro-steps → clip → step → log → stop.

One loop for every method, precision and world size; it takes one FitContext built by lorakit.training.run.
"""

from __future__ import annotations

import functools
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from lorakit.adapters.inits import InitRecord
from lorakit.checkpoint.format import capture_rng, checkpoint_name
from lorakit.checkpoint.write import trainer_state, write_checkpoint
from lorakit.config.load import dump_recipe
from lorakit.config.schema import Recipe, TrainSection
from lorakit.console import progress_bar
from lorakit.data.batching import collate
from lorakit.data.shards import eval_shards, idle_batch
from lorakit.distributed.fsdp import gather_adapter, optimizer_state
from lorakit.errors import CheckpointError, LorakitError, NonFiniteLossError
from lorakit.faults import fault_injector
from lorakit.training.context import FitContext, RunPaths
from lorakit.training.interrupt import GracefulStop
from lorakit.training.metrics import MetricsLog
from lorakit.training.prefetch import Prefetch
from lorakit.training.scoring import TrainingScorer


def step_batches(ctx: FitContext, step: int):
    """This rank's micro-batches of ``step``: their example indices and collated tensors."""
    micro_batches = ctx.sampler.micro_batches(step)
    train, tokenizer, padding_free = ctx.data.train, ctx.tokenizer, ctx.padding_free
    batches = [collate([train[i] for i in idx], tokenizer, padding_free) for idx in micro_batches]
    # A rank left without data by the last, partial step of an epoch still runs one forward/backward that adds
    # nothing, so the gradient all-reduce of the other ranks does not wait for it.
    return micro_batches, batches or [collate([idle_batch(train[0])], tokenizer, padding_free)]


def fit(ctx: FitContext) -> MetricsLog:
    """The loop, in nanoGPT's order: checkpoint/eval → accumulate micro-steps → clip → step → log → stop.
    Returns the metrics log, still open for the end-of-run records (written once the adapter is saved)."""
    recipe, accelerator, model, tokenizer = ctx.recipe, ctx.accelerator, ctx.model, ctx.tokenizer
    optimizer, scheduler, data, sampler, paths = ctx.optimizer, ctx.scheduler, ctx.data, ctx.sampler, ctx.paths
    total_steps, start, meter = ctx.total_steps, ctx.start, ctx.meter
    cfg = recipe.train
    metrics = MetricsLog(paths.metrics, accelerator.is_main_process, ctx.mirror)
    trainable = [p for p in model.parameters() if p.requires_grad]
    tokens_seen, t_last, tokens_last = start.tokens_seen, time.perf_counter(), start.tokens_seen
    last_checkpoint = start.checkpoint
    compute_loss = ctx.loss
    tally = compute_loss.new_tally()  # what the loss reports beside its value (the preference rewards)
    fault = fault_injector(accelerator.process_index)  # test-only; a no-op unless LORAKIT_TEST_FAULT is set
    scorer = TrainingScorer(recipe, tokenizer) if cfg.eval_generate and accelerator.is_main_process else None
    model.train()
    with progress_bar(accelerator.is_main_process, total_steps) as bar, GracefulStop(ctx.resume_command) as stop, \
            Prefetch(functools.partial(step_batches, ctx), total_steps) as ahead:
        for step in range(start.step, total_steps):
            # Checkpoint before evaluating: a run resumed from here repeats the evaluation, not logs it twice.
            if step > start.step and checkpoint_due(cfg, sampler, step):
                last_checkpoint = save_checkpoint(accelerator, model, optimizer, scheduler, recipe, paths, sampler,
                                                  step, tokens_seen, data.identity(), ctx.init)
            if cfg.eval_every and step and step % cfg.eval_every == 0 and data.eval:
                evaluated = evaluate(model, tokenizer, data.eval, cfg, accelerator, compute_loss, ctx.padding_free)
                metrics.write({"step": step, **evaluated, **eval_scores(scorer, accelerator, model)})

            fault(step)
            meter.start()
            micro_batches, batches = ahead.get(step)  # collated while the previous step computed
            # Normalise by the items of the whole window on all ranks (supervised tokens; pairs for a preference
            # objective), so each weighs the same whatever the micro-batch, accumulation or world size. DDP
            # averages gradients over ranks, hence the world-size factor inside num_items.
            counts = [compute_loss.counts(b) for b in batches]  # (items, supervised tokens): one count of each
            window_items, window_tokens = reduce_sum(accelerator, [sum(c) for c in zip(*counts)])
            num_items = window_items / accelerator.num_processes
            tally.clear()  # the rewards logged are the logged step's, as its loss is
            step_loss = torch.zeros((), device=accelerator.device)
            for i, batch in enumerate(batches):
                # Dropout masks follow (seed, step, global micro-batch index), not the rank: 2 ranks × k
                # micro-batches draw what 1 rank × 2k draws, and a resumed run what the uninterrupted one drew.
                torch.manual_seed(micro_seed(cfg.seed, step, accelerator.process_index + i * accelerator.num_processes))
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                sync = i == len(batches) - 1  # gradients are all-reduced on the last micro-step only
                with nullcontext() if sync else accelerator.no_sync(model):
                    loss = compute_loss(model, batch, num_items, tally)
                    accelerator.backward(loss)
                step_loss += loss.detach()
            # Each rank's share is already divided by the window's tokens / world size: the mean over ranks
            # is the loss per supervised token of the whole window.
            step_loss = accelerator.reduce(step_loss, reduction="mean").item()

            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = float(accelerator.clip_grad_norm_(trainable, max_norm))
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                raise NonFiniteLossError.at_step(step + 1, step_loss, grad_norm, last_checkpoint)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            meter.stop([data.train[i] for idx in micro_batches for i in idx])

            tokens_seen += int(window_tokens)
            if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps:
                now = time.perf_counter()
                tps = (tokens_seen - tokens_last) / max(now - t_last, 1e-9)
                t_last, tokens_last = now, tokens_seen
                metrics.write(
                    {
                        "step": step + 1,
                        "epoch": sampler.epochs_done(step + 1),
                        "loss": round(step_loss, 6),
                        "lr": lr,
                        "grad_norm": round(grad_norm, 6),
                        "tokens": tokens_seen,
                        "tokens_per_s": round(tps, 2),
                        **tally.means(accelerator),
                    }
                )
            bar.update(step + 1, loss=step_loss, lr=lr, tps=tokens_seen / max(bar.elapsed, 1e-9))
            if any_rank(accelerator, stop.signum is not None) and step + 1 < total_steps:
                path = save_checkpoint(accelerator, model, optimizer, scheduler, recipe, paths, sampler, step + 1,
                                       tokens_seen, data.identity(), ctx.init)
                raise stop.stopped(step + 1, path)

    if data.eval:
        evaluated = evaluate(model, tokenizer, data.eval, cfg, accelerator, compute_loss, ctx.padding_free)
        metrics.write({"step": total_steps, **evaluated, **eval_scores(scorer, accelerator, model)})
    return metrics


def micro_seed(seed: int, step: int, index: int) -> int:
    return (seed * 1_000_003 + step) * 1_009 + index


def reduce_sum(accelerator, value):
    """The sum over ranks of a number, or of each number of a list (one collective)."""
    values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]
    if accelerator.num_processes > 1:
        t = torch.tensor(values, device=accelerator.device, dtype=torch.float64)
        values = accelerator.reduce(t, reduction="sum").tolist()
    return values if isinstance(value, (list, tuple)) else values[0]


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any: a signal or a failed save may reach one rank only."""
    return flag if accelerator.num_processes == 1 else reduce_sum(accelerator, float(flag)) > 0


def checkpoint_due(cfg: TrainSection, sampler, step: int) -> bool:
    every = bool(cfg.save_every) and step % cfg.save_every == 0
    return every or (cfg.save_each_epoch and step % sampler.steps_per_epoch == 0)


def eval_scores(scorer: TrainingScorer | None, accelerator, model) -> dict:
    """train.eval_generate's {"eval_score": ...} (main process only; {} elsewhere or when off)."""
    return scorer(accelerator.unwrap_model(model)) if scorer is not None else {}


@torch.no_grad()
def evaluate(model, tokenizer, examples, cfg: TrainSection, accelerator, compute_loss,
             padding_free: bool = False) -> dict:
    """{"eval_loss": the mean loss per item (supervised token, or pair) over the eval set, and the loss's tallied
    metrics as eval_*}, each rank taking every world_size-th example. ``padding_free``: batches flattened as in
    training (the run's choose_batching), so evaluation spends nothing on padding either.

    Every rank runs the same number of batches (idle ones where it has run out), as FSDP's forward is a
    collective. Padded batches take the examples in order of length: the loss is a sum, so the order changes
    nothing but how much of each batch is padding.
    """
    model.eval()
    shards = eval_shards(len(examples), cfg.micro_batch_size, accelerator.num_processes, accelerator.process_index)
    order = range(len(examples)) if padding_free else sorted(range(len(examples)), key=lambda i: len(examples[i]))
    total, count = 0.0, 0
    tally = compute_loss.new_tally()  # its own: a training window's rewards are not mixed with the eval set's
    for idx in shards:
        batch = collate([examples[order[i]] for i in idx] or [idle_batch(examples[0])], tokenizer, padding_free)
        n = compute_loss.items(batch)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        total += float(compute_loss(model, batch, 1, tally))  # num_items=1: the summed loss
        count += n
    model.train()
    total, count = reduce_sum(accelerator, [total, count])
    return {"eval_loss": round(total / max(count, 1), 6), **tally.means(accelerator, "eval_")}


def save_checkpoint(accelerator, model, optimizer, scheduler, recipe: Recipe, paths: RunPaths, sampler, step: int,
                    tokens_seen: int, data_identity: dict | None = None, init: InitRecord | None = None) -> Path:
    """Every rank hands over its RNG state (and under FSDP its shards of the adapter and optimizer state), rank 0
    writes (see checkpoint.py); a failure stops every rank. ``init``: a weight-rewriting init's record (its
    checkpoints carry the converted adapter too)."""
    from accelerate.utils import gather_object

    rng_states = [capture_rng()]
    if accelerator.num_processes > 1:
        rng_states = gather_object(rng_states)
    adapter_state = gather_adapter(model)  # collectives under FSDP (None / the optimizer's own state otherwise)
    optim_state = optimizer_state(model, optimizer)
    failure = None
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        try:
            write_checkpoint(
                paths.checkpoints, step, model=unwrapped, optimizer=optimizer, scheduler=scheduler,
                scaler=accelerator.scaler, rng_states=rng_states,
                state=trainer_state(step, tokens_seen, sampler, unwrapped, paths.metrics, adapter_state,
                                    data_identity),
                recipe_text=dump_recipe(recipe), keep_last=recipe.train.keep_last,
                adapter_state=adapter_state, optimizer_state=optim_state, init=init,
            )
        except LorakitError as e:
            failure = e
    if any_rank(accelerator, failure is not None):
        raise failure or CheckpointError(f"rank 0 could not write checkpoint {checkpoint_name(step)}; see its error")
    return paths.checkpoints / checkpoint_name(step)
