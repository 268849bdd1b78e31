"""Resuming: check that a checkpoint fits this run (recipe, world size, parameters, data), then restore the
adapter, optimizer, scheduler, RNG and data order bitwise."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from lorakit.adapters import bottleneck
from lorakit.checkpoint.format import ADAPTER, COSMETIC_KEYS, PROMPT_ENCODER, TrainState, _read_piece, restore_rng
from lorakit.checkpoint.read import Checkpoint, resume_weights
from lorakit.distributed import fsdp as distributed
from lorakit.errors import CheckpointError, first_line


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# Why a key that does not change the trained weights still may not change on resume (said in the refusal).
WHY_FIXED = {
    "output.project": "output.project names the tracker project the run's tracker runs (trackers.json) live in; "
    "a resume continues those runs, which another project does not hold",
}


def recipe_changes(old: dict, new: dict, ignore: set[str] = frozenset()) -> list[str]:
    """``key: old → new`` for every recipe key that differs, cosmetic keys (COSMETIC_KEYS) and ``ignore`` aside."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    changes = []
    for key in sorted(set(flat_old) | set(flat_new)):
        a, b = flat_old.get(key, "<unset>"), flat_new.get(key, "<unset>")
        if key not in COSMETIC_KEYS and key not in ignore and a != b:
            changes.append(f"{key}: {a!r} → {b!r}")
    return changes


def changed_key(change: str) -> str:
    """The recipe key of one of recipe_changes' lines (``key: old → new``)."""
    return change.split(": ", 1)[0]


def check_resume(ckpt: Checkpoint, recipe, world_size: int, allow_change: bool, say, fsdp: bool = False) -> bool:
    """Refuse (exit 4) a resume under a changed recipe or world size unless allowed; True when something changed.

    With or without FSDP makes no difference (the optimizer state is keyed by parameter name), except for a
    format-1 checkpoint, keyed by index, which FSDP cannot take."""
    import yaml

    from lorakit.errors import RecipeError
    from lorakit.config.load import parse_recipe
    from lorakit.config.start import inapplicable

    # A key without effect in either recipe changes nothing between them: an older lorakit recorded
    # model.double_quant without a 4-bit base, which the recipe now may not set.
    unused = {c.key for c in inapplicable(recipe)}
    old: Any = {}
    recorded = None
    try:
        old = yaml.safe_load(ckpt.recipe_text) or {}
        recorded = parse_recipe(old, recorded=True)  # recorded: what ran, not refused for keys without effect
        unused |= {c.key for c in inapplicable(recorded)}
        old = recorded.model_dump(mode="json")  # fills keys added since the checkpoint with defaults
    except (RecipeError, yaml.YAMLError, AttributeError):
        pass  # compare what is there; every difference is listed
    changes = recipe_changes(old if isinstance(old, dict) else {}, recipe.model_dump(mode="json"), unused)
    if changes and recorded is not None and _keep_recorded_defaults(recipe, recorded, changes, say):
        changes = []
    if fsdp and ckpt.manifest.get("format_version", 1) < 2:
        raise CheckpointError(
            f"{ckpt.path}: written by an older lorakit, with the optimizer state keyed by index, which FSDP cannot "
            "shard; resume it without FSDP (one process or DDP), or start over"
        )
    saved_world = ckpt.state.get("world_size")
    if saved_world != world_size:
        changes.append(f"world size (processes): {saved_world} → {world_size}")
    if not changes:
        return False
    _check_same_optimizer_state(ckpt, old, recipe)
    _check_same_shapes(ckpt, changes)
    shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
    if not allow_change:
        why = "".join(f" ({reason})" for key, reason in WHY_FIXED.items()
                      if key in map(changed_key, changes))
        raise CheckpointError(
            f"{ckpt.path}: cannot resume, the run changed since this checkpoint ({shown}){why}; undo the change, or "
            "pass --allow-recipe-change to continue under the new settings (the result then differs from an "
            "uninterrupted run)"
        )
    say(f"resuming under changed settings (--allow-recipe-change): {shown}")
    return True


# Optimizers whose saved state loads into each other: bitsandbytes' paged AdamW is its AdamW8bit with paged buffers.
_STATE_KINDS = {"adamw": "torch AdamW", "adamw_8bit": "bitsandbytes 8-bit AdamW",
                "paged_adamw_8bit": "bitsandbytes 8-bit AdamW"}


