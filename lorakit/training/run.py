"""`lorakit train`: setup (data, model, optimizer, schedule), then one loop for every method and world size.

Reading order: run_training (setup) → lorakit.training.loop.fit (the loop) → saving the adapter, resuming.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from lorakit import __version__
from lorakit.adapters.build import apply_adapter, build_model, continue_from, counting_section, lora_layers
from lorakit.adapters.inits import InitRecord, capture_initial, run_eva, save_converted
from lorakit.adapters.card import write_card
from lorakit.adapters.vllm import warn_if_not_servable
from lorakit.atomic import umask_modes
from lorakit.checkpoint.format import TrainState
from lorakit.checkpoint.read import select_checkpoint, set_aside_newer
from lorakit.checkpoint.resume import (
    check_resume, check_steps_left, restore_adapter, restore_training_state, truncate_metrics,
)
from lorakit.checkpoint.write import check_finite, check_free_space, checkpoint_bytes
from lorakit.config.load import dump_recipe
from lorakit.config.schema import Recipe
from lorakit.config.start import start_warnings
from lorakit.console import adopt_transformers_output, console, saved, stage, warner
from lorakit.data import StepSampler, collate, load_datasets
from lorakit.data.stop_tokens import write_generation_config
from lorakit.distributed.fsdp import (
    build_accelerator, check_launch, gather_adapter, optimizer_state, prepare_fsdp,
    save_adapter_weights,
)
from lorakit.errors import SafetyError, UsageError
from lorakit.models.checks import positions_problem, shape_problem, vocab_problem, weights_fingerprint
from lorakit.models.loading import (
    check_attention_package, load_tokenizer, model_dir_on_disk, resolve_dtype, resolve_model_path, trainable_summary,
)
from lorakit.models.meta import build_meta_model, read_model_config
from lorakit.publish import check_output, check_replaceable, read_marker, set_aside, write_marker
from lorakit.runlock import OutputLock
from lorakit.training.context import FitContext, RunPaths
from lorakit.training.effective import as_records, effective_settings, format_block
from lorakit.training.interrupt import outside_steps
from lorakit.training.loop import fit
from lorakit.training.manifest import final_metrics, write_run_manifest
from lorakit.training.metrics import MetricsLog, read_metrics
from lorakit.training.optim import build_optimizer, build_scheduler, paging_warning, warmup_warning
from lorakit.training.perf import ModelShape, StepMeter, apply_speed_knobs, choose_batching, describe
from lorakit.training.plot import maybe_plot
from lorakit.training.preference import attach_reference, build_training_loss, live_reference
from lorakit.training.threads import set_threads
from lorakit.training.trackers import (
    build_trackers, check_tracker_packages, finish_trackers, metrics_logged, start_trackers,
)


# An adapter's fp32 weight, gradient and two AdamW moments (lorakit.memory.lines.ADAPTER_BYTES = 4 each).
ADAPTER_STATE_BYTES = 16


def check_output_dir(root: Path, *, resume: bool = False, overwrite: bool = False,
                     resume_from: Path | None = None) -> None:
    """A directory holding something is written into only to continue its run (--resume) or, when lorakit wrote
    it, to replace it (--overwrite moves the old run aside at the first write; nothing is deleted). Called under
    the run's lock, after publish.check_output."""
    if root.exists() and not root.is_dir():
        raise SafetyError(f"output.dir: {str(root)!r} is a file; choose a directory with --output-dir")
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other: --resume continues the run, --overwrite replaces it")
    if resume_from is not None:
        check_same_run(root, Path(resume_from))
    if not resume:
        check_replaceable("output.dir", root, overwrite, "run", also="continue it with --resume, ",
                          elsewhere="choose another --output-dir")


