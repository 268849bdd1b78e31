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
from lorakit.adapters.build import build_model
from lorakit.checkpoint.format import TrainState, capture_rng, checkpoint_name
from lorakit.checkpoint.read import select_checkpoint, set_aside_newer
from lorakit.checkpoint.resume import check_resume, restore_adapter, restore_training_state, truncate_metrics
from lorakit.checkpoint.write import check_finite, check_free_space, checkpoint_bytes, trainer_state, write_checkpoint
from lorakit.config.load import dump_recipe
from lorakit.config.schema import Recipe, TrainSection
from lorakit.console import adopt_transformers_output, console, progress_bar, saved, stage
from lorakit.data import IGNORE_INDEX, Datasets, StepSampler, collate, load_datasets
from lorakit.data.shards import eval_shards, idle_batch
from lorakit.distributed.fsdp import (
    build_accelerator, check_launch, gather_adapter, optimizer_state, prepare_fsdp,
    save_adapter_weights,
)
from lorakit.errors import CheckpointError, LorakitError, NonFiniteLossError, SafetyError, UsageError
from lorakit.faults import fault_injector
from lorakit.models.loading import trainable_summary
from lorakit.models.loading import load_tokenizer, resolve_dtype, resolve_model_path
from lorakit.training.interrupt import GracefulStop, outside_steps
from lorakit.training.loss import build_loss
from lorakit.training.manifest import write_run_manifest
from lorakit.training.metrics import MetricsLog
from lorakit.training.perf import ModelShape, StepMeter, apply_speed_knobs, choose_batching, describe
from lorakit.training.plot import maybe_plot


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


