"""The training loss: cross-entropy over supervised positions, the LM head applied a chunk at a time.

`build_loss` decides once, before the loop, how `compute_loss(model, batch, num_items)` runs; every path
returns the sum of per-token losses / num_items, as transformers' ForCausalLMLoss does with num_items_in_batch.
- chunked (train.chunked_loss): a forward hook on the decoder catches its output (the last hidden state,
  after the final norm) while the model computes logits for no position (fewest_logits); the head and the
  loss run over supervised positions only, in chunks, so full-vocabulary logits never exist for the whole
  batch (and, unlike output_hidden_states=True, no layer's output is kept beyond what the backward needs);
- Liger's fused linear cross-entropy instead of our chunks, when liger-kernel is installed and the model is on a GPU;
- plain: the model's own loss, where the head cannot be applied outside the model (an adapter on the head,
  prompt/prefix tuning, a sharded head, logit scaling or soft-capping) or when train.chunked_loss is false.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from lorakit.data.formats import IGNORE_INDEX, num_targets

CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MiB in fp32): 256 rows at a 32k vocabulary, 55 at 152k
# On a CPU a frozen head's chunk is cut along the vocabulary too (_blocked_logps): ROWS × VOCAB_BLOCK fp32 logits
# (4 MiB) stay in cache from their GEMM through the softmax into the gradient's GEMM.
CPU_ROWS, CPU_VOCAB_BLOCK = 1024, 1024

# Config keys of models that scale or soft-cap their logits after the head (Gemma 2/3, Cohere, Granite);
# the probe in _head_reproduces_logits catches the ones not listed.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

LossFn = Callable[[torch.nn.Module, dict, float], torch.Tensor]


class Tally:
    """Metrics a loss reports beside its value (the preference rewards), summed per example over a window of
    micro-batches; ``means`` averages them over every rank's examples (a collective when it has any names)."""

    def __init__(self, names: tuple[str, ...] = ()):
        self.names, self.sums = names, None

    def clear(self) -> None:
        self.sums = None

    def add(self, sums: torch.Tensor, count: torch.Tensor) -> None:
        """``sums``: one summed value per name over this micro-batch's ``count`` examples."""
        row = torch.cat([sums.detach().float(), count.detach().float().reshape(1)])
        self.sums = row if self.sums is None else self.sums + row

    def means(self, accelerator, prefix: str = "") -> dict:
        if not self.names:
            return {}
        sums = self.sums if self.sums is not None else torch.zeros(len(self.names) + 1, device=accelerator.device)
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum")
        count = max(float(sums[-1]), 1.0)
        return {f"{prefix}{name}": round(float(v) / count, 6) for name, v in zip(self.names, sums[:-1].tolist())}


@dataclass
class Loss:
    """The loss the loop calls, and which path it takes (printed at the start of a run).

    ``items(batch)`` is what the loss is normalised by (supervised tokens here; pairs for a preference loss),
    ``counts(batch)`` that and the batch's supervised tokens in one pass. What a loss reports beside its value goes
    into the ``tally`` its caller passes (from ``new_tally()``; nothing here)."""

    fn: LossFn
    kind: str  # "chunked", "liger" or "plain"
    reason: str = ""

    def __call__(self, model, batch: dict, num_items: float, tally: Tally | None = None) -> torch.Tensor:
        return self.fn(model, batch, num_items)

    def new_tally(self) -> Tally:
        return Tally()

    def items(self, batch: dict) -> int:
        return num_targets(batch["labels"])

    def counts(self, batch: dict) -> tuple[int, int]:
        """(items, supervised tokens) of ``batch``: one count here, taken once."""
        n = self.items(batch)
        return n, n

    def describe(self) -> str:
        return f"loss: {self.kind}" + (f" ({self.reason})" if self.reason else "")


def plain_loss(model, batch: dict, num_items: float) -> torch.Tensor:
    return model(**batch, num_items_in_batch=num_items).loss


def build_loss(model, chunked: bool) -> Loss:
    """Choose the loss path for ``model`` (the unwrapped PEFT model, on its training device)."""
    if not chunked:
        return Loss(plain_loss, "plain", "train.chunked_loss is false")
    why_not = head_unusable(model)
    if why_not:
        return Loss(plain_loss, "plain", why_not)
    head, decoder = model.get_output_embeddings(), _decoder(model)
    own_logits = fewest_logits(model, decoder)
    if head.weight.is_cuda and liger_available():
        return Loss(_head_loss(head, decoder, _liger_sum, own_logits), "liger",
                    "liger-kernel fused linear cross-entropy")
    return Loss(_head_loss(head, decoder, linear_cross_entropy_sum, own_logits), "chunked")