def check_same_run(root: Path, checkpoint: Path) -> None:
    """--resume PATH from outside output.dir (a copy, or another run's checkpoint): a run already in output.dir
    must have been trained with the checkpoint's recipe, else continuing into it would replace its adapter and
    recipe.yaml and cut its metrics.jsonl to the other run's (exit 5). A missing checkpoint is select_checkpoint's
    to report (exit 4)."""
    import yaml

    from lorakit.checkpoint.format import RECIPE
    from lorakit.checkpoint.resume import recipe_changes

    here = root / "recipe.yaml"
    if not checkpoint.is_dir() or Path(os.path.realpath(checkpoint)).is_relative_to(root) or not here.is_file():
        return
    try:
        changes = recipe_changes(yaml.safe_load((checkpoint / RECIPE).read_text()) or {},
                                 yaml.safe_load(here.read_text()) or {})
    except (OSError, yaml.YAMLError, AttributeError):
        return  # a damaged checkpoint: verify_checkpoint names it
    if changes:
        raise SafetyError(f"--resume {checkpoint}: output.dir {str(root)!r} holds a run with another recipe "
                          f"({'; '.join(changes[:3])}), which continuing this checkpoint into it would overwrite; "
                          "resume in the checkpoint's own run (its --output-dir), or into a new --output-dir")


def run_inputs(recipe: Recipe, recipe_file: Path | None, resume: bool) -> dict[str, str | None]:
    """What a run directory must keep apart from (publish.check_inputs_apart). A resumed run's recipe may be
    its own DIR/recipe.yaml."""
    train = recipe.data.train_paths()
    inputs = {f"data.train[{i}] data": s for i, s in enumerate(train)} if isinstance(recipe.data.train, list) else {
        "data.train data": train[0]}
    inputs.update({"data.eval data": recipe.data.eval, "chat template": recipe.data.chat_template,
                   "base model": recipe.model.name_or_path, "tokenizer": recipe.model.tokenizer,
                   "adapter.init_from adapter": recipe.adapter.init_from,
                   "recipe": None if resume or recipe_file is None else str(recipe_file)})
    inputs.update({f"data.train[{i}] chat template": s.chat_template
                   for i, s in enumerate(recipe.data.sources()) if s.chat_template})
    return inputs


def check_base_fits(recipe: Recipe, model_path: str, tokenizer) -> None:
    """Exit 2 before the weights load when they cannot be this config's model, the tokenizer's ids overrun its
    vocabulary (lorakit.models.checks), the attention kernel's package is missing, or the adapter alone cannot
    fit in memory; transformers or the allocator would fail minutes later, in many lines. ``model_path``: what
    resolve_model_path returned, a hub id only once it found it within reach (the hub is not asked again)."""
    check_attention_package(recipe.model)
    config = read_model_config(model_path, recipe.model.trust_remote_code, recipe.model.revision)
    problem = vocab_problem(tokenizer, config, recipe.model.add_tokens)
    if problem is None and Path(model_path).is_dir():
        problem = shape_problem(Path(model_path), config)
    if problem is not None:
        raise UsageError(f"model.name_or_path: {problem}")
    virtual = (recipe.adapter.model_extra or {}).get("num_virtual_tokens", 0) if recipe.adapter.method in (
        "prefix", "prompt") else 0
    if problem := positions_problem(config, recipe.data.max_seq_len, virtual):
        raise UsageError(problem)
    check_adapter_fits(recipe, config)


def check_adapter_fits(recipe: Recipe, config) -> None:
    """An adapter.r typed with extra zeros: its weights, gradients and AdamW moments counted on the meta device
    against this machine's memory. Only ranks above the hidden size are counted (a rank beyond it adds nothing),
    so an ordinary run pays nothing for this."""
    r = getattr(recipe.adapter, "r", None)
    hidden = getattr(config.get_text_config(), "hidden_size", None)
    if not isinstance(r, int) or not hidden or r <= hidden:
        return
    with torch.device("meta"):
        model = apply_adapter(build_meta_model(config), counting_section(recipe.adapter), low_cpu_mem_usage=True)
    params = model.get_nb_trainable_parameters()[0]
    need = params * ADAPTER_STATE_BYTES
    if torch.cuda.is_available():
        have, where = torch.cuda.get_device_properties(0).total_memory, "this GPU's"
    else:
        have, where = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this machine's"
    if need > have:
        raise UsageError(f"adapter.r: {r:,} makes a {params:,}-parameter adapter, {need / 2**30:,.2f} GiB with its "
                         f"gradients and optimizer state, more than {where} {have / 2**30:,.2f} GiB; a rank above "
                         f"the hidden size ({hidden}) adds nothing: lower adapter.r (8 to 64 is usual)")


