"""The data side of a multi-process run: every rank runs the same number of micro-batches."""

from __future__ import annotations

import dataclasses
import math

from lorakit.data.formats import IGNORE_INDEX


def idle_batch(example):
    """A copy of ``example`` that teaches nothing (every label -100, so it adds 0 to the summed loss).

    A rank left without a micro-batch at the end of an epoch, or with fewer eval batches than the others, runs
    this instead: its forward/backward still take part in DDP's all-reduce and FSDP's all-gathers, which
    would otherwise wait for it until train.ddp_timeout.
    """
    rejected = idle_batch(example.rejected) if example.rejected is not None else None  # a pair: both sequences
    return dataclasses.replace(example, labels=[IGNORE_INDEX] * len(example.labels), rejected=rejected)


def eval_shards(num_examples: int, micro_batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """This rank's eval micro-batches (example indices, every world_size-th example): the same number on every
    rank, so sharded forwards line up; an empty list marks a batch to fill with an idle one."""
    mine = list(range(rank, num_examples, world_size))
    count = math.ceil(math.ceil(num_examples / world_size) / micro_batch_size)
    return [mine[i * micro_batch_size : (i + 1) * micro_batch_size] for i in range(count)]
