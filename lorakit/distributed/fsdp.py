"""Several processes: what differs from one process, decided before the training loop starts.

accelerate owns the process group and the DDP / FSDP wrapping (launched by torchrun, `accelerate launch` or
`lorakit train --nproc N`); this module builds the Accelerator with the recipe's collective timeout, checks
and prepares FSDP (+ 4-bit) runs, keeps every rank in step when one has no data, gathers sharded adapter
weights for saving, relaunches `lorakit train` on N processes, and turns a dead or stuck rank into one line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from datetime import timedelta

from lorakit.errors import EXIT_CODES, EXIT_UNEXPECTED, DistributedError, UsageError
from lorakit.config.schema import Recipe, TrainSection

# Test-only fault injection (see tests/distributed/test_distributed.py): "die:RANK:STEP" kills that rank with SIGKILL at
# the start of optimizer step STEP (0-based), as the OOM killer would; "hang:RANK:STEP" makes it sleep forever.
FAULT_ENV = "LORAKIT_TEST_FAULT"

# accelerate's mixed_precision values and the parameter dtype FSDP computes in under each.
_MIXED_PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp8": "bfloat16"}


def build_accelerator(cfg: TrainSection):
    """The run's Accelerator: CPU processes talk over gloo, GPUs over NCCL; collectives time out after
    train.ddp_timeout seconds so a dead or stuck rank ends the job instead of hanging it."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.ddp_timeout))
    return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[timeout])


def check_launch(recipe: Recipe) -> None:
    """Before the Accelerator is built: what the launcher asked for (accelerate launch exports its config as
    ACCELERATE_* / FSDP_* variables, which the Accelerator then reads) that this recipe or machine cannot run."""
    if not fsdp_requested():
        return
    check_fsdp(recipe, os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower())
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
    from ``state_dict`` (gather_adapter's result) when FSDP shards it.

    PEFT (0.21) reads a PeftModel's prompt encoders from the model itself, and picks a passed state dict's
    entries by module name stripping only a leading ``_fsdp_wrapped_module.``: under FSDP1, which wraps each
    decoder layer, it writes an empty adapter. So a gathered state dict is saved through the same PEFT model
    built on the meta device (no memory), its weights put in place: PEFT then selects and names the entries
    as for an unsharded model. tests/distributed/fsdp_check.py fails once PEFT no longer needs this.
    """
    from lorakit.adapters import bottleneck

    if state_dict is None or isinstance(model, bottleneck.BottleneckModel):
        model.save_pretrained(out, state_dict=state_dict)
        return
    import copy

    from accelerate import init_empty_weights
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        base = AutoModelForCausalLM.from_config(model.base_model.model.config)
        skeleton = get_peft_model(base, copy.deepcopy(model.peft_config[model.active_adapter]))
    unexpected = skeleton.load_state_dict(state_dict, strict=False, assign=True).unexpected_keys
    if unexpected:  # the adapter's meta tensors became real; every gathered tensor must have found its place
        raise RuntimeError(f"gathered adapter weights the model does not have: {unexpected[:3]}")
    skeleton.save_pretrained(out)


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


def idle_batch(example):
    """A copy of ``example`` that teaches nothing (every label -100, so it adds 0 to the summed loss).

    A rank left without a micro-batch at the end of an epoch, or with fewer eval batches than the others, runs
    this instead: its forward/backward still take part in DDP's all-reduce and FSDP's all-gathers, which
    would otherwise wait for it until train.ddp_timeout.
    """
    from lorakit.data import IGNORE_INDEX

    return dataclasses.replace(example, labels=[IGNORE_INDEX] * len(example.labels))


def eval_shards(num_examples: int, micro_batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """This rank's eval micro-batches (example indices, every world_size-th example): the same number on every
    rank, so sharded forwards line up; an empty list marks a batch to fill with an idle one."""
    mine = list(range(rank, num_examples, world_size))
    count = math.ceil(math.ceil(num_examples / world_size) / micro_batch_size)
    return [mine[i * micro_batch_size : (i + 1) * micro_batch_size] for i in range(count)]


# ----------------------------------------------------------------------------------------------------------
# Failures


@contextmanager
def collective_failures(cfg: TrainSection):
    """Around a whole run: a collective that fails or times out because another rank died or hangs (in setup,
    the loop, an evaluation or a save) becomes one line naming this rank, instead of a gloo/NCCL traceback."""
    import torch.distributed as dist

    try:
        yield
    except (dist.DistError, RuntimeError) as e:
        if not (dist.is_available() and dist.is_initialized()) or not _is_collective_failure(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DistributedError(
            f"rank {dist.get_rank()}: a collective with the other {dist.get_world_size() - 1} rank(s) failed "
            f"({first}); another rank died or did not respond within train.ddp_timeout={cfg.ddp_timeout}s: its "
            "own error, if it had time to print one, is above"
        ) from None


def _is_collective_failure(e: BaseException) -> bool:
    import torch.distributed as dist

    # gloo raises plain RuntimeErrors that name it; NCCL and the process group raise DistError subclasses.
    # The message match stays: a gloo failure (a peer that closed its connection) has no type or attribute of
    # its own, and this only decides how a failure that already ended the run is worded, never whether it does.
    return isinstance(e, dist.DistError) or any(s in str(e) for s in ("gloo", "NCCL", "ProcessGroup"))


def fault_injector(rank: int):
    """Test-only: a per-step hook that kills or hangs this rank when LORAKIT_TEST_FAULT says so (else a no-op)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return lambda step: None
    kind, fault_rank, fault_step = spec.split(":")
    if int(fault_rank) != rank:
        return lambda step: None

    def inject(step: int) -> None:
        if step == int(fault_step):
            if kind == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            # Stuck as in a C call, where Python's SIGTERM handler (GracefulStop) would never run: the launcher's
            # SIGTERM ends it at once instead of after its grace period.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(10**6)

    return inject


# ----------------------------------------------------------------------------------------------------------
# `lorakit train --nproc N`


def strip_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def relaunch(nproc: int, argv: list[str] | None = None) -> None:
    """Run this same command (without --nproc) as ``torchrun --standalone --nproc-per-node N -m lorakit ...``.

    torch's launcher starts the processes, tears all of them down when one fails, and reports which rank
    failed first; we end with that rank's exit code, so a data error on every rank is still exit 3.
    """
    if "LOCAL_RANK" in os.environ:
        raise UsageError("--nproc: this process was already started by a launcher (torchrun / accelerate launch)")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = strip_option(list(sys.argv[1:] if argv is None else argv), "--nproc")
    launch = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "lorakit", *args])
    try:
        run(launch)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        how = f"was killed by {failure.signal_name()}" if code < 0 else f"exited with code {code}"
        raise DistributedError(
            f"rank {rank} (local rank {failure.local_rank}) {how}; the launcher stopped the other ranks "
            "(the failing rank's own error is above)",
            exit_code=code if code in EXIT_CODES and code != 0 else EXIT_UNEXPECTED,
        ) from None
    except SignalException as e:
        raise DistributedError(f"the launcher received {e.sigval.name}; all ranks were stopped") from None
