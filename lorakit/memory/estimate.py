"""Training memory, line by line: weights, adapter, gradients, optimizer states, activations, loss buffers,
backward working set and runtime overhead, each with its formula; totals per GPU for DDP and FSDP.

`estimate` turns a ModelProfile (lorakit.memory.profile: exact counts from a meta-device build) and the knobs
(batch, sequence, precision, optimizer, checkpointing, GPUs) into those lines. Activation formulas count the
tensors autograd keeps for backward; scripts/bench_memory.py measures them against real training steps.
"""

from __future__ import annotations

import math
from dataclasses import replace

from lorakit.errors import UsageError
from lorakit.memory.activations import _tokens, act_bytes, activations, loss_path
from lorakit.memory.lines import ADAPTER_BYTES, DTYPE_BYTES, Estimate, LOGITS_BYTES, Line, OVERHEAD_BYTES, Settings, gib
from lorakit.memory.profile import DQ_BLOCK, NF4_BLOCK, ModelProfile

OPT8_BLOCK, OPT8_MIN_NUMEL, PAGED_MIN_NUMEL = 256, 4096, 100_000  # bitsandbytes 8-bit optimizer constants


# ----------------------------------------------------------------------------------------------------------
# Breakdown lines


def weights_line(p: ModelProfile, s: Settings) -> Line:
    e, q = DTYPE_BYTES[s.dtype], p.quantizable
    rest = p.base_params - q.numel
    kept_bytes, kept_dtype = (4, "float32") if s.upcast_unquantized else (e, s.dtype)
    kept = f"{rest:,} params bitsandbytes leaves unquantized (embeddings, LM head, norms, biases) × {kept_bytes} B" + (
        ": model.upcast_unquantized casts them to fp32" if s.upcast_unquantized else f" ({s.dtype})"
    )
    if s.quantization == "none" or s.method == "full":
        parts = {s.dtype: p.base_params * e}
        formula = f"{p.base_params:,} params × {e} B ({s.dtype})"
    elif s.quantization == "int8":
        parts = {"int8": q.numel, "int8_row_scales": 4 * q.rows}
        parts[kept_dtype] = parts.get(kept_dtype, 0) + rest * kept_bytes
        formula = f"{q.numel:,} linear weights × 1 B (int8) + {q.rows:,} rows × 4 B (fp32 scale per row) + {kept}"
    else:
        if s.double_quant:
            consts = q.blocks + 4 * q.blocks2 + q.tensors * (4 + 1024 + 64)
            how = (
                f"{q.blocks:,} blocks of {NF4_BLOCK} × 1 B (8-bit absmax) + {q.blocks2:,} blocks of {DQ_BLOCK} "
                f"× 4 B (fp32 second-level absmax) + {q.tensors:,} tensors × 1,092 B (offset, code tables)"
            )
        else:
            consts = 4 * q.blocks + 64 * q.tensors
            how = (
                f"{q.blocks:,} blocks of {NF4_BLOCK} × 4 B (fp32 absmax) + {q.tensors:,} tensors × 64 B (code table)"
            )
        parts = {s.quantization: q.packed_bytes, f"{s.quantization}_constants": consts, kept_dtype: rest * kept_bytes}
        formula = f"{q.numel:,} quantized params × 0.5 B ({s.quantization}) + constants [{how}] + {kept}"
    if p.buffer_bytes:
        parts["float32_buffers"] = p.buffer_bytes
        formula += f" + {p.buffer_bytes:,} B of buffers (rotary tables)"
    return Line("weights", "base weights", sum(parts.values()), formula, parts)


def _trainable(p: ModelProfile, s: Settings) -> tuple[tuple, int, str]:
    """(tensor sizes, bytes per element, dtype name) of what the optimizer updates."""
    if s.method == "full":
        return p.base_tensors, DTYPE_BYTES[s.dtype], s.dtype
    return p.adapter_tensors, ADAPTER_BYTES, "float32"


def adapter_line(p: ModelProfile, s: Settings) -> Line:
    if s.method == "full":
        return Line("adapter_weights", "adapter weights", 0, "none: full fine-tuning trains the base weights")
    n = sum(p.adapter_tensors)
    return Line(
        "adapter_weights", "adapter weights", n * ADAPTER_BYTES,
        f"{n:,} trainable params × {ADAPTER_BYTES} B (PEFT keeps adapter weights in float32)",
    )


