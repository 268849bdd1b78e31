"""Resumable checkpoints: DIR/checkpoints/step-NNNNNN/ holds everything needed to continue bitwise-exactly.

A checkpoint is written into step-NNNNNN.tmp/, every file fsynced, manifest.json (size and sha256 of every
file) written last, then renamed and the parent fsynced: a step-NNNNNN directory whose files match its
manifest is complete; anything else is reported and never resumed from. No pickle: tensors go to
safetensors, everything else to JSON. Layout and resume rules: docs/checkpoints.md.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from lorakit.adapters.inits import InitRecord, save_converted
from lorakit.atomic import fsync_files, replace_dir, umask_modes
from lorakit.checkpoint.format import (
    ADAPTER, FORMAT, FORMAT_VERSION, MANIFEST, PROMPT_ENCODER, RECIPE, RESIDUAL_ADAPTER, STATE, _write_piece,
    checkpoint_name,
)
from lorakit.checkpoint.read import list_checkpoints
from lorakit.distributed import fsdp as distributed
from lorakit.errors import CheckpointError, NonFiniteLossError
from lorakit.faults import checkpoint_fault


# ----------------------------------------------------------------------------------------------------------
# State dicts without pickle: tensors to safetensors, the rest to JSON (int dict keys and tuples kept)


# ----------------------------------------------------------------------------------------------------------
# RNG states


# ----------------------------------------------------------------------------------------------------------
# Writing


def trainer_state(step: int, tokens_seen: int, sampler, model, metrics_path: Path, adapter_state=None,
                  data_identity: dict | None = None) -> dict:
    """Counters, data position and the adapter's parameter list, as stored in trainer_state.json.

    ``adapter_state``: the adapter gathered from FSDP shards (distributed.gather_adapter), whose names and
    shapes are the unsharded ones; None when ``model`` holds whole parameters.
    """
    epoch, offset = divmod(step, sampler.steps_per_epoch)
    if adapter_state is None:
        trainable = [[n, list(p.shape)] for n, p in model.named_parameters() if p.requires_grad]
    else:
        trainable = [[n, list(t.shape)] for n, t in adapter_state.items()]
    return {
        "step": step,
        "micro_step": 0,  # checkpoints sit between optimizer steps: the accumulation window is always empty
        "tokens_seen": tokens_seen,
        "data": {
            "seed": sampler.seed, "epoch": epoch, "offset": offset, "steps_per_epoch": sampler.steps_per_epoch,
            "num_examples": sampler.num_examples, "micro_batch_size": sampler.micro_batch_size,
            "grad_accum": sampler.grad_accum,
            # of the tokenized examples, and of each data.train source's (lorakit.data.fingerprint)
            "fingerprint": (data_identity or {}).get("fingerprint", ""),
            "sources": (data_identity or {}).get("sources", {}),
            "reference": (data_identity or {}).get("reference"),  # train.reference precomputed / init_from
        },
        "world_size": sampler.world_size,
        "fsdp": adapter_state is not None,  # for the record: a checkpoint resumes with or without FSDP
        # metrics.jsonl is cut back to this length on resume, so the log continues as if never stopped.
        "metrics_bytes": metrics_path.stat().st_size if metrics_path.is_file() else 0,
        "trainable": trainable,
    }


def write_checkpoint(
    root: Path, step: int, *, model, optimizer, scheduler, scaler, rng_states: list[dict], state: dict,
    recipe_text: str, keep_last: int, adapter_state: dict | None = None, optimizer_state: dict | None = None,
    init: InitRecord | None = None,
) -> Path:
    """Write DIR/checkpoints/step-NNNNNN atomically, then drop the oldest beyond keep_last; returns its path.

    The caller gathers what every rank must take part in (train.save_checkpoint) and passes it: under FSDP
    ``adapter_state`` (distributed.gather_adapter), and ``optimizer_state`` (distributed.optimizer_state);
    without them both are read from ``model`` and ``optimizer`` (one process). ``init``: the run's LoRA init;
    a weight-rewriting one's checkpoint holds the converted adapter in adapter/ and the trained one beside it.
    """
    optimizer_state = distributed.optimizer_state(model, optimizer) if optimizer_state is None else optimizer_state
    check_finite(model, optimizer, step, adapter_state, optimizer_state)
    final = root / checkpoint_name(step)
    tmp = final.with_name(final.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        checkpoint_fault("adapter", step)
        if init is not None and init.converted_at_save:  # FSDP refuses these inits: the model is whole here
            distributed.save_adapter_weights(model, tmp / RESIDUAL_ADAPTER, adapter_state)  # resume reads this
            save_converted(model, tmp / ADAPTER, init)  # every tool reads this, as DIR/adapter
        else:
            distributed.save_adapter_weights(model, tmp / ADAPTER, adapter_state)
        if _projected_prefix(model):
            _write_prompt_encoder(model, tmp / ADAPTER / PROMPT_ENCODER, adapter_state)
        checkpoint_fault("optimizer", step)
        _write_piece(tmp, "optimizer", optimizer_state)
        checkpoint_fault("scheduler", step)
        _write_piece(tmp, "scheduler", scheduler.state_dict())
        if scaler is not None:
            _write_piece(tmp, "scaler", scaler.state_dict())
        checkpoint_fault("rng", step)
        _write_piece(tmp, "rng", {"ranks": rng_states})
        (tmp / STATE).write_text(json.dumps(state, indent=1) + "\n")
        (tmp / RECIPE).write_text(recipe_text)
        umask_modes(tmp)  # safetensors 0.8 writes its files 0600: a checkpoint readable as the run's other files
        fsync_files(tmp)
        checkpoint_fault("manifest", step)
        _write_manifest(tmp, step, state["world_size"])
        replace_dir(tmp, final, aside=final.with_name(final.name + ".old"))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = [p.name for _, p in list_checkpoints(root)]
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(
            f"{final}: writing the checkpoint failed ({e.strerror or e}); {kept}. Free disk space (or fix the "
            "permissions) and rerun with --resume"
        ) from None
    checkpoint_fault("rotate", step)
    rotate(root, keep_last, newest=final)
    return final


def _projected_prefix(model) -> bool:
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    return bool(getattr(config, "prefix_projection", False))


def _write_prompt_encoder(model, path: Path, adapter_state: dict | None) -> None:
    from safetensors.torch import save_file

    named = adapter_state.items() if adapter_state is not None else model.named_parameters()
    tensors = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in named if n.startswith("prompt_encoder.")}
    save_file(tensors, str(path))


def _leaves(state: dict, prefix: str = ""):
    """(name, value) of a per-parameter optimizer state, nested dicts (bitsandbytes' quantization state) opened."""
    for key, value in state.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def check_finite(model, optimizer, step: int, adapter_state: dict | None = None,
                 optimizer_state: dict | None = None) -> None:
    """No non-finite weight or optimizer moment is ever written (the gathered ones when given)."""
    if adapter_state is None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    else:
        named = list(adapter_state.items())
    moments = optimizer.state.values() if optimizer_state is None else optimizer_state.get("state", {}).values()
    named += [(f"optimizer state {k}", v) for s in moments for k, v in _leaves(s)]
    for name, t in named:
        # Of an FSDP2 DTensor, this process's shard: this runs on rank 0 alone, and nothing here may need the
        # other ranks (tests/distributed/fsdp_check.py checks that it returns while they wait on a file, not a collective).
        t = t.to_local() if hasattr(t, "to_local") else t
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteLossError(
                f"step {step}: {name} holds NaN/Inf; refusing to save it (earlier checkpoints are kept). Likely "
                "causes: learning rate too high (train.learning_rate), float16 overflow (use bfloat16 or float32)"
            )


def _write_manifest(folder: Path, step: int, world_size: int) -> None:
    from datetime import datetime, timezone

    from lorakit.data.sources import content_hash
    from lorakit.versions import package_versions

    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": content_hash(str(p))}
        for p in sorted(folder.rglob("*")) if p.is_file()
    }
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "world_size": world_size,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": package_versions(),
        "files": files,
    }
    path = folder / MANIFEST
    with path.open("w") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())