def check_output_dir(root: Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """A directory holding something is written into only to continue its run (--resume) or, when it holds a
    lorakit run, to replace it (--overwrite moves the old run aside at the first write; nothing is deleted)."""
    if root.exists() and not root.is_dir():
        raise SafetyError(f"output.dir: {str(root)!r} is a file; choose a directory with --output-dir")
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other: --resume continues the run, --overwrite replaces it")
    if resume or not (root.is_dir() and any(root.iterdir())):
        return
    if not overwrite:
        raise SafetyError(
            f"output.dir: {str(root)!r} is not empty (it holds an earlier run); continue it with --resume, replace "
            "it with --overwrite (the old run is moved aside, not deleted), or choose another --output-dir"
        )
    if not ((root / "recipe.yaml").is_file() or (root / "checkpoints").is_dir()):
        raise SafetyError(
            f"output.dir: {str(root)!r} holds files that are not a lorakit run; --overwrite only replaces runs; "
            "choose another --output-dir"
        )


def set_aside(root: Path) -> Path:
    """--overwrite: the old run becomes DIR.replaced-YYYYmmdd-HHMMSS, next to it."""
    aside = root.with_name(f"{root.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        aside, n = root.with_name(f"{root.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
    root.rename(aside)
    return aside


def run_training(
    recipe: Recipe,
    *,
    allow_pickle: bool = False,
    resume: bool = False,
    resume_from: Path | None = None,
    allow_recipe_change: bool = False,
    overwrite: bool = False,
    resume_command: str = "lorakit train RECIPE --resume",
) -> Path:
    """Train as the recipe says (or continue from a checkpoint with ``resume``); returns the run directory."""
    from accelerate.utils import DistributedType, set_seed

    started = time.time()
    adopt_transformers_output()
    paths = RunPaths(Path(recipe.output.dir))
    check_launch(recipe)  # from the launcher's environment, before the Accelerator exists
    accelerator = build_accelerator(recipe.train)
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if accelerator.is_main_process:
        check_output_dir(paths.root, resume=resume, overwrite=overwrite)
    set_seed(recipe.train.seed)
    say = console(accelerator.is_main_process)
    # A bad checkpoint or a changed recipe is exit 4 before anything heavy loads.
    checkpoint, changed = None, False
    if resume:
        checkpoint = select_checkpoint(paths.checkpoints, resume_from, say)
        changed = check_resume(checkpoint, recipe, accelerator.num_processes, allow_recipe_change, say, fsdp=fsdp)

    # Data first: a data problem (exit 3) must show before minutes of model loading.
    with stage(accelerator.is_main_process, "loading tokenizer"), accelerator.main_process_first():
        model_path = resolve_model_path(recipe.model)  # rank 0 converts a .gguf once; the others reuse it
        tokenizer = load_tokenizer(recipe.model, model_path)
    with stage(accelerator.is_main_process, "tokenizing data"):
        data = load_datasets(recipe.data, tokenizer, recipe.train.seed)
    say(f"train data: {data.train_stats.summary()}")
    if data.eval_stats:
        say(f"eval data: {data.eval_stats.summary()}")

    with stage(accelerator.is_main_process, "loading model"):
        model = build_model(recipe, model_path, allow_pickle)
        batching = choose_batching(recipe, model, data.train, data.group_lengths)
        meter = StepMeter(ModelShape.of(model))
        apply_speed_knobs(model, recipe.train.compile, recipe.train.liger)
    say(trainable_summary(model))
    if batching.note:
        say(f"batches: {batching.note}")

    sampler = StepSampler(
        num_examples=len(data.train),
        micro_batch_size=recipe.train.micro_batch_size,
        grad_accum=recipe.train.grad_accum,
        seed=recipe.train.seed,
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
        lengths=batching.lengths,
    )
    total_steps = recipe.train.max_steps or recipe.train.epochs * sampler.steps_per_epoch
    if checkpoint is not None:  # the weights before wrapping: FSDP shards what was restored
        restore_adapter(checkpoint, model=model, sampler=sampler, changed=changed, say=say)
    checkpoint_size = checkpoint_bytes(model)  # whole parameters, before FSDP flattens and shards them
    optimizer = build_optimizer(model, recipe.train)
    scheduler = build_scheduler(optimizer, recipe.train, total_steps)
    prepare_fsdp(accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)

    # Nothing is written into the run directory before this point: every refusal leaves it as it was.
    # From here a Ctrl-C outside the loop says what continues the run (inside it, GracefulStop decides).
    with outside_steps(paths.checkpoints, resume_command):
        start = TrainState()
        if checkpoint is not None:
            start = resume_state(checkpoint, changed, accelerator, model, optimizer, scheduler, paths, say)
        if accelerator.is_main_process:
            if overwrite and paths.root.is_dir() and any(paths.root.iterdir()):
                say(f"--overwrite: the earlier run in {paths.root} was moved to {set_aside(paths.root)}")
            paths.root.mkdir(parents=True, exist_ok=True)
            paths.recipe.write_text(dump_recipe(recipe))
            check_free_space(paths.root, checkpoint_size, recipe.train.keep_last)
        accelerator.wait_for_everyone()

        fit(recipe, accelerator, model, tokenizer, optimizer, scheduler, data, sampler, total_steps, paths,
            start, resume_command, padding_free=batching.padding_free, meter=meter)
        state_dict = gather_adapter(model)  # a collective under FSDP: every rank takes part

        if accelerator.is_main_process:
            check_finite(accelerator.unwrap_model(model), optimizer, total_steps, state_dict)
            save_adapter(accelerator.unwrap_model(model), tokenizer, recipe, paths.adapter, model_path, state_dict)
            report = saved(True)
            report("adapter", paths.adapter)
            manifest = write_run_manifest(paths.root, recipe, started=started, world_size=accelerator.num_processes)
            report("run manifest", manifest)
            if (png := maybe_plot(paths.root, warn=say)) is not None:
                report("loss plot", png)
            if recipe.output.save in ("merged", "both"):
                from lorakit.merge.merge import merge_adapter

                # The same streaming merge as `lorakit merge DIR/adapter`; the adapter stays (the merge's input).
                with stage(True, "merging"):
                    merge_adapter(paths.adapter, paths.merged, log=say, allow_pickle=allow_pickle)
                report("merged model", paths.merged)
        accelerator.wait_for_everyone()
    return paths.root


def fit(
    recipe, accelerator, model, tokenizer, optimizer, scheduler, data: Datasets, sampler, total_steps, paths,
    start: TrainState | None = None, resume_command: str = "lorakit train RECIPE --resume",
    padding_free: bool = False, meter: StepMeter | None = None,
):
    """The loop, in nanoGPT's order: checkpoint/eval → accumulate micro-steps → clip → step → log → stop."""
    cfg = recipe.train
    start = start or TrainState()
    metrics = MetricsLog(paths.metrics, accelerator.is_main_process, tensorboard=recipe.output.tensorboard)
    trainable = [p for p in model.parameters() if p.requires_grad]
    tokens_seen, t_last, tokens_last = start.tokens_seen, time.perf_counter(), start.tokens_seen
    last_checkpoint = start.checkpoint
    compute_loss = build_loss(accelerator.unwrap_model(model), cfg.chunked_loss)
    console(accelerator.is_main_process)(compute_loss.describe())
    meter = meter or StepMeter(ModelShape.of(accelerator.unwrap_model(model)))
    fault = fault_injector(accelerator.process_index)  # test-only; a no-op unless LORAKIT_TEST_FAULT is set
    model.train()
    with progress_bar(accelerator.is_main_process, total_steps) as bar, GracefulStop(resume_command) as stop:
        for step in range(start.step, total_steps):
            # Checkpoint before evaluating: a run resumed from here repeats the evaluation, not logs it twice.
            if step > start.step and checkpoint_due(cfg, sampler, step):
                last_checkpoint = save_checkpoint(accelerator, model, optimizer, scheduler, recipe, paths, sampler,
                                                  step, tokens_seen)
            if cfg.eval_every and step and step % cfg.eval_every == 0 and data.eval:
                eval_loss = evaluate(model, tokenizer, data.eval, cfg, accelerator, compute_loss)
                metrics.write({"step": step, "eval_loss": eval_loss})

            fault(step)
            meter.start()
            micro_batches = sampler.micro_batches(step)
            batches = [collate([data.train[i] for i in idx], tokenizer, padding_free) for idx in micro_batches]
            # A rank left without data by the last, partial step of an epoch still runs one forward/backward
            # that adds nothing, so the gradient all-reduce of the other ranks does not wait for it.
            batches = batches or [collate([idle_batch(data.train[0])], tokenizer, padding_free)]
            # Normalise by the supervised tokens of the whole window on all ranks, so every token weighs the
            # same whatever the micro-batch, accumulation or world size. DDP averages gradients over ranks,
            # hence the world-size factor inside num_items.
            window_tokens = reduce_sum(accelerator, sum(supervised_targets(b) for b in batches))
            num_items = window_tokens / accelerator.num_processes
            step_loss = torch.zeros((), device=accelerator.device)
            for i, batch in enumerate(batches):
                # Dropout masks follow (seed, step, global micro-batch index), not the rank: 2 ranks × k
                # micro-batches draw what 1 rank × 2k draws, and a resumed run what the uninterrupted one drew.
                torch.manual_seed(micro_seed(cfg.seed, step, accelerator.process_index + i * accelerator.num_processes))
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                sync = i == len(batches) - 1  # gradients are all-reduced on the last micro-step only
                with nullcontext() if sync else accelerator.no_sync(model):
                    loss = compute_loss(model, batch, num_items)
                    accelerator.backward(loss)
                step_loss += loss.detach()
            # Each rank's share is already divided by the window's tokens / world size: the mean over ranks
            # is the loss per supervised token of the whole window.
            step_loss = accelerator.reduce(step_loss, reduction="mean").item()

            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = float(accelerator.clip_grad_norm_(trainable, max_norm))
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                raise NonFiniteLossError(
                    f"step {step + 1}: loss {step_loss} / grad norm {grad_norm} is not finite; nothing was saved from "
                    f"this step (last good checkpoint: {last_checkpoint or 'none written'}). Likely causes: learning "
                    "rate too high (train.learning_rate), float16 overflow (use bfloat16 or float32), or corrupt data "
                    "rows"
                )
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
                        "epoch": sampler.epoch_of(step),
                        "loss": round(step_loss, 6),
                        "lr": lr,
                        "grad_norm": round(grad_norm, 6),
                        "tokens": tokens_seen,
                        "tokens_per_s": round(tps, 2),
                    }
                )
            bar.update(step + 1, loss=step_loss, lr=lr, tps=tokens_seen / max(bar.elapsed, 1e-9))
            if any_rank(accelerator, stop.signum is not None) and step + 1 < total_steps:
                path = save_checkpoint(accelerator, model, optimizer, scheduler, recipe, paths, sampler, step + 1,
                                       tokens_seen)
                raise stop.stopped(step + 1, path)

    if data.eval:
        eval_loss = evaluate(model, tokenizer, data.eval, cfg, accelerator, compute_loss)
        metrics.write({"step": total_steps, "eval_loss": eval_loss})
    dtype = resolve_dtype(recipe.model.dtype)
    efficiency = meter.record(total_steps, cfg.gradient_checkpointing, dtype, accelerator)
    metrics.write(efficiency)
    console(accelerator.is_main_process)(describe(efficiency))
    metrics.close()


# ----------------------------------------------------------------------------------------------------------
# Builders


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
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


# ----------------------------------------------------------------------------------------------------------
# Loop helpers


def supervised_targets(batch) -> int:
    """Tokens the loss is computed on: labels are shifted by one inside the model's loss."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def micro_seed(seed: int, step: int, index: int) -> int:
    return (seed * 1_000_003 + step) * 1_009 + index


def reduce_sum(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return float(value)
    t = torch.tensor(float(value), device=accelerator.device, dtype=torch.float64)
    return float(accelerator.reduce(t, reduction="sum"))


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any: a signal or a failed save may reach one rank only."""
    return flag if accelerator.num_processes == 1 else reduce_sum(accelerator, float(flag)) > 0


def checkpoint_due(cfg: TrainSection, sampler, step: int) -> bool:
    every = bool(cfg.save_every) and step % cfg.save_every == 0
    return every or (cfg.save_each_epoch and step % sampler.steps_per_epoch == 0)


@torch.no_grad()
def evaluate(model, tokenizer, examples, cfg: TrainSection, accelerator, compute_loss) -> float:
    """Token-weighted mean loss over the eval set, each rank taking every world_size-th example.

    Every rank runs the same number of batches (idle ones where it has run out), as FSDP's forward is a
    collective.
    """
    model.eval()
    shards = eval_shards(len(examples), cfg.micro_batch_size, accelerator.num_processes, accelerator.process_index)
    total, count = 0.0, 0
    for idx in shards:
        batch = collate([examples[i] for i in idx] or [idle_batch(examples[0])], tokenizer)
        n = supervised_targets(batch)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        total += float(compute_loss(model, batch, 1))  # num_items=1: the summed loss
        count += n
    model.train()
    return round(reduce_sum(accelerator, total) / max(reduce_sum(accelerator, count), 1), 6)


# ----------------------------------------------------------------------------------------------------------
# Saving


def save_adapter(model, tokenizer, recipe: Recipe, out: Path, model_path: str, state_dict=None) -> None:
    """DIR/adapter: PEFT's own files (PeftModel.from_pretrained loads them), the tokenizer, and lorakit.json.

    ``state_dict``: the adapter gathered from FSDP shards (distributed.gather_adapter), None otherwise.
    """
    save_adapter_weights(model, out, state_dict)
    tokenizer.save_pretrained(out)
    meta = {
        "base_model": recipe.model.name_or_path,
        "base_model_path": str(Path(model_path).resolve()) if Path(model_path).exists() else model_path,
        "revision": recipe.model.revision,
        "quantization": recipe.model.quantization,
        "double_quant": recipe.model.double_quant,
        "dtype": str(resolve_dtype(recipe.model.dtype)).removeprefix("torch."),  # resolved, not "auto"
        "method": recipe.adapter.method,
        "lorakit_version": __version__,
    }
    (out / "lorakit.json").write_text(json.dumps(meta, indent=2) + "\n")


def save_checkpoint(accelerator, model, optimizer, scheduler, recipe: Recipe, paths: RunPaths, sampler, step: int,
                    tokens_seen: int) -> Path:
    """Every rank hands over its RNG state (and under FSDP its shards of the adapter and optimizer state), rank 0
    writes (see checkpoint.py); a failure stops every rank."""
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
                state=trainer_state(step, tokens_seen, sampler, unwrapped, paths.metrics, adapter_state),
                recipe_text=dump_recipe(recipe), keep_last=recipe.train.keep_last,
                adapter_state=adapter_state, optimizer_state=optim_state,
            )
        except LorakitError as e:
            failure = e
    if any_rank(accelerator, failure is not None):
        raise failure or CheckpointError(f"rank 0 could not write checkpoint {checkpoint_name(step)}; see its error")
    return paths.checkpoints / checkpoint_name(step)


def resume_state(checkpoint, changed: bool, accelerator, model, optimizer, scheduler, paths, say) -> TrainState:
    """Continue from ``checkpoint`` (its adapter already restored, before prepare): the optimizer, schedule and
    RNG restored (only reads), then newer checkpoints set aside and metrics.jsonl cut back to the checkpoint."""
    start = restore_training_state(
        checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, scaler=accelerator.scaler,
        rank=accelerator.process_index, changed=changed,
    )
    if accelerator.is_main_process:
        set_aside_newer(paths.checkpoints, checkpoint.step, say)
        truncate_metrics(paths.metrics, checkpoint.state.get("metrics_bytes", 0), say)
    accelerator.wait_for_everyone()
    say(f"resuming from {checkpoint.path} at step {start.step}")
    return start
