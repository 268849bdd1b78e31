"""The checkpoint format: directory layout, file names, the JSON+safetensors encoding (no pickle), RNG state.

Layout and resume rules: docs/checkpoints.md.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.adapters import inits
from lorakit.errors import CheckpointError


FORMAT = "lorakit-checkpoint"


# 2: the optimizer state is keyed by parameter name (with or without FSDP); 1 keyed it by index (still read).
FORMAT_VERSION = 2


MANIFEST = "manifest.json"


ADAPTER = "adapter"


# A weight-rewriting init (PiSSA, OLoRA): ADAPTER/ holds the converted plain-LoRA delta on the original base, the
# adapter any tool or loader can use, and RESIDUAL_ADAPTER/ the trained B, A on the residual base W − s·B₀A₀,
# which is what training continues from. The name lives with the inits (merge names it in its refusal).
RESIDUAL_ADAPTER = inits.RESIDUAL_ADAPTER


STATE = "trainer_state.json"


RECIPE = "recipe.yaml"


# Every complete checkpoint has these and one adapter layout; optimizer/scheduler/rng tensors live in
# NAME.safetensors next to NAME.json.
REQUIRED = ("optimizer.json", "scheduler.json", "rng.json", "rng.safetensors", STATE, RECIPE)





# Prefix tuning with prefix_projection: PEFT saves only the projection's output, from which training cannot
# continue; the prompt encoder's own weights (embedding + MLP) go to ADAPTER/PROMPT_ENCODER beside it.
PROMPT_ENCODER = "prompt_encoder.safetensors"


# Recipe keys that may differ on resume: they change what is written or shown, never the trained weights. A
# tracker added on resume starts its own run; output.project is not here, as the tracker runs a resume continues
# (DIR/trackers.json) live in the old project (resume.WHY_FIXED).
COSMETIC_KEYS = frozenset({
    "output.dir", "output.save", "output.tensorboard", "output.report_to",
    "train.log_every", "train.eval_every", "train.save_every", "train.save_each_epoch", "train.keep_last",
    "train.ddp_timeout",
    "data.num_proc", "data.cache",  # how the data is tokenized, not what: the data fingerprint checks the content
})


# Test-only fault injection (docs/checkpoints.md): ACTION:POINT[:STEP], e.g. kill:optimizer:9 or enospc:rng.
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass
class TrainState:
    """Where a run stands between two optimizer steps; what fit() starts from."""

    step: int = 0
    tokens_seen: int = 0
    checkpoint: Path | None = None  # the newest complete checkpoint of this run, if any


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
