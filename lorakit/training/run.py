"""`lorakit train`: setup (data, model, optimizer, schedule), then one loop for every method and world size.

Reading order: run_training (setup) → lorakit.training.loop.fit (the loop) → saving the adapter, resuming.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from lorakit import __version__
from lorakit.adapters.build import build_model
from lorakit.checkpoint.format import TrainState
from lorakit.checkpoint.read import select_checkpoint, set_aside_newer
from lorakit.checkpoint.resume import check_resume, restore_adapter, restore_training_state, truncate_metrics
from lorakit.checkpoint.write import check_finite, check_free_space, checkpoint_bytes
from lorakit.config.load import dump_recipe
from lorakit.config.schema import Recipe
from lorakit.console import adopt_transformers_output, console, saved, stage
from lorakit.data import StepSampler, load_datasets
from lorakit.data.stop_tokens import write_generation_config
from lorakit.distributed.fsdp import (
    build_accelerator, check_launch, gather_adapter, optimizer_state, prepare_fsdp,
    save_adapter_weights,
)
from lorakit.errors import SafetyError, UsageError
from lorakit.models.loading import load_tokenizer, resolve_dtype, resolve_model_path, trainable_summary
from lorakit.training.context import FitContext, RunPaths
from lorakit.training.interrupt import outside_steps
from lorakit.training.loop import fit
from lorakit.training.manifest import write_run_manifest
from lorakit.training.optim import build_optimizer, build_scheduler
from lorakit.training.perf import ModelShape, StepMeter, apply_speed_knobs, choose_batching
from lorakit.training.plot import maybe_plot


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

        fit(FitContext(recipe, accelerator, model, tokenizer, optimizer, scheduler, data, sampler, total_steps, paths,
                       meter, start, resume_command, padding_free=batching.padding_free))
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


# ----------------------------------------------------------------------------------------------------------
# Builders


# ----------------------------------------------------------------------------------------------------------
# Loop helpers


# ----------------------------------------------------------------------------------------------------------
# Saving


def save_adapter(model, tokenizer, recipe: Recipe, out: Path, model_path: str, state_dict=None) -> None:
    """DIR/adapter: PEFT's own files (PeftModel.from_pretrained loads them), the tokenizer, generation_config.json
    (every stop token) and lorakit.json.

    ``state_dict``: the adapter gathered from FSDP shards (distributed.gather_adapter), None otherwise.
    """
    save_adapter_weights(model, out, state_dict)
    tokenizer.save_pretrained(out)
    # Servers read the stop tokens from here: the template's end-of-turn as well as the base's EOS.
    write_generation_config(out, tokenizer, getattr(model, "generation_config", None) or model_path)
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