def gradients_line(p: ModelProfile, s: Settings) -> Line:
    tensors, b, dtype = _trainable(p, s)
    n = sum(tensors)
    return Line("gradients", "gradients", n * b, f"{n:,} trainable params × {b} B ({dtype}, one gradient each)")


def optimizer_line(p: ModelProfile, s: Settings) -> Line:
    tensors, b, dtype = _trainable(p, s)
    n = sum(tensors)
    if s.optimizer == "adamw":
        total = 2 * n * b + 4 * len(tensors)
        return Line(
            "optimizer_states", "optimizer states", total,
            f"AdamW: 2 moments × {n:,} params × {b} B ({dtype}, torch keeps them in the parameter dtype) "
            f"+ {len(tensors):,} step counters × 4 B",
        )
    big = [t for t in tensors if t >= OPT8_MIN_NUMEL]
    small = n - sum(big)
    blocks = sum(math.ceil(t / OPT8_BLOCK) for t in big)
    total = 2 * sum(big) + 8 * blocks + 8 * small + 2 * 256 * 4
    parts = {"8bit": 2 * sum(big) + 8 * blocks, "float32": 8 * small, "quantization_maps": 2048}
    formula = (
        f"bitsandbytes 8-bit AdamW: 2 moments × {sum(big):,} params × 1 B + {blocks:,} blocks of {OPT8_BLOCK} "
        "× 2 × 4 B "
        f"(absmax) + {small:,} params in tensors under {OPT8_MIN_NUMEL:,} elements × 8 B (kept in fp32) + 2 KiB maps"
    )
    if s.optimizer == "paged_adamw_8bit":
        paged = [t for t in big if t >= PAGED_MIN_NUMEL]
        parts["pageable"] = 2 * sum(paged) + 8 * sum(math.ceil(t / OPT8_BLOCK) for t in paged)
        formula += (
            f"; paged: {gib(parts['pageable'])} of it (tensors ≥ {PAGED_MIN_NUMEL:,} elements) lives in unified "
            "memory that the driver can evict to CPU RAM under pressure"
        )
    return Line("optimizer_states", "optimizer states", total, formula, parts)


def logits_line(p: ModelProfile, s: Settings) -> Line:
    if loss_path(p, s) == "chunked":
        return _chunked_loss_line(p, s)
    g, T, e = p.geometry, _tokens(s), act_bytes(s)
    n = LOGITS_BYTES * T * g.vocab + 16 * T
    f = (
        f"plain loss: {LOGITS_BYTES} B × T·V = {LOGITS_BYTES} × {T:,} × {g.vocab:,} (fp32 log-softmax kept for "
        "backward, then its gradient and the logits' gradient, all live at the start of backward) + 16 B × T (labels)"
    )
    if g.logit_softcap:
        n += 2 * T * g.vocab * e
        f += f" + 2 × T·V·{e} (final-logit soft-capping: tanh output and its gradient)"
    return Line("logits_and_loss", "logits and loss", n, f)


def _chunk_peak(chunks: list, vocab: int, hidden: int, e: int, device: str, head_grad: int) -> int:
    """Most bytes alive at once in lorakit.training.loss's chunk loop, given each chunk's rows (``head_grad``: one
    chunk's contribution to a trainable head's gradient)."""
    cast = e if e != 4 else 0  # the logits are upcast to fp32 and the gradient cast back to the model dtype

    def made(rows):  # logits being made: the model-dtype product and its fp32 copy (a GPU's logsumexp: a temporary)
        return rows * vocab * max(4 + cast, 8 if device == "cuda" else 4)

    def kept(rows):  # a chunk's fp32 logits (turned into the gradient in place) and their cast
        return rows * vocab * (4 + cast)

    def done(rows):  # ... while its rows of the hidden states' gradient (then the head's) are computed
        return kept(rows) + max(rows * hidden * e, head_grad)

    if not chunks:  # one-token sequences: nothing to predict
        return 0
    peaks = [made(chunks[0]), done(chunks[0])]
    for before, rows in zip(chunks, chunks[1:]):  # the previous chunk's names are rebound only after the next
        peaks += [kept(before) + made(rows), done(rows)]
    return max(peaks)


