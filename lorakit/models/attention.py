"""Padding-free attention for sdpa and eager: each example of a flattened row attends only to itself.

transformers attends within the examples of a flattened row (restarting position_ids) by a block-diagonal
mask over the whole row with sdpa and eager: (Σ Lᵢ)² scores for Σ Lᵢ² useful ones. The functions here are
registered through transformers' public AttentionInterface (and AttentionMaskInterface, so that no
block-diagonal mask is built) under VARLEN_NAMES; they cut the row at the position-id restarts, as
flash_attention_2's varlen path does, and run the base kernel once per example. Padded batches (evaluation,
a 2D attention_mask) and KV-cache calls get the base implementation's own mask and kernel.
"""

from __future__ import annotations

import weakref

import torch

VARLEN_NAMES = {"sdpa": "lorakit_varlen_sdpa", "eager": "lorakit_varlen_eager"}


def varlen_name(attention: str) -> str | None:
    """The per-example variant registered for ``attention`` (sdpa or eager), None for the others."""
    register()
    return VARLEN_NAMES.get(attention)


def register() -> None:
    """Idempotent: the two attention functions and their masks, under VARLEN_NAMES."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    if VARLEN_NAMES["sdpa"] in AttentionMaskInterface._global_mapping:
        return
    AttentionInterface.register(VARLEN_NAMES["sdpa"], varlen_sdpa)
    AttentionInterface.register(VARLEN_NAMES["eager"], varlen_eager)
    AttentionMaskInterface.register(VARLEN_NAMES["sdpa"], _no_mask_unless_padded(sdpa_mask))
    AttentionMaskInterface.register(VARLEN_NAMES["eager"], _no_mask_unless_padded(eager_mask))


def _no_mask_unless_padded(base_mask):
    """Without padding or a cache offset the attention below keeps causality and examples apart itself (None);
    otherwise the base implementation's mask, as transformers builds it."""

    def mask(*, q_length: int, kv_length: int, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
        if attention_mask is None and q_length == kv_length and _is_zero(q_offset) and _is_zero(kv_offset):
            return None
        return base_mask(q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
                         attention_mask=attention_mask, **kwargs)

    return mask


def _is_zero(offset) -> bool:
    return int(offset) == 0


# ----------------------------------------------------------------------------------------------------------
# The attention functions (transformers' signature: module, q, k, v as [batch, heads, tokens, head_dim])


def varlen_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)

    def one(q, k, v):
        # sdpa's is_causal where no window cuts the example (its fused kernels), a local causal mask otherwise
        window = local_causal_mask(q.shape[2], sliding_window, q.device)
        return sdpa_attention_forward(module, q, k, v, window, dropout=dropout, scaling=scaling, **kwargs)[0]

    return per_example(one, query, key, value, kwargs.get("position_ids")), None


def varlen_eager(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                 softcap=None, **kwargs):
    """Eager attention (scores, soft-cap, mask, fp32 softmax, dropout) as transformers' eager functions compute it."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling

    def one(q, k, v, mask=None):
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = q @ k.transpose(2, 3) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if mask is not None:
            scores = scores + mask[:, :, :, : k.shape[2]]
        elif q.shape[2] == k.shape[2]:  # no mask and no cache: causal (and windowed) here
            allowed = local_causal_mask(q.shape[2], sliding_window, q.device, always=True)
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
        return (weights @ v).transpose(1, 2).contiguous()

    if attention_mask is not None or query.shape[2] != key.shape[2]:
        return one(query, key, value, attention_mask), None
    return per_example(one, query, key, value, kwargs.get("position_ids")), None


def local_causal_mask(length: int, window: int | None, device, always: bool = False) -> torch.Tensor | None:
    """[length, length] True where a query may attend a key: causal, within the last ``window`` keys (transformers'
    sliding_window_causal_mask_function). None when plain causality is meant and ``always`` is false."""
    if not always and (window is None or window >= length):
        return None
    q, k = torch.arange(length, device=device)[:, None], torch.arange(length, device=device)[None]
    allowed = k <= q
    return allowed & (k > q - window) if window is not None else allowed


def per_example(attend, query, key, value, position_ids) -> torch.Tensor:
    """``attend(q, k, v)`` → [batch, tokens, heads, dim] run on each example of each row, concatenated back."""
    rows = []
    for b, bounds in enumerate(example_bounds(position_ids, query.shape[0], query.shape[2])):
        if bounds is None:  # every row whole: one call for the batch
            return attend(query, key, value)
        q, k, v = query[b : b + 1], key[b : b + 1], value[b : b + 1]
        rows.append(torch.cat([attend(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]) for s, e in bounds], dim=1))
    return torch.cat(rows)


_last: tuple = (None, None)  # (weakref to the position_ids seen last, their bounds): one lookup per forward


def example_bounds(position_ids, batch: int, tokens: int) -> list:
    """Per row, [(start, end)] of its examples (a new one wherever the position id does not go up by one);
    [None] when no row restarts, so the batch runs whole. Every layer gets the same position_ids tensor:
    the bounds are read from it (a device sync) once per forward."""
    global _last
    if position_ids is None:
        return [None]
    ref, bounds = _last
    if ref is not None and ref() is position_ids:
        return bounds
    ids = position_ids.expand(batch, tokens)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1] + 1
    if not bool(starts[:, 1:].any()):
        bounds = [None]
    else:
        bounds = []
        for row in starts.cpu():
            cuts = row.nonzero().flatten().tolist() + [tokens]
            bounds.append(list(zip(cuts, cuts[1:])))
    _last = (weakref.ref(position_ids), bounds)
    return bounds
