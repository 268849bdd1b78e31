"""Resumable checkpoints: DIR/checkpoints/step-NNNNNN/ holds everything needed to continue bitwise-exactly.

A checkpoint is written into step-NNNNNN.tmp/, every file fsynced, manifest.json (size and sha256 of every
file) written last, then renamed and the parent fsynced: a step-NNNNNN directory whose files match its
manifest is complete; anything else is reported and never resumed from. No pickle: tensors go to
safetensors, everything else to JSON. Layout and resume rules: docs/checkpoints.md.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lorakit.adapters import bottleneck
from lorakit.distributed import fsdp as distributed
from lorakit.atomic import fsync_files, replace_dir
from lorakit.errors import CheckpointError, NonFiniteLossError, first_line

FORMAT = "lorakit-checkpoint"
# 2: the optimizer state is keyed by parameter name (with or without FSDP); 1 keyed it by index (still read).
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
ADAPTER = "adapter"
STATE = "trainer_state.json"
RECIPE = "recipe.yaml"
# Every complete checkpoint has these and one adapter layout; optimizer/scheduler/rng tensors live in
# NAME.safetensors next to NAME.json.
REQUIRED = ("optimizer.json", "scheduler.json", "rng.json", "rng.safetensors", STATE, RECIPE)
# ADAPTER/ as the model's own save_pretrained writes it, (config, weights): PEFT's, or lorakit's bottleneck.
ADAPTER_LAYOUTS = (
    ("adapter_config.json", "adapter_model.safetensors"),
    (bottleneck.CONFIG_NAME, bottleneck.WEIGHTS_NAME),
)
# Prefix tuning with prefix_projection: PEFT saves only the projection's output, from which training cannot
# continue; the prompt encoder's own weights (embedding + MLP) go to ADAPTER/PROMPT_ENCODER beside it.
PROMPT_ENCODER = "prompt_encoder.safetensors"
# Recipe keys that may differ on resume: they change what is written or shown, never the trained weights.
COSMETIC_KEYS = frozenset({
    "output.dir", "output.save", "output.tensorboard",
    "train.log_every", "train.eval_every", "train.save_every", "train.save_each_epoch", "train.keep_last",
    "train.ddp_timeout",
})
# Test-only fault injection (docs/checkpoints.md): ACTION:POINT[:STEP], e.g. kill:optimizer:9 or enospc:rng.
FAULT_ENV = "LORAKIT_TEST_CHECKPOINT_FAULT"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass
class TrainState:
    """Where a run stands between two optimizer steps; what fit() starts from."""

    step: int = 0
    tokens_seen: int = 0
    checkpoint: Path | None = None  # the newest complete checkpoint of this run, if any


# ----------------------------------------------------------------------------------------------------------
# State dicts without pickle: tensors to safetensors, the rest to JSON (int dict keys and tuples kept)


def _encode(obj: Any, path: str, tensors: dict) -> Any:
    if isinstance(obj, torch.Tensor):
        # A copy: FSDP's gathered optimizer moments can be views of one flat tensor, which safetensors refuses.
        tensors[path] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        items = [[k, _encode(v, f"{path}.{k}", tensors)] for k, v in obj.items()]
        return dict(items) if all(isinstance(k, str) for k in obj) else {"__items__": items}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint: {path} is a {type(obj).__name__}, which cannot be stored without pickle")


def _decode(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: _decode(v, tensors) for k, v in obj["__items__"]}
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=obj["dtype"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _write_piece(folder: Path, name: str, obj: Any) -> None:
    from safetensors.torch import save_file

    tensors: dict = {}
    meta = _encode(obj, name, tensors)
    if tensors:
        save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(meta) + "\n")


def _read_piece(folder: Path, name: str) -> Any:
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / f"{name}.json").read_text())
        tensor_file = folder / f"{name}.safetensors"
        return _decode(meta, load_file(str(tensor_file)) if tensor_file.exists() else {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{folder}: {name} cannot be read ({type(e).__name__}: {e}); the checkpoint is corrupt or foreign"
        ) from None


# ----------------------------------------------------------------------------------------------------------
# RNG states


def capture_rng() -> dict:
    """This process's RNG states: python, numpy, torch CPU and every CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


# ----------------------------------------------------------------------------------------------------------
# Writing