def _check_same_optimizer_state(ckpt: Checkpoint, old, recipe) -> None:
    """train.optimizer changed to one whose state the checkpoint's does not load into: exit 4 before anything
    loads, with what to do (--allow-recipe-change cannot help; the load would fail after the model is built)."""
    then = old.get("train", {}).get("optimizer") if isinstance(old, dict) else None
    now = recipe.train.optimizer
    if then is None or _STATE_KINDS.get(then, then) == _STATE_KINDS.get(now, now):
        return
    raise CheckpointError(
        f"{ckpt.path}: train.optimizer: {then} → {now}: the checkpoint holds {_STATE_KINDS.get(then, then)} state, "
        f"which {now} cannot continue from, even with --allow-recipe-change; resume with train.optimizer: {then}, "
        "or start a new run from the checkpoint's adapter (adapter.init_from: CHECKPOINT/adapter, lora/dora)"
    )


# Keys whose change always gives the adapter other tensors (names or shapes): the checkpoint's weights cannot load,
# whatever --allow-recipe-change says. Keys that only may (target_modules: "all-linear" or the same modules listed)
# are left to the comparison of the built model's parameters (restore_adapter), which needs the model loaded.
SHAPE_KEYS = ("adapter.method", "adapter.r", "adapter.num_virtual_tokens", "adapter.layer_replication",
              "adapter.prefix_projection")


def _check_same_shapes(ckpt: Checkpoint, changes: list[str]) -> None:
    """An adapter key whose change means other adapter tensors: exit 4 from the recipes alone, before the base model
    loads (minutes on a big one), with the message restore_adapter gives once it has."""
    shaped = [change for change in changes if changed_key(change) in SHAPE_KEYS]
    if shaped:
        raise CheckpointError(
            f"{ckpt.path}: its adapter does not fit this model ({'; '.join(shaped)}: other adapter tensors); it was "
            "written for another base model or adapter; resume with the recipe that wrote it"
        )


def check_steps_left(ckpt: Checkpoint, total_steps: int, train) -> None:
    """A checkpoint past the recipe's last step (train.max_steps or train.epochs lowered under
    --allow-recipe-change) is exit 4: the run would save the checkpoint's adapter as a shorter run's."""
    if ckpt.step <= total_steps:
        return
    key, raise_it = ((f"train.max_steps: {train.max_steps}", f"train.max_steps above {ckpt.step}") if train.max_steps
                     else (f"train.epochs: {train.epochs}", "train.epochs"))
    raise CheckpointError(
        f"{ckpt.path}: written after step {ckpt.step}, past this recipe's last step {total_steps} ({key}); nothing "
        f"is left to train: raise {raise_it}, or resume from an earlier checkpoint (--resume PATH)"
    )


def _keep_recorded_defaults(recipe, recorded, changes: list[str], say) -> bool:
    """When every change is a key the recipe leaves to its default and that default changed since the checkpoint
    was written (an upgrade of lorakit: DPO's LoRA dropout went from 0.05 to 0), continue with the checkpoint's
    values, set on ``recipe`` in place, one line each; True if so. A key the recipe sets stays a change."""
    keys = [changed_key(change) for change in changes]
    if not all(_left_to_default(recipe, key) for key in keys):
        return False
    for key in keys:
        section, name = key.split(".")
        value = getattr(getattr(recorded, section), name)
        say(f"resuming with the checkpoint's {key}: {value!r}; the recipe leaves it to its default, which is "
            f"{getattr(getattr(recipe, section), name)!r} in this lorakit (set it in the recipe to change it, with "
            "--allow-recipe-change)")
        setattr(getattr(recipe, section), name, value)  # as validated then (sections do not validate assignment)
    return True


def _left_to_default(recipe, key: str) -> bool:
    """Whether ``key`` (section.name, a whole field) is one the recipe did not set."""
    section_name, _, name = key.partition(".")
    section = getattr(recipe, section_name, None)
    if section is None or "." in name or name not in type(section).model_fields:
        return False
    defaulted = getattr(section, "defaulted", None)  # the adapter's method keys, which its validators fill in
    return (defaulted is not None and defaulted(name)) or name not in section.model_fields_set