def run_training(
    recipe: Recipe,
    *,
    allow_pickle: bool = False,
    resume: bool = False,
    resume_from: Path | None = None,
    allow_recipe_change: bool = False,
    overwrite: bool = False,
    resume_command: str = "lorakit train RECIPE --resume",
    recipe_file: Path | None = None,
) -> Path:
    """Train as the recipe says (or continue from a checkpoint with ``resume``); returns the run directory.

    The run directory is checked (lorakit.publish) and locked (lorakit.runlock) by rank 0 before anything loads.
    """
    adopt_transformers_output()
    main = int(os.environ.get("RANK", "0")) == 0  # before accelerate starts: rank 0 checks and locks
    root = Path(os.path.realpath(recipe.output.dir or "."))
    if main:
        root = check_output("output.dir", recipe.output.dir, run_inputs(recipe, recipe_file, resume))
    with OutputLock(root, console(main), "output.dir") if main else nullcontext():
        if main:
            check_output_dir(root, resume=resume, overwrite=overwrite, resume_from=resume_from)
        return _train(recipe, RunPaths(root), allow_pickle=allow_pickle, resume=resume, resume_from=resume_from,
                      allow_recipe_change=allow_recipe_change, overwrite=overwrite, resume_command=resume_command)


def _train(recipe: Recipe, paths: RunPaths, *, allow_pickle, resume, resume_from, allow_recipe_change, overwrite,
           resume_command) -> Path:
    from accelerate.utils import DistributedType, set_seed

    started = time.time()
    check_launch(recipe)  # from the launcher's environment, before the Accelerator exists
    check_tracker_packages(recipe.output)  # a missing tracker package is exit 2 before anything loads
    accelerator = build_accelerator(recipe.train, build_trackers(recipe.output, paths.root), str(paths.root))
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and recipe.train.objective != "sft":  # the reference forward runs outside the sharded wrapper
        raise UsageError(f"train.objective: {recipe.train.objective} is not available with FSDP yet; use DDP "
                         "(lorakit train --nproc N) or one process")
    if fsdp and recipe.train.eval_generate:  # generation on rank 0 alone would stall FSDP's sharded forward
        raise UsageError("train.eval_generate: not available with FSDP; set it to 0 and score the adapter "
                         "afterwards with `lorakit eval RUN --data EVAL_FILE`")
    set_seed(recipe.train.seed)
    set_threads(recipe.train.threads)
    say, warn = console(accelerator.is_main_process), warner(accelerator.is_main_process)
    for warning in start_warnings(recipe):
        warn(warning)
    # A bad checkpoint or a changed recipe is exit 4 before anything heavy loads.
    checkpoint, changed = None, False
    if resume:
        checkpoint = select_checkpoint(paths.checkpoints, resume_from, say)
        changed = check_resume(checkpoint, recipe, accelerator.num_processes, allow_recipe_change, say, fsdp=fsdp)
        if not changed and (done := finished_step(paths, recipe, checkpoint.step)) is not None:
            say(f"{paths.root}: this run already finished{f' at step {done}' if done else ''} (its adapter: "
                f"{paths.adapter}); nothing to resume, nothing rewritten. To train further, raise train.max_steps "
                "and resume with --allow-recipe-change (--set train.max_steps=N)")
            return paths.root

    # Data first: a data problem (exit 3) must show before minutes of model loading.
    with stage(accelerator.is_main_process, "loading tokenizer"), accelerator.main_process_first():
        model_path = resolve_model_path(recipe.model)  # rank 0 converts a .gguf once; the others reuse it
        tokenizer = load_tokenizer(recipe.model, model_path)
        check_base_fits(recipe, model_path, tokenizer)
    with stage(accelerator.is_main_process, "tokenizing data"):
        data = load_datasets(recipe.data, tokenizer, recipe.train.seed)
    data.train_stats.show("train", say, warn)
    if data.eval_stats:
        data.eval_stats.show("eval", say, warn)

    with stage(accelerator.is_main_process, "loading model"):
        model = build_model(recipe, model_path, allow_pickle, tokenizer)
        init_from = continue_from(model, recipe.adapter, allow_pickle) if recipe.adapter.init_from else None
        if init_from is not None:
            say(f"adapter: starting from {init_from}")
        init = capture_initial(model, recipe.adapter, init_from)  # before a checkpoint's weights replace B₀, A₀
        batching = choose_batching(recipe, model, data.group_lengths)
        meter = StepMeter(ModelShape.of(model, reference_forward=live_reference(recipe.train)))
        apply_speed_knobs(model, recipe.train.compile, recipe.train.liger)
    # After the build: a target PEFT cannot find (a typo) is refused first, and a regular expression is resolved
    warn_if_not_servable(recipe.adapter, warn, {name.rsplit(".", 1)[-1] for name, _ in lora_layers(model)} or None)
    say(trainable_summary(model))
    say(f"batches: {batching.note}")

    sampler = StepSampler(
        num_examples=len(data.train),
        micro_batch_size=recipe.train.micro_batch_size,
        grad_accum=recipe.train.grad_accum,
        seed=recipe.train.seed,
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
        lengths=batching.lengths,
        sources=data.sources,
        weights=data.weights,
    )
    total_steps = recipe.train.max_steps or recipe.train.epochs * sampler.steps_per_epoch
    if checkpoint is not None:
        check_steps_left(checkpoint, total_steps, recipe.train)
    for warning in (sampler.oversized(), warmup_warning(recipe.train, total_steps), paging_warning(recipe.train)):
        if warning:
            warn(warning)
    if init.name == "eva":  # a resumed run recomputes the same A from the same batches, then restores
        with stage(accelerator.is_main_process, "EVA init on the first micro-batches"):
            run_eva(model, [collate([data.train[i] for i in idx], tokenizer) for idx in sampler.micro_batches(0)],
                    init, recipe.adapter)
    if recipe.train.reference in ("precomputed", "init_from"):  # init_from: the adapter as loaded, before a resume
        with stage(accelerator.is_main_process, "reference log-probs"), accelerator.main_process_first():
            attach_reference(recipe, build_training_loss(model, recipe.train), data, tokenizer, say,
                             accelerator.device, batching.padding_free)
    if checkpoint is not None:  # the weights before wrapping: FSDP shards what was restored
        restore_adapter(checkpoint, model=model, sampler=sampler, changed=changed, say=say,
                        data_identity=data.identity(),
                        allow_change=allow_recipe_change)
    # whole parameters, before FSDP flattens and shards them
    checkpoint_size = checkpoint_bytes(model, init.converted_at_save)
    optimizer = build_optimizer(model, recipe.train, recipe.adapter)
    scheduler = build_scheduler(optimizer, recipe.train, total_steps)
    prepare_fsdp(accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    compute_loss = build_training_loss(accelerator.unwrap_model(model), recipe.train)  # the loop's, as reported
    effective = as_records(effective_settings(
        recipe, model=accelerator.unwrap_model(model), tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
        init=init, data=data, total_steps=total_steps, world_size=accelerator.num_processes, batching=batching.note
        or ("padding-free" if batching.padding_free else "padded"),
        loss=compute_loss.describe().removeprefix("loss: "),
    ))
    say(format_block(effective))

    # Nothing is written into the run directory before this point: every refusal leaves it as it was.
    # From here a Ctrl-C outside the loop says what continues the run (inside it, GracefulStop decides).
    with outside_steps(paths.checkpoints, resume_command):
        start, logged = TrainState(), None
        if checkpoint is not None:
            if accelerator.is_main_process and paths.metrics.is_file():  # what the trackers hold, before the cut
                logged = metrics_logged(read_metrics(paths.metrics))
            start = resume_state(checkpoint, changed, accelerator, model, optimizer, scheduler, paths, say)
        mirror = None
        if accelerator.is_main_process:
            if overwrite and paths.root.is_dir() and any(paths.root.iterdir()):
                say(f"--overwrite: the earlier run in {paths.root} was moved to {set_aside(paths.root)}")
            paths.root.mkdir(parents=True, exist_ok=True)
            if read_marker(paths.root) is None:
                write_marker(paths.root, "run")
            mirror = start_trackers(accelerator, recipe, paths.root, resuming=checkpoint is not None,
                                    logged=logged)  # exit 2 if one cannot
            replayed, last = mirror.replayed(start.step) if mirror and changed else ([], 0)
            if replayed:  # their runs keep the values logged before the change; metrics.jsonl gets the new ones
                say(f"trackers: {', '.join(replayed)} keep their values of steps {start.step + 1}-{last} from before "
                    "the interruption (each step is sent once); metrics.jsonl records this run's")
            paths.recipe.write_text(dump_recipe(recipe))
            check_free_space(paths.root, checkpoint_size, recipe.train.keep_last)
        accelerator.wait_for_everyone()

        try:
            metrics = fit(FitContext(recipe, accelerator, model, tokenizer, optimizer, scheduler, data, sampler,
                                     total_steps, paths, meter, start, resume_command,
                                     padding_free=batching.padding_free, init=init, loss=compute_loss,
                                     mirror=mirror))
        except BaseException:  # an interrupted or failed run still closes its tracker runs
            finish_trackers(accelerator)
            raise
        state_dict = gather_adapter(model)  # a collective under FSDP: every rank takes part
        if accelerator.is_main_process:
            check_finite(accelerator.unwrap_model(model), optimizer, total_steps, state_dict)
            save_adapter(accelerator.unwrap_model(model), tokenizer, recipe, paths.adapter, model_path, state_dict,
                         init)
            saved(True)("adapter", paths.adapter)
        # Reporting comes only now, the adapter safe on disk: a failure in it is a warning, never a lost run.
        efficiency = best_effort(warn, "the efficiency summary", meter.record, total_steps,
                                 recipe.train.gradient_checkpointing, resolve_dtype(recipe.model.dtype), accelerator)
        if accelerator.is_main_process:
            stats = {"train": data.train_stats.to_json(),
                     "eval": data.eval_stats.to_json() if data.eval_stats else None}
            report_run(recipe, paths, metrics, efficiency, started, accelerator.num_processes, say, warn, effective,
                       stats)
        finish_trackers(accelerator)  # after the end-of-run records have reached them
        if accelerator.is_main_process:
            if recipe.output.save in ("merged", "both"):
                from lorakit.merge.merge import merge_adapter

                # The same streaming merge as `lorakit merge DIR/adapter`; the adapter stays (the merge's input).
                # RUN/merged is this run's own output (replaced when a resumed run reaches the end again).
                with stage(True, "merging"):
                    merge_adapter(paths.adapter, paths.merged, log=say, allow_pickle=allow_pickle, inside_run=True,
                                  overwrite=True)
                saved(True)("merged model", paths.merged)
        accelerator.wait_for_everyone()
    return paths.root


def finished_step(paths: RunPaths, recipe: Recipe, resumed_step: int) -> int | None:
    """The step this run finished at (0 when unknown) if ``paths`` holds its finished outputs under ``recipe``;
    None if not. An unchanged resume of a finished run would only retrain its last steps into the same bytes.

    Finished: DIR/adapter complete (save_adapter writes lorakit.json last), DIR/merged too where the recipe
    saves one, and DIR/recipe.yaml this recipe (a resume of an older checkpoint under the original recipe, after
    a changed resume went further, is not this run's end)."""
    import yaml

    from lorakit.checkpoint.resume import recipe_changes

    if not (paths.adapter / "lorakit.json").is_file() or not paths.recipe.is_file():
        return None
    if recipe.output.save in ("merged", "both") and not (paths.merged / "config.json").is_file():
        return None  # stopped while merging: the resume finishes it
    try:
        ran = yaml.safe_load(paths.recipe.read_text())
        if not isinstance(ran, dict) or recipe_changes(ran, yaml.safe_load(dump_recipe(recipe))):
            return None
    except (OSError, yaml.YAMLError):
        return None
    step = recipe.train.max_steps or final_metrics(paths.metrics).get("step") or 0
    return step if step == 0 or step >= resumed_step else None


def best_effort(warn, what: str, fn, *args):
    """``fn(*args)`` for a report made after the adapter is saved: any failure becomes a warning (and None)."""
    try:
        return fn(*args)
    except Exception as e:  # whatever breaks in a report, the finished run must stay a success
        warn(f"{what} could not be made ({type(e).__name__}: {e}); the adapter is saved")
        return None


def report_run(recipe: Recipe, paths: RunPaths, metrics: MetricsLog, efficiency: dict | None, started: float,
               world_size: int, say, warn, effective: list[dict] | None = None,
               data_stats: dict | None = None) -> None:
    """Rank 0, after the adapter is saved: the efficiency record, run.json, the model card and the loss plot,
    each best-effort."""
    report = saved(True)
    if efficiency is not None:
        best_effort(warn, "the efficiency record", metrics.write, efficiency, False)  # the line below says it
        best_effort(warn, "the efficiency line", lambda: say(describe(efficiency)))
    manifest = best_effort(warn, "run.json", lambda: write_run_manifest(paths.root, recipe, started=started,
                                                                        world_size=world_size,
                                                                        effective_settings=effective,
                                                                        data_stats=data_stats))
    if manifest is not None:
        report("run manifest", manifest)
    # After run.json: the card reports what it records.
    best_effort(warn, "the model card", write_card, paths.adapter, paths.adapter)
    if (png := maybe_plot(paths.root, warn=warn)) is not None:
        report("loss plot", png)


# ----------------------------------------------------------------------------------------------------------
# Builders


# ----------------------------------------------------------------------------------------------------------
# Loop helpers


# ----------------------------------------------------------------------------------------------------------
# Saving


def save_adapter(model, tokenizer, recipe: Recipe, out: Path, model_path: str, state_dict=None,
                 init: InitRecord | None = None) -> None:
    """DIR/adapter: PEFT's own files (PeftModel.from_pretrained loads them), the tokenizer, generation_config.json
    (every stop token) and lorakit.json.

    ``state_dict``: the adapter gathered from FSDP shards (distributed.gather_adapter), None otherwise.
    ``init``: a weight-rewriting init's record; its adapter is saved converted to a plain LoRA delta.
    """
    init = init or InitRecord()
    if init.converted_at_save:
        save_converted(model, out, init)  # FSDP refuses these inits (check_fsdp): the model is whole here
    else:
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
        # which checkpoint of the architecture: adapters.files.check_recorded_base warns on another one
        "base_fingerprint": weights_fingerprint(base_dir) if (base_dir := model_dir_on_disk(
            model_path, recipe.model.revision)) else None,
        "method": recipe.adapter.method,
        "init": init.summary(),
        "vocab_size": len(tokenizer),  # with model.add_tokens: a smaller base grows to it (models.tokens)
        "added_tokens": recipe.model.add_tokens,
        "lorakit_version": __version__,
    }
    (out / "lorakit.json").write_text(json.dumps(meta, indent=2) + "\n")
    umask_modes(out)  # readable as any other file of the folder (safetensors 0.8 writes 0600)


def resume_state(checkpoint, changed: bool, accelerator, model, optimizer, scheduler, paths, say) -> TrainState:
    """Continue from ``checkpoint`` (its adapter already restored, before prepare): the optimizer, schedule and
    RNG restored (only reads), then newer checkpoints set aside and metrics.jsonl cut back to the checkpoint."""
    start = restore_training_state(
        checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, scaler=accelerator.scaler,
        rank=accelerator.process_index, changed=changed,
    )
    if accelerator.is_main_process:
        # Under a changed recipe the finished run's outputs would be replaced by different ones: kept aside.
        finished = [paths.adapter, paths.merged, paths.root / "eval.json"] if changed else []
        set_aside_newer(paths.checkpoints, checkpoint.step, say, finished)
        truncate_metrics(paths.metrics, checkpoint.state.get("metrics_bytes", 0), say)
    accelerator.wait_for_everyone()
    say(f"resuming from {checkpoint.path} at step {start.step}")
    return start
