"""Several processes: what differs from one process, decided before the training loop starts.

accelerate owns the process group and the DDP / FSDP wrapping (launched by torchrun, `accelerate launch` or
`lorakit train --nproc N`); this module builds the Accelerator with the recipe's collective timeout, checks
and prepares FSDP (+ 4-bit) runs, keeps every rank in step when one has no data, gathers sharded adapter
weights for saving, relaunches `lorakit train` on N processes, and turns a dead or stuck rank into one line.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

from lorakit.adapters.files import stable_config
from lorakit.compat import save_gathered_peft_adapter
from lorakit.config.inits import init_name, rewrites_base
from lorakit.config.schema import Recipe, TrainSection
from lorakit.errors import UsageError


# accelerate's mixed_precision values and the parameter dtype FSDP computes in under each.
_MIXED_PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp8": "bfloat16"}


def build_accelerator(cfg: TrainSection, log_with: list | None = None, project_dir: str | None = None):
    """The run's Accelerator: CPU processes talk over gloo, GPUs over NCCL; collectives time out after
    train.ddp_timeout seconds so a dead or stuck rank ends the job instead of hanging it. ``log_with``: the
    experiment trackers (lorakit.training.trackers), which accelerate runs on the main process only."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.ddp_timeout))
    cpu, mixed_precision = not torch.cuda.is_available(), launcher_mixed_precision()
    check_shared_state(mixed_precision, cpu)
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision, kwargs_handlers=[timeout],
                       log_with=log_with or None, project_dir=project_dir)