def restore_adapter(ckpt: Checkpoint, *, model, sampler, changed: bool, say, data_identity: dict | None = None,
                    allow_change: bool = False) -> None:
    """Check the checkpoint fits this model and data, and load its adapter weights into ``model`` in place.
    ``allow_change``: --allow-recipe-change, which also accepts edited data when nothing else changed.

    Called before accelerator.prepare: FSDP then shards the restored weights (and DDP broadcasts them).
    """
    state = ckpt.state
    _check_same_parameters(ckpt, state, model)
    _check_same_data(ckpt, state, sampler, changed, say)
    _check_same_content(ckpt, state, data_identity or {}, changed or allow_change, say)
    _check_same_reference(ckpt, state, data_identity or {}, changed or allow_change, say)
    _load_adapter(ckpt, model)


def restore_training_state(
    ckpt: Checkpoint, *, model, optimizer, scheduler, scaler, rank: int, changed: bool,
) -> TrainState:
    """After accelerator.prepare: optimizer, scheduler, scaler and (last) this rank's RNG; where to continue.

    ``model`` is the prepared model (FSDP's optimizer state is loaded through it). Under
    --allow-recipe-change (``changed``) the optimizer keeps the new recipe's hyperparameters and the new
    schedule is fast-forwarded to the checkpoint's step; otherwise everything is exactly as saved.
    """
    state = ckpt.state
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        distributed.load_optimizer_state(model, optimizer, _read_piece(ckpt.path, "optimizer"))
        if changed:
            for group, fresh in zip(optimizer.param_groups, hyper):
                group.update(fresh)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": intended here
                for _ in range(state["step"]):
                    scheduler.step()
        else:
            scheduler.load_state_dict(_read_piece(ckpt.path, "scheduler"))
        if scaler is not None and (ckpt.path / "scaler.json").is_file():
            scaler.load_state_dict(_read_piece(ckpt.path, "scaler"))
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(
            f"{ckpt.path}: optimizer or scheduler state does not fit this run ({first_line(e)}); the checkpoint "
            "is foreign, or train.optimizer changed"
        ) from None
    ranks = _read_piece(ckpt.path, "rng").get("ranks", [])
    if rank < len(ranks):
        restore_rng(ranks[rank])  # last: nothing after this may draw random numbers before the loop
    return TrainState(step=state["step"], tokens_seen=state["tokens_seen"], checkpoint=ckpt.path)


def _check_same_parameters(ckpt: Checkpoint, state: dict, model) -> None:
    # Sorted: FSDP lists the gathered tensors unit by unit, not in the model's parameter order.
    saved = sorted((n, list(s)) for n, s in state.get("trainable", []))
    current = sorted((n, list(p.shape)) for n, p in model.named_parameters() if p.requires_grad)
    if saved != current:
        diff = next(
            (f"{a[0]} {a[1]} vs {b[0]} {b[1]}" for a, b in zip(saved, current) if a != b),
            f"{len(saved)} trainable tensors saved, {len(current)} now",
        )
        raise CheckpointError(
            f"{ckpt.path}: its adapter does not fit this model ({diff}); it was written for another base model "
            "or adapter; resume with the recipe that wrote it"
        )


def _check_same_data(ckpt: Checkpoint, state: dict, sampler, changed: bool, say) -> None:
    """The data set and the data position recorded in the checkpoint must be this run's (the order follows)."""
    data = state.get("data", {})
    if data.get("num_examples") != sampler.num_examples:
        message = (
            f"{ckpt.path}: the training data changed ({data.get('num_examples')} examples then, "
            f"{sampler.num_examples} now)"
        )
        if not changed:
            raise CheckpointError(message + "; restore the data, or pass --allow-recipe-change to continue on it")
        say(message + "; continuing on the new data (--allow-recipe-change)")
        return
    position = divmod(state["step"], sampler.steps_per_epoch)
    if not changed and (data.get("epoch"), data.get("offset")) != position:
        raise CheckpointError(
            f"{ckpt.path}: its data position (epoch {data.get('epoch')}, step {data.get('offset')} of the epoch) "
            f"is not where step {state['step']} falls in this run (epoch {position[0]}, step {position[1]}); "
            "resume with the recipe and number of processes that wrote it"
        )


