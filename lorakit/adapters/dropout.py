"""LoRA's input dropout with masks that cost a CPU a quarter of the random numbers.

On a CPU, ``nn.Dropout`` fills its mask with ``bernoulli_(1 - p)``: torch draws every element one at a time, a
53-bit double from two 32-bit outputs of its Mersenne Twister, then compares it with the keep probability. In a
LoRA step that is one mask of ``[tokens, in_features]`` per adapted module, 14–17% of a step on the bench model
(docs/performance.md). ``LoraDropout`` draws 16 random bits per element instead: one 64-bit draw (two outputs of
the same generator) gives four elements. An element is kept when its 16 bits fall below
``threshold = round((1 - p) · 2^16)``, and kept elements are scaled by ``2^16 / threshold``: each element is kept
independently with probability ``threshold / 2^16`` (within 2^-17 of 1 - p) and the output's expectation is the
input exactly, as with inverted dropout. The masks are other masks than ``bernoulli_`` draws for the same seed,
from the same distribution; they follow torch's generator, so lorakit's per-micro-batch seeding still makes a
resumed run and two ranks draw what one uninterrupted process draws.

Elsewhere it is ``nn.Dropout`` itself: on CUDA (whose fused dropout draws in parallel already), under
torch.compile (inductor draws its own masks, and ``random_`` would break the graph), in eval mode, and where ``p``
rounds to no dropout or to all of it.
"""

from __future__ import annotations

import torch
from torch import nn

_LEVELS = 1 << 16  # random bits per element: 16


class LoraDropout(nn.Dropout):
    """nn.Dropout whose CPU masks take 16 random bits per element (see the module's docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        threshold = round((1 - self.p) * _LEVELS)
        if (not self.training or x.device.type != "cpu" or self.inplace or not 0 < threshold < _LEVELS
                or torch.compiler.is_compiling()):
            return super().forward(x)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # all 64 bits uniform
        keep = bits.view(torch.int16)[:n].view(x.shape) < threshold - _LEVELS // 2  # int16 spans ±2^15
        return x * keep.to(x.dtype).mul_(_LEVELS / threshold)


def use_lora_dropout(model, fast: bool = True) -> int:
    """Swap every PEFT LoRA layer's ``nn.Dropout`` for ``LoraDropout`` (``fast=False``: back). Returns how many
    were swapped. Dropout holds no weights: nothing saved or loaded changes."""
    old, new = (nn.Dropout, LoraDropout) if fast else (LoraDropout, nn.Dropout)
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is old:
                dropouts[name] = new(dropout.p)
                swapped += 1
    return swapped


def uses_lora_dropout(model) -> bool:
    """Whether training ``model`` draws LoraDropout's 16-bit masks: it holds LoraDropout modules, on the CPU."""
    weight = next(model.parameters(), None)
    return (weight is not None and weight.device.type == "cpu"
            and any(isinstance(m, LoraDropout) for m in model.modules()))