def rotate(root: Path, keep_last: int, newest: Path) -> None:
    """Delete leftovers of interrupted writes and all but the newest keep_last complete checkpoints."""
    for leftover in [*root.glob("step-*.tmp"), *root.glob("step-*.old")]:
        shutil.rmtree(leftover, ignore_errors=True)
    complete = [p for _, p in list_checkpoints(root) if (p / MANIFEST).is_file()]
    for old in complete[: max(len(complete) - keep_last, 0)]:
        if old != newest:
            shutil.rmtree(old)


def checkpoint_bytes(model, converted: bool = False) -> int:
    """Rough size of one checkpoint: the trainable weights plus AdamW's two moments, and room for the rest;
    ``converted``: a weight-rewriting init's checkpoint also holds the converted adapter, of twice the rank."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return (5 if converted else 3) * trainable + (1 << 20)


def check_free_space(path: Path, per_checkpoint: int, keep_last: int) -> None:
    """Before the first save: room for keep_last checkpoints plus the one being written."""
    probe = Path(path).resolve()
    while not probe.exists():
        probe = probe.parent
    need, free = per_checkpoint * (keep_last + 1), shutil.disk_usage(probe).free
    if free < need:
        mib = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
        raise CheckpointError(
            f"{probe}: {mib(free)} free, but {keep_last + 1} checkpoints of ~{mib(per_checkpoint)} need {mib(need)}; "
            "free disk space, lower train.keep_last, or choose another --output-dir"
        )


# ----------------------------------------------------------------------------------------------------------
# Finding and verifying


# ----------------------------------------------------------------------------------------------------------
# Resuming


