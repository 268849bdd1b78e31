"""Speed: the optional speed knobs, and how fast a run went against the machine's limit (FLOPs, MFU, memory).

Model FLOPs count the work a step needs, not what the kernels happened to do: per input token 2N forward
and 2N backward for the frozen body (activation gradients only) plus 2 per trainable parameter for weight
gradients, +2N with activation checkpointing; the LM head only at supervised positions; causal attention
per (query, key) pair of the same example. MFU divides the achieved rate by the device's peak: a datasheet
bf16/fp16 figure for known GPUs, otherwise a short matmul probe measured in this process at the run's dtype.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lorakit.adapters.dropout import use_lora_dropout
from lorakit.data.formats import num_targets
from lorakit.models.attention import varlen_name
from lorakit.errors import UsageError
from lorakit.training.loss import eval_mode, prompt_learning_method

# Dense bf16/fp16 tensor-core peaks from the vendors' datasheets, FLOP/s; matched by substring of the
# device name, first match wins (so "H100 PCIe" precedes "H100").
GPU_PEAK_BF16 = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("H20", 148e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A6000", 155e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
)


# ----------------------------------------------------------------------------------------------------------
# Speed knobs (train.compile, train.liger) and LoRA's cheaper CPU dropout masks (always); model.attn_implementation is
# applied when the model is loaded


def apply_speed_knobs(model, compile: bool, liger: bool) -> None:
    """LoRA dropout with 16-bit masks (lorakit.adapters.dropout), Liger's kernels, then torch.compile, applied in
    place to the PEFT model (its identity and keys kept)."""
    use_lora_dropout(model)
    if liger:
        apply_liger(model)
    if compile:
        model.compile()  # nn.Module.compile: in place; sizes that vary between batches become dynamic


def apply_liger(model) -> None:
    if not torch.cuda.is_available():
        raise UsageError(
            "train.liger: Liger's kernels are Triton GPU kernels and no GPU is visible; set train.liger: false"
        )
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        raise UsageError(
            "train.liger: liger-kernel is not installed; pip install liger-kernel, or set train.liger: false"
        ) from None
    # The loss is lorakit's (train.chunked_loss picks Liger's fused loss itself), so only the layer kernels here.
    # transformers' Trainer applies Liger through this same entry point.
    _apply_liger_kernel_to_instance(model=model.get_base_model(), cross_entropy=False, fused_linear_cross_entropy=False)


def padding_free_supported(model) -> bool:
    """Does the model keep flattened examples apart? (data.padding_free, with a varlen attention kernel)

    transformers runs varlen flash attention (or a block mask for flex) from restarting position_ids,
    without a KV cache or 2D mask. Prompt/prefix tuning prepends virtual tokens and PEFT drops the position
    ids: never. Otherwise the probe below, where the kernel can run: weights still on the CPU (they reach the
    GPU at accelerator.prepare, after this decision) cannot run flash kernels, and there transformers'
    varlen contract is trusted.
    """
    if prompt_learning_method(model):
        return False
    if not model.get_input_embeddings().weight.is_cuda:
        return True
    return flattening_probe(model)


@torch.no_grad()
def flattening_probe(model, flattened_attention: str | None = None) -> bool:
    """In a row [a, b] with positions restarting at b, b's logits must be those of b alone; without the
    restart they differ, and that difference is the scale of a wrong answer. With ``flattened_attention``
    the row runs through that implementation and b alone through the model's own (left switched when the
    probe passes): the kernel is checked, not only the layout. Eval mode: no dropout."""
    embeddings = model.get_input_embeddings().weight
    vocab, device = embeddings.shape[0], embeddings.device
    a = (torch.arange(5, device=device) * 7919 + 3) % vocab
    b = (torch.arange(4, device=device) * 104729 + 11) % vocab
    row, restart = torch.cat([a, b])[None], torch.cat([torch.arange(5), torch.arange(4)]).to(device)[None]
    base, own = model.get_base_model() if hasattr(model, "get_base_model") else model, model.config._attn_implementation
    kept = False
    try:
        with eval_mode(model):
            alone = model(input_ids=b[None]).logits[0].float()
            if flattened_attention:
                base.set_attn_implementation(flattened_attention)
            flat = model(input_ids=row, position_ids=restart).logits[0, 5:].float()
            mixed = model(input_ids=row).logits[0, 5:].float()
        kept = bool((flat - alone).abs().max() <= 0.1 * (mixed - alone).abs().max())
    except (TypeError, ValueError):  # a forward that takes no position_ids cannot be flattened: kept stays False
        pass
    finally:
        if flattened_attention and not kept:
            base.set_attn_implementation(own)
    return kept


@dataclass
class Batching:
    """How micro-batches are laid out (data.padding_free, data.packing), decided once before the loop."""

    padding_free: bool
    lengths: list[int] | None  # StepSampler(lengths=...): grouped by length (data.group_by_length only)
    note: str = ""


# Attention kernels of transformers that attend only inside each flattened example (varlen / block-sparse).
VARLEN_ATTENTION = ("flash", "flex_attention")


def choose_batching(recipe, model, group_lengths: list[int] | None) -> Batching:
    """Flattened micro-batches (data.padding_free; packed rows always) where the attention keeps examples apart
    at Σ Lᵢ² cost: flash/flex by their own varlen paths, sdpa/eager switched to lorakit.models.attention's per-example
    variant (checked by the probe). Padded otherwise. The order is the seeded permutation unless
    data.group_by_length (``group_lengths``): grouping by length biases each step wherever length correlates
    with the target, so it is never chosen for speed alone."""
    data = recipe.data
    order = "grouped by length" if group_lengths is not None else "random order"
    if not (data.padding_free or data.packing):
        return Batching(False, group_lengths, f"padded, {order} (data.padding_free: false)")
    attention = getattr(model.config, "_attn_implementation", None) or "sdpa"
    layout = "packed rows" if data.packing else "each micro-batch"
    varlen = varlen_name(attention)
    if varlen and not prompt_learning_method(model) and flattening_probe(model, varlen):
        return Batching(True, group_lengths,
                        f"padding-free, {order}: {layout} flattened into one row (per-example {attention} attention)")
    if varlen is None and any(kind in attention for kind in VARLEN_ATTENTION) and padding_free_supported(model):
        return Batching(True, group_lengths, f"padding-free, {order}: {layout} flattened into one row ({attention})")
    if data.packing:
        return Batching(True, group_lengths,
                        f"packed rows flattened, {order} ({attention} attention over whole rows, block-diagonal mask)")
    return Batching(False, group_lengths, f"padded, {order} (the model mixes flattened examples)")


# ----------------------------------------------------------------------------------------------------------
# Measurement


@dataclass
class Work:
    """What the steps processed: input tokens, supervised targets and causal attention pairs."""

    tokens: int = 0
    targets: int = 0
    attention_pairs: int = 0

    def add(self, examples) -> None:
        for e in (s for example in examples for s in example.sequences):  # a preference pair: both sequences
            start = 0
            for n in getattr(e, "seq_lens", None) or [len(e.input_ids)]:  # a packed row: each example in it
                self.tokens += n
                self.targets += num_targets(e.labels[start : start + n])
                self.attention_pairs += n * (n + 1) // 2
                start += n


@dataclass
class ModelShape:
    body: int  # parameters of the matmuls before the head (embeddings excluded: a lookup costs no FLOPs)
    head: int
    trainable: int
    layers: int
    attention_width: int  # heads × head_dim: the width of QKᵀ and AV
    reference_forward: bool = False  # DPO/IPO's live reference: one more forward of the base per step, no backward

    @classmethod
    def of(cls, model, reference_forward: bool = False) -> "ModelShape":
        trainable, total = model.get_nb_trainable_parameters()
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        head_count = head.shape[0] * head.shape[1]
        body = total - embed.numel() - (0 if head is embed else head_count)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(body, head_count, trainable, config.num_hidden_layers, heads * head_dim, reference_forward)

    def flops(self, work: Work, checkpointing: bool) -> float:
        forward = 2 * self.body * work.tokens + 2 * self.head * work.targets
        attention = 4 * self.attention_width * self.layers * work.attention_pairs
        backward = 2 * self.body * work.tokens + 2 * self.trainable * work.tokens + 2 * self.head * work.targets
        recompute = 2 * self.body * work.tokens + attention if checkpointing else 0
        # The reference is the model with its adapter switched off: the body without the adapter's matmuls.
        reference = (2 * (self.body - self.trainable) * work.tokens + 2 * self.head * work.targets + attention
                     if self.reference_forward else 0)
        return float(forward + attention + backward + 2 * attention + recompute + reference)


class StepMeter:
    """Accumulates the work and the wall time of optimizer steps (evaluation and checkpoints left out)."""

    def __init__(self, shape: ModelShape):
        # The shape is taken before accelerator.prepare: FSDP1 flattens and shards the parameters.
        self.shape = shape
        self.work, self.seconds, self.cpu_seconds = Work(), 0.0, 0.0
        self._t0 = self._cpu0 = 0.0

    def start(self) -> None:
        self._t0, self._cpu0 = time.perf_counter(), time.process_time()

    def stop(self, examples) -> None:
        self.seconds += time.perf_counter() - self._t0
        self.cpu_seconds += time.process_time() - self._cpu0  # < seconds × threads when the CPU is shared
        self.work.add(examples)

    def record(self, step: int, checkpointing: bool, dtype: torch.dtype, accelerator) -> dict:
        """The efficiency record of the whole run; collective (call it on every rank)."""
        counts = torch.tensor([self.work.tokens, self.work.targets, self.work.attention_pairs], dtype=torch.float64)
        if accelerator.num_processes > 1:
            counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
        work = Work(*(int(c) for c in counts.tolist()))
        record = efficiency(step, work, self.seconds, self.shape, checkpointing, accelerator.device, dtype,
                            accelerator.num_processes)
        return {**record, "train_cpu_seconds": round(self.cpu_seconds, 3)}


def matmul_probe(device: torch.device, dtype: torch.dtype, seconds: float = 0.2) -> float:
    """Best FLOP/s of square matmuls at ``dtype`` on ``device`` over about ``seconds``."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best, deadline = 0.0, time.perf_counter() + seconds
    a @ b  # warm-up: kernel selection, thread pool
    while time.perf_counter() < deadline:
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(FLOP/s, where the figure comes from) for one device at ``dtype``."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16:
            if key in name:
                return value, f"datasheet {name} dense bf16"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    return matmul_probe(device, dtype), f"matmul probe, {str(dtype).removeprefix('torch.')}, {where}"