def launcher_mixed_precision() -> str:
    """lorakit's mixed precision: 'no' (the recipe's model.dtype decides precision), unless a launcher asked for
    one (accelerate launch exports its config's mixed_precision as ACCELERATE_MIXED_PRECISION; check_fsdp vets it)."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()


def check_shared_state(mixed_precision: str, cpu: bool) -> None:
    """accelerate keeps one AcceleratorState per process and never changes it once set: an Accelerator built
    earlier in this process (a transformers/TRL Trainer's, say) would otherwise decide this run's mixed precision
    or device. accelerate offers no public way to start over, so a conflict ends the run (exit 2) naming it."""
    from accelerate.state import AcceleratorState, is_initialized

    if not is_initialized():
        return
    state = AcceleratorState()
    held = []
    if state.mixed_precision != mixed_precision:
        held.append(f"mixed_precision='{state.mixed_precision}' (lorakit trains with '{mixed_precision}')")
    if not cpu and state.device.type == "cpu":
        held.append("the CPU (lorakit trains on the GPU)")
    if held:
        raise UsageError(
            f"accelerate: an earlier Accelerator in this Python process (a transformers or TRL Trainer's, say) set "
            f"accelerate's process-wide state to {' and '.join(held)}, which accelerate cannot change within a "
            "process; run lorakit in a process of its own (`lorakit train RECIPE`) or build the earlier "
            f"Accelerator with mixed_precision='{mixed_precision}'" + ("" if cpu else " on the GPU")
        )


def check_launch(recipe: Recipe) -> None:
    """Before the Accelerator is built: what the launcher asked for (accelerate launch exports its config as
    ACCELERATE_* / FSDP_* variables, which the Accelerator then reads) that this recipe or machine cannot run."""
    if not fsdp_requested():
        return
    check_fsdp(recipe, launcher_mixed_precision())
    import torch

    explicit_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    if not torch.cuda.is_available() and not explicit_cpu:
        # An FSDP config (use_cpu: false) launched where torch sees no GPU.
        raise UsageError(
            "accelerate launch: the accelerate config asks for GPUs, but torch sees none here; on CPU run DDP "
            "with `lorakit train RECIPE --nproc N` (FSDP runs on GPUs only), or check CUDA_VISIBLE_DEVICES"
        )


# ----------------------------------------------------------------------------------------------------------
# FSDP


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (`accelerate launch` with an FSDP config sets this variable)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_fsdp(recipe: Recipe, mixed_precision: str) -> None:
    """Before any model loads: settings FSDP cannot shard, named with their fix (exit 2).

    FSDP shards floating-point tensors only. lorakit stores 4-bit weights in the compute dtype
    (bnb_4bit_quant_storage = model.dtype, see model.build_quant_config) so they shard like the rest of the
    layer; FSDP must then compute in that same dtype, or it casts the packed 4-bit bytes and corrupts them.
    """
    from lorakit.models.loading import build_quant_config, resolve_dtype

    version = os.environ.get("FSDP_VERSION", "1")
    if version not in ("1", "2"):
        raise UsageError(f"fsdp_version: {version} is not an FSDP version; set 1 or 2 in the accelerate config")
    if version == "2" and recipe.model.quantization != "none":
        # FSDP2 shards every parameter as a DTensor; bitsandbytes' quantized parameters are not ones it can shard.
        raise UsageError(
            f"model.quantization: {recipe.model.quantization} weights cannot be sharded by FSDP version 2; use "
            "fsdp_version: 1 (recipes/accelerate/fsdp-qlora.yaml)"
        )
    if version == "1" and recipe.adapter.method == "ia3":
        raise UsageError(
            "adapter.method: ia3 keeps its scaling vectors inside the decoder layers, whose FSDP units (version 1, "
            "use_orig_params: false) must be all frozen or all trainable; use fsdp_version: 2 (it shards per "
            "parameter), lora or dora, or DDP (recipes/accelerate/ddp.yaml) when the model fits on one GPU"
        )
    if recipe.train.optimizer != "adamw":
        # torch's FSDP optimizer-state gathering cannot rebuild bitsandbytes' quantized states on resume.
        raise UsageError(
            f"train.optimizer: {recipe.train.optimizer} cannot be checkpointed under FSDP; use train.optimizer=adamw "
            "(FSDP already shards the optimizer state over the GPUs)"
        )
    init = init_name(recipe.adapter.model_extra or {})
    if rewrites_base(init) or init == "eva":
        raise UsageError(
            f"adapter.init_lora_weights: {init} needs the whole adapter on one process (PEFT's conversion at save, "
            "EVA's SVD), which FSDP shards; use DDP (recipes/accelerate/ddp.yaml) or the default init"
        )
    quantization = recipe.model.quantization
    if quantization == "int8":
        raise UsageError(
            "model.quantization: int8 weights cannot be sharded by FSDP; use nf4 with the fsdp-qlora accelerate "
            "config, or DDP (recipes/accelerate/ddp.yaml) if the model fits on one GPU"
        )
    if quantization not in ("nf4", "fp4"):
        return
    if recipe.model.upcast_unquantized:
        raise UsageError(
            "model.upcast_unquantized: FSDP flattens each decoder layer into one tensor of one dtype, and the upcast "
            "makes its norms float32 beside the model.dtype 4-bit storage; set model.upcast_unquantized=false"
        )
    dtype = resolve_dtype(recipe.model.dtype)
    storage = build_quant_config(recipe.model, dtype).bnb_4bit_quant_storage
    if storage != dtype:
        raise UsageError(
            f"model.quantization: {quantization} under FSDP stores 4-bit weights as {storage}, not the model dtype "
            f"{dtype}; they must match for FSDP to shard them (set bnb_4bit_quant_storage to the compute dtype)"
        )
    wanted = _MIXED_PRECISION_DTYPES.get(mixed_precision)
    if wanted is not None and f"torch.{wanted}" != str(storage):
        name = str(storage).removeprefix("torch.")
        raise UsageError(
            f"model.dtype: {recipe.model.dtype} stores the {quantization} weights as {name}, but the accelerate "
            f"config's mixed_precision {mixed_precision} makes FSDP cast them to {wanted}; set model.dtype={wanted} "
            f"or mixed_precision: 'no' (recipes/accelerate/fsdp-qlora.yaml)"
        )


def prepare_fsdp(accelerator, model) -> None:
    """FSDP1 flattens each wrapped module's parameters into one tensor, which must share requires_grad and
    dtype: PEFT's policy wraps the (trainable, fp32) adapter layers apart from the frozen decoder layers."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP or accelerator.state.fsdp_plugin.fsdp_version != 1:
        return  # FSDP2 shards per parameter and needs no special wrapping
    from peft.utils.other import fsdp_auto_wrap_policy

    accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)