def _check_same_content(ckpt: Checkpoint, state: dict, current: dict, allowed: bool, say) -> None:
    """Same number of examples is not the same data: compare the fingerprint of the tokenized examples, and name
    the data.train sources whose own fingerprint changed (checkpoints written before a fingerprint was recorded
    have none, and are not checked)."""
    recorded = state.get("data", {})
    if not recorded.get("fingerprint") or not current.get("fingerprint"):
        return
    if recorded["fingerprint"] == current["fingerprint"]:
        return
    then, now = recorded.get("sources") or {}, current.get("sources") or {}
    names = [name for name in {**then, **now} if then.get(name) != now.get(name)] if then else []
    what = (f"data.train source {', '.join(names)}" if names else "data.train")
    message = (f"{ckpt.path}: {what} changed since this checkpoint (same number of examples, other content: "
               "the tokenized examples' fingerprint differs)")
    if not allowed:
        raise CheckpointError(message + "; restore the data, or pass --allow-recipe-change to continue on it")
    say(message + "; continuing on the new data (--allow-recipe-change)")


def _check_same_reference(ckpt: Checkpoint, state: dict, current: dict, allowed: bool, say) -> None:
    """A reference computed before training (train.reference precomputed, init_from) is computed again on resume
    (or read from the data cache): it must be the checkpoint's, else the rest of the run compares the policy with
    another model. Compared as the mean log-prob of the chosen and of the rejected answers, to a tolerance above
    the rounding of another device or batch layout, where the pairs are the checkpoint's (checkpoints without it
    are not checked)."""
    recorded = state.get("data", {})
    if recorded.get("fingerprint") != current.get("fingerprint"):  # other pairs (allowed by then): other means
        return
    then, now = recorded.get("reference"), current.get("reference")
    if not then or not now or all(abs(a - b) <= 1e-3 * max(1.0, abs(a)) for a, b in zip(then, now)):
        return
    message = (f"{ckpt.path}: the reference log-probs differ from this checkpoint's (mean chosen, rejected "
               f"{then[0]:.4g}, {then[1]:.4g} then, {now[0]:.4g}, {now[1]:.4g} now): the reference model (model."
               "name_or_path, or the adapter.init_from adapter for train.reference init_from) changed since")
    if not allowed:
        raise CheckpointError(message + "; restore it, or pass --allow-recipe-change to continue against the new "
                              "reference")
    say(message + "; continuing against the new reference (--allow-recipe-change)")


def _load_adapter(ckpt: Checkpoint, model) -> None:
    from safetensors.torch import load_file

    weights_file = resume_weights(ckpt.manifest["files"])
    encoder = f"{ADAPTER}/{PROMPT_ENCODER}"
    try:
        if encoder in ckpt.manifest["files"]:  # a projected prefix: its encoder's own weights
            result = model.load_state_dict(load_file(str(ckpt.path / encoder)), strict=False)
            missing = [k for k in result.missing_keys if k.startswith("prompt_encoder.")]
            if result.unexpected_keys or missing:
                raise RuntimeError(f"prompt encoder weights do not match ({(result.unexpected_keys + missing)[0]}, ...)")
            return
        load_adapter_weights(model, load_file(str(ckpt.path / weights_file)))
    except RuntimeError as e:
        raise CheckpointError(
            f"{ckpt.path}: its adapter weights do not fit this model ({first_line(e)}); resume with the recipe "
            "that wrote it"
        ) from None


def load_adapter_weights(model, weights: dict) -> None:
    """Copy an adapter's saved weights into ``model`` in place (the optimizer keeps its parameters), with the
    loader of the model's kind: PEFT's for a PeftModel, the wrapper's own for a bottleneck model. RuntimeError
    when they do not fit."""
    if isinstance(model, bottleneck.BottleneckModel):
        model.load_adapter_state_dict(weights)
        return
    from peft import set_peft_model_state_dict

    unexpected = set_peft_model_state_dict(model, weights).unexpected_keys
    if model.active_peft_config.is_prompt_learning:
        # PEFT loads a prompt-learning adapter's one tensor into its prompt encoder itself, yet lists it as unexpected.
        unexpected = [k for k in unexpected if k != "prompt_embeddings"]
    if unexpected:
        raise RuntimeError(f"unexpected adapter weights ({unexpected[0]}, ...)")


def truncate_metrics(path: Path, size: int, say) -> None:
    """Cut metrics.jsonl back to what it held at the checkpoint: the resumed run rewrites the rest."""
    if not path.is_file():
        return
    current = path.stat().st_size
    if current > size:
        with path.open("r+b") as f:
            f.truncate(size)
    elif current < size:
        say(f"{path} is shorter than when the checkpoint was written; appending to it as it is")