def _decoder(model) -> torch.nn.Module:
    """The transformer body whose output the head reads (transformers' get_decoder on the unwrapped model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def forward_hidden(model, decoder, inputs: dict, **kwargs) -> tuple[torch.Tensor, object]:
    """Run ``model`` (possibly DDP-wrapped) and return the decoder's output as a hook caught it, and the
    model's own output."""
    caught = []
    handle = decoder.register_forward_hook(lambda module, args, out: caught.append(out[0]))
    try:
        out = model(**inputs, **kwargs)
    finally:
        handle.remove()
    return caught[-1], out


def head_unusable(model) -> str:
    """Why the head cannot be applied to the hidden states outside the model's forward ('' when it can)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    method = prompt_learning_method(model)
    if method:
        return f"{method} tuning adds virtual tokens inside the forward"
    from lorakit.distributed.fsdp import is_sharded

    if is_sharded(model):
        return "the model is sharded (FSDP): its head's weight is whole only inside the forward"
    head = model.get_output_embeddings()
    if isinstance(head, BaseTunerLayer):  # PEFT's lora.Linear etc.: its type name alone reads "Linear"
        return "the output layer carries an adapter (adapter.target_modules matches the LM head)"
    if not isinstance(head, torch.nn.Linear):
        return f"the output layer is a {type(head).__name__}, not a plain Linear"
    if type(head.weight) is not torch.nn.Parameter:
        return f"the output layer's weight is a {type(head.weight).__name__} (sharded or quantized)"
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    transforms = [k for k in LOGIT_TRANSFORMS if getattr(config, k, None) not in (None, 1, 1.0)]
    if transforms or not _head_reproduces_logits(model, head, _decoder(model)):
        return f"the model transforms its logits after the head ({', '.join(transforms) or 'seen by a probe'})"
    return ""


def prompt_learning_method(model) -> str:
    """'prefix', 'prompt', ... when the PEFT method prepends virtual tokens in the forward; '' otherwise. The name
    is PEFT's type without its '_tuning' (PREFIX_TUNING: 'prefix'), as messages say "prefix tuning"."""
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    if config is None or not config.is_prompt_learning:
        return ""
    return config.peft_type.value.lower().removesuffix("_tuning").replace("_", " ")



@torch.no_grad()
def _head_reproduces_logits(model, head, decoder) -> bool:
    """One 8-token forward: do head(the decoder's output) and the model's logits agree? (eval mode: no dropout)."""
    embeddings = model.get_input_embeddings().weight
    ids = (torch.arange(8, device=embeddings.device) * 7919 + 13) % embeddings.shape[0]
    with eval_mode(model):
        hidden, out = forward_hidden(model, decoder, {"input_ids": ids[None]})
    mine, theirs = head(hidden.to(head.weight.dtype)).float(), out.logits.float()
    if mine.shape != theirs.shape:
        return False
    # Relative to the logits' scale: bf16 rounding (autocast) passes, a scale or a soft-cap does not.
    return bool((mine - theirs).abs().max() <= 2e-2 * theirs.abs().max())


@torch.no_grad()
def fewest_logits(model, decoder) -> int | torch.Tensor:
    """The model's logits_to_keep that makes its own head compute nothing: an empty position list where its
    forward takes one (transformers' slice_logits_to_keep), else 1, the last position (a [vocab, hidden]
    matrix-vector product per micro-batch: 8 ms of a 0.5 s CPU step at a 32k vocabulary, more at 152k)."""
    embeddings = model.get_input_embeddings().weight
    none = torch.zeros(0, dtype=torch.long, device=embeddings.device)
    ids = torch.ones(1, 2, dtype=torch.long, device=embeddings.device)
    try:
        with eval_mode(model):
            _, out = forward_hidden(model, decoder, {"input_ids": ids}, logits_to_keep=none)
        empty = out.logits.shape[-2] == 0
    except Exception:  # noqa: BLE001  (a forward that cannot take it keeps the last position)
        empty = False
    return none if empty else 1