def trainer_state(step: int, tokens_seen: int, sampler, model, metrics_path: Path, adapter_state=None) -> dict:
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
) -> Path:
    """Write DIR/checkpoints/step-NNNNNN atomically, then drop the oldest beyond keep_last; returns its path.

    The caller gathers what every rank must take part in (train.save_checkpoint) and passes it: under FSDP
    ``adapter_state`` (distributed.gather_adapter), and ``optimizer_state`` (distributed.optimizer_state);
    without them both are read from ``model`` and ``optimizer`` (one process).
    """
    optimizer_state = distributed.optimizer_state(model, optimizer) if optimizer_state is None else optimizer_state
    check_finite(model, optimizer, step, adapter_state, optimizer_state)
    final = root / checkpoint_name(step)
    tmp = final.with_name(final.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _fault("adapter", step)
        distributed.save_adapter_weights(model, tmp / ADAPTER, adapter_state)
        if _projected_prefix(model):
            _write_prompt_encoder(model, tmp / ADAPTER / PROMPT_ENCODER, adapter_state)
        _fault("optimizer", step)
        _write_piece(tmp, "optimizer", optimizer_state)
        _fault("scheduler", step)
        _write_piece(tmp, "scheduler", scheduler.state_dict())
        if scaler is not None:
            _write_piece(tmp, "scaler", scaler.state_dict())
        _fault("rng", step)
        _write_piece(tmp, "rng", {"ranks": rng_states})
        (tmp / STATE).write_text(json.dumps(state, indent=1) + "\n")
        (tmp / RECIPE).write_text(recipe_text)
        fsync_files(tmp)
        _fault("manifest", step)
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
    _fault("rotate", step)
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


def _fault(point: str, step: int) -> None:
    """Test-only: LORAKIT_TEST_CHECKPOINT_FAULT=kill:POINT[:STEP] SIGKILLs this process, enospc:POINT[:STEP] fails the write."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    action, where, at = (spec.split(":") + ["", ""])[:3]
    if where != point or (at and int(at) != step):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), point)


def checkpoint_bytes(model) -> int:
    """Rough size of one checkpoint: the trainable weights plus AdamW's two moments, and room for the rest."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return 3 * trainable + (1 << 20)


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


@dataclass
class Checkpoint:
    path: Path
    step: int
    manifest: dict

    @property
    def state(self) -> dict:
        try:
            return json.loads((self.path / STATE).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: {STATE} cannot be read ({e}); the checkpoint is corrupt") from None

    @property
    def recipe_text(self) -> str:
        return (self.path / RECIPE).read_text()


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step-NNNNNN directory (complete or not), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def verify_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint at ``path`` if its manifest is valid and every file matches it; CheckpointError otherwise."""
    from lorakit.data.sources import content_hash

    def bad(reason: str) -> CheckpointError:
        return CheckpointError(f"{path}: {reason}")

    if not path.is_dir():
        raise bad("not found or not a directory")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise bad(f"no {MANIFEST}: an interrupted write, or not a lorakit checkpoint") from None
    except (OSError, ValueError):
        raise bad(f"{MANIFEST} is not valid JSON: the checkpoint is corrupt") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise bad(f"{MANIFEST} is not a lorakit checkpoint manifest (a foreign directory)")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise bad(f"written by a newer lorakit (format {manifest['format_version']}); upgrade lorakit to resume it")
    files = manifest.get("files") or {}
    for name in (*adapter_files(files), *REQUIRED):
        if name not in files:
            raise bad(f"incomplete: {name} is not in {MANIFEST}")
    for name, meta in files.items():
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not isinstance(meta, dict):
            raise bad(f"{MANIFEST} lists {name!r}, which is not a file of this checkpoint (a forged manifest)")
        if not file.is_file():
            raise bad(f"{name} is missing (listed in {MANIFEST})")
        if file.stat().st_size != meta.get("size"):
            raise bad(f"{name} is {file.stat().st_size} bytes, {MANIFEST} says {meta.get('size')}: truncated or modified")
        if content_hash(str(file)) != meta.get("sha256"):
            raise bad(f"{name} does not match its sha256 in {MANIFEST}: corrupt or modified")
    return Checkpoint(path, int(manifest.get("step", -1)), manifest)


def adapter_files(names) -> tuple[str, str]:
    """The (config, weights) paths of the adapter layout whose config is among ``names`` (PEFT's when none is)."""
    for config, weights in ADAPTER_LAYOUTS:
        if f"{ADAPTER}/{config}" in names:
            return f"{ADAPTER}/{config}", f"{ADAPTER}/{weights}"
    return f"{ADAPTER}/{ADAPTER_LAYOUTS[0][0]}", f"{ADAPTER}/{ADAPTER_LAYOUTS[0][1]}"


def latest_checkpoint(root: Path, say: Callable[[str], None]) -> Checkpoint | None:
    """The newest complete checkpoint under ``root``; incomplete or corrupt ones are reported and skipped."""
    for leftover in sorted(root.glob("step-*.tmp")) if root.is_dir() else []:
        say(f"skipping {leftover}: an interrupted checkpoint write (no manifest)")
    for _, path in reversed(list_checkpoints(root)):
        try:
            return verify_checkpoint(path)
        except CheckpointError as e:
            say(f"skipping {e}")
    return None


def select_checkpoint(root: Path, explicit: Path | None, say: Callable[[str], None]) -> Checkpoint:
    """The checkpoint `--resume [PATH]` continues from: the given one, or the newest complete one."""
    if explicit is not None:
        return verify_checkpoint(Path(explicit))
    found = latest_checkpoint(root, say)
    if found is None:
        raise CheckpointError(
            f"{root}: no complete checkpoint to resume from; start over without --resume (with --overwrite to "
            "replace this run), or give one with --resume PATH"
        )
    return found


def set_aside_newer(root: Path, step: int, say: Callable[[str], None]) -> None:
    """Resuming from an older checkpoint: move newer step dirs out of the way (kept, never resumed from)."""
    newer = [p for s, p in list_checkpoints(root) if s > step]
    if not newer:
        return
    aside = root / time.strftime("superseded-%Y%m%d-%H%M%S")
    aside.mkdir(exist_ok=True)
    for path in newer:
        path.rename(aside / path.name)
    say(f"moved {', '.join(p.name for p in newer)} to {aside} (newer than the checkpoint resumed from)")


# ----------------------------------------------------------------------------------------------------------
# Resuming


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recipe_changes(old: dict, new: dict) -> list[str]:
    """``key: old → new`` for every recipe key that differs, cosmetic keys (COSMETIC_KEYS) aside."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    changes = []
    for key in sorted(set(flat_old) | set(flat_new)):
        a, b = flat_old.get(key, "<unset>"), flat_new.get(key, "<unset>")
        if key not in COSMETIC_KEYS and a != b:
            changes.append(f"{key}: {a!r} → {b!r}")
    return changes


def check_resume(ckpt: Checkpoint, recipe, world_size: int, allow_change: bool, say, fsdp: bool = False) -> bool:
    """Refuse (exit 4) a resume under a changed recipe or world size unless allowed; True when something changed.

    With or without FSDP makes no difference (the optimizer state is keyed by parameter name), except for a
    format-1 checkpoint, keyed by index, which FSDP cannot take."""
    import yaml

    from lorakit.errors import RecipeError
    from lorakit.config.load import parse_recipe

    old: Any = {}
    try:
        old = yaml.safe_load(ckpt.recipe_text) or {}
        old = parse_recipe(old).model_dump(mode="json")  # fills keys added since the checkpoint with defaults
    except (RecipeError, yaml.YAMLError, AttributeError):
        pass  # compare what is there; every difference is listed
    changes = recipe_changes(old if isinstance(old, dict) else {}, recipe.model_dump(mode="json"))
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
    shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
    if not allow_change:
        raise CheckpointError(
            f"{ckpt.path}: cannot resume, the run changed since this checkpoint ({shown}); undo the change, or pass "
            "--allow-recipe-change to continue under the new settings (the result then differs from an "
            "uninterrupted run)"
        )
    say(f"resuming under changed settings (--allow-recipe-change): {shown}")
    return True


def restore_adapter(ckpt: Checkpoint, *, model, sampler, changed: bool, say) -> None:
    """Check the checkpoint fits this model and data, and load its adapter weights into ``model`` in place.

    Called before accelerator.prepare: FSDP then shards the restored weights (and DDP broadcasts them).
    """
    state = ckpt.state
    _check_same_parameters(ckpt, state, model)
    _check_same_data(ckpt, state, sampler, changed, say)
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


def _load_adapter(ckpt: Checkpoint, model) -> None:
    from safetensors.torch import load_file

    _, weights_file = adapter_files(ckpt.manifest["files"])
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