def _blocked_peak(n: int, rows: int, block: int, hidden: int, e: int) -> int:
    """Most bytes alive at once in lorakit.training.loss._blocked_logps (a frozen head on a CPU) over ``n`` rows in
    chunks of ``rows``, the vocabulary ``block`` columns at a time."""
    r, cast = min(rows, n), (e if e != 4 else 0)
    # a block: its fp32 logits (and the model-dtype product or cast beside them), the fp32 accumulator of
    # softmax @ W and the block's product with W; the end: the accumulator, W[target] in fp32 and their difference
    peak = max(r * block * (4 + cast) + r * hidden * (4 + e), 12 * r * hidden)
    peak += 48 * r  # per-row vectors: running max and sum, target logits, their indices
    return peak + (r * hidden * e + 4 * r if n > rows else 0)  # the previous chunk's result, until rebound


def _chunked_loss_line(p: ModelProfile, s: Settings) -> Line:
    from lorakit.training.loss import CHUNK_ELEMENTS, CPU_ROWS, CPU_VOCAB_BLOCK

    g, T, e = p.geometry, _tokens(s), act_bytes(s)
    n = T - s.batch_size  # supervised positions at most: the last token of a sequence has no target
    head = g.vocab * g.hidden if s.method == "full" else 0  # a trainable head: its gradient is made here too
    if s.device == "cpu" and not head:  # a frozen head on a CPU: blocks of the vocabulary (loss._blocked_logps)
        block = min(CPU_VOCAB_BLOCK, g.vocab)
        peak = _blocked_peak(n, CPU_ROWS, block, g.hidden, e)
        chunking = (f"chunks of ≤ {CPU_ROWS:,} rows, the vocabulary {block:,} columns at a time, at most "
                    f"{gib(peak)} alive at once (a block's fp32 logits, the fp32 sum of softmax @ W per row)")
    else:
        rows = max(16, CHUNK_ELEMENTS // g.vocab)
        chunks = [min(rows, n - start) for start in range(0, min(n, 3 * rows), rows)]  # the first three: O(1)
        peak = _chunk_peak(chunks, g.vocab, g.hidden, e, s.device, head * (4 + (e if e != 4 else 0)))
        chunking = (f"logits {len(chunks) if len(chunks) < 3 else '≥3'} chunk(s) of ≤ {rows:,} rows × {g.vocab:,}, "
                    f"at most {gib(peak)} alive at once (two chunks' fp32 logits, or one and its rows of the "
                    "hidden-state gradient)")
    # The decoder's output (caught by a hook) is freed once its supervised rows are selected, unless a trainable
    # head keeps it for its weight's gradient (full fine-tuning). Under checkpointing the loop holds the previous
    # micro-step's loss until this forward ends, and with it two hidden states checkpointing keeps (measured;
    # none when the embeddings train too). The model's own head computes no logits: it is asked for no position
    # (loss.fewest_logits, an empty logits_to_keep).
    extra = 1 if s.method == "full" else 0
    if s.gradient_checkpointing and s.method != "full":
        extra += 2
    total = peak + 2 * n * g.hidden * e + extra * T * g.hidden * e + 24 * T + 4 * head
    return Line("logits_and_loss", "logits and loss", total, (
        f"chunked loss (lorakit.training.loss): {chunking}, none from the model's own head (asked for no "
        f"position); + 2 × n·h·{e} (selected hidden states, their "
        f"gradient; n = T − b = {n:,} supervised positions at most) + {extra} × T·h·{e} (the decoder's output a "
        f"trainable head keeps; under checkpointing, two hidden states the previous micro-step's graph still holds) "
        "+ 24 B × T (targets)"
        + (" + V·h·4 (the trainable head's fp32 gradient, accumulated over the chunks)" if head else "")
    ))


def backward_line(p: ModelProfile, s: Settings, recompute: int) -> Line:
    """Peak working set as a decoder layer starts its backward (all its saved tensors still alive; under
    checkpointing they have just been recomputed): the output's gradient, its copy scaled for the adapter
    branch, and the gradient of the down projection's input."""
    g, T, e = p.geometry, _tokens(s), act_bytes(s)
    n = T * (g.intermediate + 2 * g.hidden) * e
    f = f"gradients entering a layer T·({g.intermediate} + 2·{g.hidden})·{e}"
    if s.gradient_checkpointing:
        n, f = n + recompute, f + f" + the recomputed layer's saved tensors {gib(recompute)}"
    if s.quantization != "none" and s.method != "full":
        n += p.quantizable.largest * DTYPE_BYTES[s.dtype]
        f += f" + one dequantized weight {p.quantizable.largest:,} × {DTYPE_BYTES[s.dtype]} B"
    return Line("backward_transient", "backward working set", n, f)


# ----------------------------------------------------------------------------------------------------------
# Totals


def optimizer_step_line(p: ModelProfile, s: Settings) -> Line:
    """Temporaries of optimizer.step(), after backward has freed the activations."""
    tensors, b, dtype = _trainable(p, s)
    if s.optimizer != "adamw":
        return Line("optimizer_step", "optimizer step", 0, "bitsandbytes updates each tensor in one fused kernel")
    if s.device == "cuda":  # torch picks the foreach implementation for CUDA tensors
        n = sum(tensors)
        return Line("optimizer_step", "optimizer step", n * b, (
            f"foreach AdamW: sqrt(v) for all {n:,} trainable params at once × {b} B ({dtype})"
        ))
    largest = max(tensors, default=0)
    return Line("optimizer_step", "optimizer step", 2 * largest * b, (
        f"per-tensor AdamW: sqrt(v) and its bias correction for the largest tensor, 2 × {largest:,} × {b} B"
    ))


def reference_line(p: ModelProfile, s: Settings) -> Line:
    """DPO/IPO's reference forward (the adapter switched off, no gradients), before the policy's: it keeps no
    activations, so its peak is one layer's temporaries and the head's log-probs. ``s``: the sequences it runs."""
    if s.objective not in ("dpo", "ipo") or s.reference == "precomputed":
        why = "precomputed before training" if s.reference == "precomputed" else f"{s.objective} has no reference"
        return Line("reference_forward", "reference forward", 0, f"none: {why}")
    from lorakit.training.loss import CHUNK_ELEMENTS

    g, T, e = p.geometry, _tokens(s), act_bytes(s)
    layer = T * (3 * g.intermediate + 2 * g.hidden) * e
    if loss_path(p, s) == "chunked" and s.device == "cpu":
        from lorakit.training.loss import CPU_ROWS, CPU_VOCAB_BLOCK

        block = min(CPU_VOCAB_BLOCK, g.vocab)
        head = min(CPU_ROWS, T) * block * 8 + T * g.hidden * e
        how = f"chunks of ≤ {CPU_ROWS:,} rows × {block:,} vocabulary columns × 8 B"
    elif loss_path(p, s) == "chunked":
        rows = max(16, CHUNK_ELEMENTS // g.vocab)
        head, how = min(rows, T) * g.vocab * 8 + T * g.hidden * e, f"one chunk of ≤ {rows:,} rows × V × 8 B"
    else:
        head, how = T * g.vocab * 8, "T·V × 8 B (fp32 logits and log-softmax)"
    return Line("reference_forward", "reference forward", layer + head, (
        f"no gradients, before the policy's forward: one layer's temporaries T·(3·{g.intermediate} + 2·{g.hidden})"
        f"·{e} (gate, up, their product; the residual and its norm) + the head's log-probs over {how} "
        f"+ T·h·{e} (the decoder's output); T = {T:,} tokens"
    ))


def estimate(p: ModelProfile, s: Settings) -> Estimate:
    """Every breakdown line for ``p`` under ``s``, the single-device peak and the per-device peak."""
    if s.method == "full" and s.quantization != "none":
        raise UsageError("full fine-tuning cannot train a quantized base: use --method lora/qlora or no quantization")
    weights, adapter, grads, opt = weights_line(p, s), adapter_line(p, s), gradients_line(p, s), optimizer_line(p, s)
    # A preference micro-batch of b pairs runs 2b sequences (chosen and rejected) through the model.
    runs = replace(s, batch_size=2 * s.batch_size) if s.objective != "sft" else s
    act, recompute = activations(p, runs)
    logits, bwd, step = logits_line(p, runs), backward_line(p, runs, recompute), optimizer_step_line(p, s)
    reference = reference_line(p, runs)
    overhead = Line(
        "framework_overhead", "framework overhead", OVERHEAD_BYTES if s.device == "cuda" else 0,
        "constant 1 GiB: CUDA context (~0.5 GiB with lazy module loading), cuBLAS workspaces and caching-allocator "
        "slack; torch.cuda.max_memory_allocated does not see it, nvidia-smi does",
    )
    lines = [weights, adapter, grads, opt, act, logits, bwd, step, overhead]
    if reference.bytes:
        lines.insert(-1, reference)
    static = weights.bytes + adapter.bytes + grads.bytes + opt.bytes
    training = max(act.bytes + max(logits.bytes, bwd.bytes), reference.bytes)
    total = static + max(training, step.bytes) + overhead.bytes
    peak_formula = (
        "weights + adapter + gradients + optimizer + max(activations + max(logits_and_loss, backward_transient), "
        f"{'reference_forward, ' if reference.bytes else ''}optimizer_step) + overhead (gradients coexist with "
        "activations under gradient accumulation; the loss buffers are freed before the first layer runs backward; "
        "the optimizer steps after the activations are gone)"
    )
    per_device, per_device_formula = _per_device(p, s, static, training, step.bytes, weights, grads)
    per_device += overhead.bytes
    notes = list(p.notes)
    if p.adapter_method not in ("lora", "dora") and s.method != "full":
        notes.append(f"activations: every layer's, as gradients reach the {p.adapter_method} adapter in (or before) "
                     "each; the adapter's own tensors are not modelled"
                     + (" (its virtual tokens are: they lengthen every sequence or attention)"
                        if p.adapter_method in ("prompt", "prefix") else ""))
    if p.adapter_method == "dora" and s.method != "full":
        notes.append("DoRA also builds each adapted weight (out × in, fp32) during forward; not counted")
    if s.strategy == "fsdp" and s.gpus > 1:  # what lorakit train refuses under FSDP (distributed.check_fsdp)
        if s.quantization == "int8":
            notes.append("FSDP cannot shard int8 weights (lorakit refuses it): use nf4 with FSDP")
        if p.adapter_method == "ia3":
            notes.append("lorakit refuses IA3 under FSDP version 1 (its vectors share the frozen layers' flat "
                         "shards): use recipes/accelerate/fsdp2.yaml")
        if s.optimizer != "adamw" and s.method != "full":
            notes.append(f"lorakit refuses {s.optimizer} under FSDP (its state cannot be checkpointed): use adamw")
        if s.upcast_unquantized and s.quantization in ("nf4", "fp4") and s.method != "full":
            notes.append("lorakit refuses model.upcast_unquantized under FSDP (one dtype per flat shard)")
    return Estimate(p, s, lines, total, per_device, peak_formula, per_device_formula, notes)


def _per_device(p: ModelProfile, s: Settings, static: int, training: int, step: int, weights: Line,
                grads: Line) -> tuple[int, str]:
    """Peak per GPU, overhead left out."""
    if s.gpus <= 1:
        return static + max(training, step), "one GPU: the total"
    if s.strategy == "ddp":
        return static + grads.bytes + max(training, step), (
            f"DDP on {s.gpus} GPUs: every GPU holds the whole total plus DDP's gradient buckets (+{gib(grads.bytes)})"
        )
    g, e = p.geometry, DTYPE_BYTES[s.dtype]
    kept = 4 if s.quantization != "none" and s.method != "full" and s.upcast_unquantized else e  # unquantized ones
    outside = p.base_params - g.layers * g.layer_params  # embeddings, LM head, final norm: FSDP's root unit
    per_layer = max(0, weights.bytes - outside * kept - p.buffer_bytes) // g.layers
    gathered = outside * kept + 2 * per_layer + (g.layer_params * e if s.method == "full" else 0)
    return static // s.gpus + max(gathered + training, step // s.gpus), (
        f"FSDP over {s.gpus} GPUs: (weights + adapter + gradients + optimizer) / {s.gpus} + gathered parameters "
        f"{gib(gathered)} (root unit with embeddings/LM head + the current and the prefetched layer) + activations, "
        "loss buffers and overhead, which are per GPU (the optimizer step's temporaries are sharded too)"
    )