@contextmanager
def eval_mode(model):
    """``model`` in eval mode (no dropout) inside the block, back in the mode it was in after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def liger_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


# ----------------------------------------------------------------------------------------------------------
# The chunked path


def shifted_targets(batch: dict) -> torch.Tensor:
    """Target of each position (the next token's label), -100 where nothing is learned; as ForCausalLMLoss."""
    if "shift_labels" in batch:
        return batch["shift_labels"]
    return F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[..., 1:]


def _head_loss(head: torch.nn.Linear, decoder: torch.nn.Module, loss_sum: Callable,
               own_logits: int | torch.Tensor = 1) -> LossFn:
    def compute(model, batch: dict, num_items: float) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}
        # own_logits (fewest_logits): the model's own head runs on no position, or one; ours where it counts.
        hidden, _ = forward_hidden(model, decoder, inputs, logits_to_keep=own_logits)
        targets = shifted_targets(batch).to(hidden.device).reshape(-1)
        keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
        return loss_sum(hidden, head.weight, head.bias, targets[keep]) / num_items

    return compute


def _liger_sum(hidden, weight, bias, targets) -> torch.Tensor:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    out = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")(weight, hidden, targets, bias)
    return out[0] if isinstance(out, tuple) else out  # (loss, z_loss) when a version returns the z-loss too


def linear_cross_entropy_sum(hidden, weight, bias, targets, chunk_rows: int | None = None,
                             vocab_block: int | None = None) -> torch.Tensor:
    """sum_i CE(hidden_i @ weight.T + bias, targets_i) without holding more than one chunk of logits.

    ``chunk_rows`` / ``vocab_block``: the chunk's shape (default: _chunking)."""
    rows, block = _chunking(hidden, weight, chunk_rows, vocab_block)
    if torch.is_grad_enabled():
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, rows, block)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], rows):
        total -= _blocked_logps(hidden[s : s + rows], weight, bias, targets[s : s + rows], block)[0].sum()
    return total


def linear_token_logps(hidden, weight, bias, targets, chunk_rows: int | None = None,
                       vocab_block: int | None = None) -> torch.Tensor:
    """log p(targets_i | hidden_i) under the head, per row ([n], fp32), one chunk of logits at a time.

    The head must be frozen (a preference loss falls back to the model's own logits otherwise): only the hidden
    states get a gradient, kept per row as in _LinearCrossEntropy and scaled by each row's incoming gradient."""
    rows, block = _chunking(hidden, weight, chunk_rows, vocab_block)
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _TokenLogps.apply(hidden, weight, bias, targets, rows, block)
    out = [_blocked_logps(hidden[s : s + rows], weight, bias, targets[s : s + rows], block)[0]
           for s in range(0, hidden.shape[0], rows)]
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _chunking(hidden, weight, chunk_rows, vocab_block) -> tuple[int, int]:
    """(rows per chunk, vocabulary columns per block). A GPU takes the whole vocabulary at once, 256 rows at 32k
    (CHUNK_ELEMENTS); a CPU, whose caches are what a step waits on, CPU_ROWS × CPU_VOCAB_BLOCK."""
    vocab = weight.shape[0]
    if hidden.device.type == "cpu":
        rows, block = CPU_ROWS, CPU_VOCAB_BLOCK
    else:
        rows, block = max(16, CHUNK_ELEMENTS // vocab), vocab
    return chunk_rows or rows, min(vocab_block or block, vocab)


def _blocked_logps(hidden, weight, bias, targets, block: int, grad: bool = False):
    """(log p(target_i) [n] fp32; if ``grad``, d log p_i / d hidden_i [n, hidden] in hidden's dtype, else None)
    for one chunk of rows, with the head frozen.

    The vocabulary is taken ``block`` columns at a time with a running max and sum per row (the online softmax
    of flash attention): a block's logits (upcast from the model dtype, as transformers does) become exp(x - max)
    in place and go straight into the gradient's GEMM, so the head's weight is read once for both products and
    no [rows, vocab] tensor is made when ``block`` is smaller than the vocabulary. The gradient is
    W[target] - softmax @ W = W[target] - (sum over blocks of exp(x - max) @ W_block) / sum, each block's share
    rescaled as the running max grows."""
    n, vocab = hidden.shape[0], weight.shape[0]
    top = hidden.new_full((n, 1), float("-inf"), dtype=torch.float32)
    total = hidden.new_zeros((n, 1), dtype=torch.float32)
    target_logits = hidden.new_zeros(n, dtype=torch.float32)
    acc = hidden.new_zeros(hidden.shape, dtype=torch.float32) if grad else None
    for v in range(0, vocab, block):
        w = weight[v : v + block]
        logits = F.linear(hidden, w, None if bias is None else bias[v : v + block]).float()
        index = targets - v
        here = (index >= 0) & (index < w.shape[0])  # no nonzero(): a GPU would wait for it
        picked = logits.gather(1, index.clamp(0, w.shape[0] - 1)[:, None]).squeeze(1)
        target_logits = torch.where(here, picked, target_logits)
        new_top = torch.maximum(top, logits.amax(dim=1, keepdim=True))
        probs = logits.sub_(new_top).exp_()  # unnormalised: exp(x - running max)
        rescale = (top - new_top).exp_()
        total.mul_(rescale).add_(probs.sum(dim=1, keepdim=True))
        if grad:
            acc.mul_(rescale).add_(probs.to(w.dtype) @ w)
        top = new_top
        del logits, probs  # before the next block's product: one block alive at a time, its memory reused warm
    logps = target_logits - (total.log() + top).squeeze(1)
    if not grad:
        return logps, None
    return logps, (weight.index_select(0, targets).float() - acc.div_(total)).to(hidden.dtype)


def _chunk_logps(hidden, weight, bias, targets):
    """(log p(target_i), fp32; the softmax over the whole vocabulary) of one chunk of rows, for a trainable head.

    The logits (upcast from the model dtype, as transformers does) are turned into the softmax in place with
    one exp pass: exp(x - max) summed gives the log-sum-exp, divided gives the probabilities."""
    logits = F.linear(hidden, weight, bias).float()
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)
    top = logits.amax(dim=1, keepdim=True)
    probs = logits.sub_(top).exp_()
    total = probs.sum(dim=1, keepdim=True)
    logps = target_logits - (total.log() + top).squeeze(1)
    return logps, probs.div_(total)