def is_sharded(model) -> bool:
    """Whether FSDP shards ``model``'s weights (as accelerator.prepare returned it, or unwrapped): it is or holds
    FullyShardedDataParallel units (version 1) or modules fully_shard turned into FSDPModules (version 2)."""
    import torch

    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def gather_adapter(model) -> dict | None:
    """Under FSDP: the trainable tensors, whole and under their unsharded names, on rank 0 (an empty dict on
    the other ranks); None when the model is not sharded (its parameters are whole: read them directly).

    Only trainable weights are gathered, so a save moves the adapter, never the frozen base: under FSDP1 the
    units that hold them, one at a time (PEFT's wrap policy gives every adapter layer its own unit); under
    FSDP2 each trainable parameter. A collective: every rank must call it, in the same place.
    """
    if not is_sharded(model):
        return None
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    rank0 = dist.get_rank() == 0
    if not isinstance(model, FSDP):  # FSDP2: parameters keep their names; each is a DTensor shard
        out = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                whole = param.full_tensor() if hasattr(param, "full_tensor") else param  # a collective per tensor
                if rank0:
                    out[name] = whole.detach().to("cpu", copy=True)
        return out
    offload = _on_gpu(model)  # gather GPU shards into host memory, not the GPU's
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for unit in FSDP.fsdp_modules(model):
        # With use_orig_params=False each unit owns one flat parameter, trainable or frozen as a whole.
        if not any(p.requires_grad for p in unit.module.parameters(recurse=False)):
            continue
        prefix = _unsharded_name(names[id(unit)])
        with FSDP.summon_full_params(unit, recurse=False, writeback=False, rank0_only=True, offload_to_cpu=offload):
            if rank0:
                # FSDP names them as unsharded inside this block; nested units stay flat (and are visited apart).
                for name, param in unit.named_parameters():
                    if "_flat_param" not in name:
                        out[f"{prefix}.{name}" if prefix else name] = param.detach().clone()
    return out


def _unsharded_name(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "")


def save_adapter_weights(model, out, state_dict: dict | None = None) -> None:
    """The adapter's own files in ``out`` (PEFT's, or lorakit's bottleneck layout) from the unwrapped model, or
    from ``state_dict`` (gather_adapter's result) when FSDP shards it (through lorakit.compat: PEFT alone
    would save an empty adapter from FSDP1's names).
    """
    from lorakit.adapters import bottleneck

    if isinstance(model, bottleneck.BottleneckModel):
        model.save_pretrained(out, state_dict=state_dict)
        return
    # No copies of the base's embedding matrices: PEFT's "auto" saves both whole (the input embedding and the LM
    # head, 2 GB for Llama-3-8B in bf16) when an adapter targets lm_head or embed_tokens, or when the vocabulary
    # grew. The base holds them already, and an adapter carrying them would put the training base's head back
    # onto whatever base it is loaded on. What lorakit trains there is saved without them: LoRA's A and B, and
    # trainable token rows (model.add_tokens) as rows.
    if state_dict is None:
        model.save_pretrained(out, save_embedding_layers=False)
    else:
        save_gathered_peft_adapter(model, out, state_dict, save_embedding_layers=False)
    stable_config(Path(out))


def optimizer_state(model, optimizer) -> dict:
    """The optimizer's whole state keyed by parameter name (torch.distributed.checkpoint's full optimizer state
    dict), the same with or without FSDP, so a checkpoint resumes under either. Every rank must call it (under
    FSDP it gathers the shards); from GPU shards it is offloaded to host memory and rank 0 alone gets it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper → the torch optimizer
    options = StateDictOptions(full_state_dict=True, cpu_offload=is_sharded(model) and _on_gpu(model))
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Load what optimizer_state saved into this rank's optimizer (its shard under FSDP). A state keyed by
    parameter index (checkpoint format 1, written without FSDP) goes to the optimizer as it is."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    if all(isinstance(k, int) for k in state.get("state", {})) and not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _on_gpu(model) -> bool:
    return next(model.parameters()).device.type != "cpu"


# ----------------------------------------------------------------------------------------------------------
# Keeping ranks in step


# ----------------------------------------------------------------------------------------------------------
# Failures


# ----------------------------------------------------------------------------------------------------------
# `lorakit train --nproc N`