def efficiency(step: int, work: Work, seconds: float, shape: ModelShape, checkpointing: bool,
               device: torch.device, dtype: torch.dtype, world_size: int = 1) -> dict:
    """The end-of-run record for metrics.jsonl (``work`` summed over all ranks)."""
    flops = shape.flops(work, checkpointing)
    peak, source = peak_flops(device, dtype)
    seconds = max(seconds, 1e-9)
    achieved = flops / seconds
    return {
        "step": step,
        "tokens_per_s": round(work.targets / seconds, 2),  # supervised, as in the per-step records
        "input_tokens_per_s": round(work.tokens / seconds, 2),
        "flops_per_token": round(flops / max(work.tokens, 1)),
        "achieved_flops": round(achieved),
        "peak_flops": round(peak * world_size),
        "peak_flops_source": source + (f" × {world_size}" if world_size > 1 else ""),
        # A probe can measure no throughput at all (float16 matmuls on some CPUs): then there is no MFU to give.
        "mfu": round(achieved / (peak * world_size), 4) if peak > 0 else None,
        "train_seconds": round(seconds, 3),
    }


def describe(record: dict) -> str:
    mfu = (f"MFU {100 * record['mfu']:.1f}% of {_si(record['peak_flops'])}FLOP/s" if record["mfu"] is not None
           else "MFU unknown (no peak measured)")
    return (
        f"efficiency: {record['input_tokens_per_s']:,.0f} tokens/s ({record['tokens_per_s']:,.0f} supervised/s), "
        f"{_si(record['flops_per_token'])}FLOP/token, {_si(record['achieved_flops'])}FLOP/s = {mfu} "
        f"({record['peak_flops_source']})"
    )


def _si(value: float) -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}"
    return f"{value:.3g} "


class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of the tensors torch ops allocate while the mode is active.

    Each new storage (an op output whose storage is none of its inputs') is counted once, and uncounted
    when Python frees it, so views and in-place results cost nothing and tensors made before the mode
    (loaded weights) are left out. CPU has no allocator statistics: this is the tensor peak there.
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._counted: weakref.WeakSet = weakref.WeakSet()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if _has_storage(t)}
        for t in tree_flatten(out)[0]:
            if _has_storage(t):
                storage = t.untyped_storage()
                if id(storage) not in inputs and storage not in self._counted:
                    self._count(storage)
        return out

    def _count(self, storage) -> None:
        nbytes = storage.nbytes()
        self._counted.add(storage)
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, nbytes)

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes


def _has_storage(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type != "meta" and not t.is_sparse