class _TokenLogps(torch.autograd.Function):
    """d logp_i / d hidden_i = W[target_i] - softmax_i @ W, computed per chunk in the forward (_blocked_logps);
    never [n, vocab] kept."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, block):
        out = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        grad_h = torch.empty_like(hidden)
        for s in range(0, hidden.shape[0], rows):
            out[s : s + rows], grad_h[s : s + rows] = _blocked_logps(hidden[s : s + rows], weight, bias,
                                                                     targets[s : s + rows], block, grad=True)
        ctx.save_for_backward(grad_h)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype)[:, None], None, None, None, None, None


class _LinearCrossEntropy(torch.autograd.Function):
    """Each chunk's backward runs in the forward, while its logits exist (the scheme of Liger's fused kernel).

    What is kept for the backward is the gradient of the hidden states ([n, hidden] in the model dtype) and,
    only if the head is trainable, of its weight and bias: never [n, vocab] logits. The gradients are those of
    F.cross_entropy(logits.float(), reduction="sum"): softmax minus one-hot, cast back to the model dtype.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, block):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        if not (need_w or need_b):  # a frozen head: d(-log p)/dh = softmax @ W - W[target], by vocabulary blocks
            for s in range(0, hidden.shape[0], rows):
                logps, grad = _blocked_logps(hidden[s : s + rows], weight, bias, targets[s : s + rows], block,
                                             grad=need_h)
                total -= logps.sum()
                if need_h:
                    grad_h[s : s + rows] = grad.neg_()
        else:  # a trainable head needs each row's normalised softmax for its own gradient: whole-vocabulary chunks
            rows = min(rows, max(16, CHUNK_ELEMENTS // weight.shape[0]))
            for s in range(0, hidden.shape[0], rows):
                h, t = hidden[s : s + rows], targets[s : s + rows]
                logps, grad_logits = _chunk_logps(h, weight, bias, t)  # the softmax, in place of the logits
                total -= logps.sum()
                grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1
                grad_logits = grad_logits.to(hidden.dtype)
                if need_h:
                    grad_h[s : s + rows] = grad_logits @ weight
                if need_w:
                    grad_w += (grad_logits.T @ h).float()
                if need_b:
                    grad_b += grad_logits.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return (
            None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
            None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype),
            None if grad_b is None else (grad_b * grad_out).to(ctx.weight_dtype),
            None,
            None,
            None,
        )
