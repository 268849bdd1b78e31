"""Batches: padding-free packing, collation (transformers' collators) and the deterministic step sampler."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lorakit.data.formats import IGNORE_INDEX, Example
from lorakit.data.store import PackedRows, example_lengths
from lorakit.errors import UsageError


# ----------------------------------------------------------------------------------------------------------
# Packing


def first_fit(sizes: list[int], capacity: int) -> list[list[int]]:
    """Greedy first-fit bin packing: each item goes into the first bin with room (O(n log n)).

    A max-tree over the bins' free space finds that bin; bins not yet opened have the full capacity,
    so an item that fits nowhere opens the next one.
    """
    width = 1
    while width < max(len(sizes), 1):
        width *= 2
    free = [capacity] * (2 * width)
    bins: list[list[int]] = []
    for item, size in enumerate(sizes):
        if size > capacity:
            raise ValueError(f"item {item} ({size}) is larger than a bin ({capacity})")
        node = 1
        while node < width:
            node = 2 * node if free[2 * node] >= size else 2 * node + 1
        slot = node - width
        if slot == len(bins):
            bins.append([])
        bins[slot].append(item)
        free[node] -= size
        while node > 1:
            node //= 2
            free[node] = max(free[2 * node], free[2 * node + 1])
    return bins


def pack_rows(lengths, max_len: int, seed: int):
    """Which examples each packed row holds: (members, bounds), row r being ``members[bounds[r]:bounds[r + 1]]``.

    First-fit, longest rows first, ties in seeded order. Index arrays only: the tokens stay where they are.
    """
    lengths = [int(n) for n in lengths]
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep the seeded order
    bins = first_fit([lengths[i] for i in order], max_len)
    members = np.array([order[m] for members in bins for m in members], dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum([len(b) for b in bins])]).astype(np.int64)
    return members, bounds


def pack_examples(examples: Sequence[Example], max_len: int, seed: int) -> PackedRows:
    """Pack examples (a token store or a list) into rows of at most ``max_len`` tokens (first-fit, longest first,
    seeded ties).

    Always a PackedRows view over ``examples``: no token is copied, row r becomes an Example when indexed. Each
    row remembers its examples' lengths (``seq_lens``); ``collate`` restarts position ids there and keeps
    attention and loss inside each example.
    """
    return PackedRows(examples, *pack_rows(example_lengths(examples), max_len, seed))


# ----------------------------------------------------------------------------------------------------------
# Collation


def collate(examples: list[Example], tokenizer, padding_free: bool = False):
    """A micro-batch of tensors for ``model(**batch)``.

    Unpacked examples are padded to the longest of the micro-batch (labels padded with -100) by
    DataCollatorForSeq2Seq, unless ``padding_free`` (data.padding_free, where the model supports it).
    Packed rows, and every micro-batch when ``padding_free``, are flattened into one padding-free row by
    DataCollatorWithFlattening: position_ids restart at every example and the first label of each
    example is -100, so no example is the target of the one before it and the summed loss equals the
    unpacked one. There is deliberately no attention_mask: from restarting position_ids transformers
    builds a block-diagonal causal mask (sdpa, eager, flex) or runs varlen flash attention, but only
    without a KV cache (load_base_model sets use_cache=False) and without a 2D attention_mask.

    Preference pairs become 2n sequences, the n chosen then the n rejected (one padded row each, or all flattened
    into one row); with precomputed reference log-probs, ``ref_logps`` holds theirs in the same order.
    """
    if examples and examples[0].rejected is not None:
        batch = collate([Example(e.input_ids, e.labels, e.prompt_len) for e in examples] +
                        [e.rejected for e in examples], tokenizer, padding_free)
        if all(e.ref_logps is not None for e in examples):
            import torch

            batch["ref_logps"] = torch.tensor([e.ref_logps[0] for e in examples] + [e.ref_logps[1] for e in examples],
                                              dtype=torch.float32)
        return batch
    if padding_free or any(e.seq_lens is not None for e in examples):
        from transformers import DataCollatorWithFlattening

        features = []
        for e in examples:
            start = 0
            for n in e.seq_lens or [len(e)]:
                features.append({"input_ids": e.input_ids[start : start + n], "labels": e.labels[start : start + n]})
                start += n
        return DataCollatorWithFlattening(separator_id=IGNORE_INDEX)(features, return_tensors="pt")
    from transformers import DataCollatorForSeq2Seq

    collator = DataCollatorForSeq2Seq(
        tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX, return_tensors="pt"
    )
    return collator([{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e)} for e in examples])


# ----------------------------------------------------------------------------------------------------------
# Data order

# The most rows weights may draw an epoch beyond the data's own: the sampler holds an epoch's order in memory (8
# bytes a row, a few copies while it is drawn), and a weight of 1e9 would ask for hundreds of GB.
MAX_WEIGHTED_EPOCH = 2**27


def epoch_draws(sources, weights: list[float], names: list[str] | None = None) -> list[int]:
    """Rows each data.train source gives an epoch: round(rows × weight). Exit 2 where a weight draws none of a
    source's rows (it would never be trained on) or an epoch too long to order in memory."""
    counts = [int(n) for n in np.bincount(np.asarray(sources, dtype=np.int64), minlength=len(weights))]
    draws = [round(n * w) for n, w in zip(counts, weights)]
    names = names or [f"source {i}" for i in range(len(weights))]
    for i, (n, w, d) in enumerate(zip(counts, weights, draws)):
        if n and not d:
            raise UsageError(f"data.train[{i}].weight: {w:g} × the {n:,} rows of {names[i]} rounds to no row an epoch, "
                             f"so it would never be trained on; give it a weight of at least {1 / n:.3g}, or remove it")
    if sum(draws) > max(MAX_WEIGHTED_EPOCH, sum(counts)):
        i = max(range(len(draws)), key=draws.__getitem__)
        raise UsageError(f"data.train[{i}].weight: {weights[i]:g} × the {counts[i]:,} rows of {names[i]} makes an "
                         f"epoch of {sum(draws):,} rows, more than the {MAX_WEIGHTED_EPOCH:,} lorakit orders in memory; "
                         "weights set the sources' proportions: lower them, and raise train.max_steps for more passes")
    return draws



@dataclass
class StepSampler:
    """Which examples each rank sees at each optimizer step: deterministic from (seed, step) alone.

    An epoch is a seeded permutation; optimizer step s of the epoch takes the next
    micro_batch_size × grad_accum × world_size examples, split into micro-batches dealt round-robin to
    ranks. Two ranks with grad_accum k thus see exactly the examples one rank with 2k sees, and a
    resumed run needs only the step number to continue where it stopped.

    With ``lengths`` (data.group_by_length), each run of MEGA_STEPS steps of the permutation is sorted by
    length and its steps shuffled again: micro-batches hold examples of similar length (little padding)
    while the order of steps stays random.
    """

    num_examples: int  # rows of the data; with ``weights``, see ``epoch_size``
    micro_batch_size: int
    grad_accum: int
    seed: int
    world_size: int = 1
    rank: int = 0
    lengths: list[int] | None = None
    sources: np.ndarray | None = None  # the source of each example (data.train's list), for ``weights``
    weights: list[float] | None = None  # data.train[i].weight: each epoch takes round(rows × weight) of source i
    _orders: dict = field(default_factory=dict, repr=False, compare=False)

    MEGA_STEPS = 50

    def __post_init__(self):
        if self.weights is not None and all(w == 1 for w in self.weights):
            self.weights = None  # every source as it is: the plain permutation of all rows
        if self.weights is not None:
            self.draws = epoch_draws(self.sources, self.weights)
            self.num_examples = sum(self.draws)  # an epoch: what the weights draw, not the rows

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.global_batch)

    def oversized(self) -> str | None:
        """A warning when one optimizer step asks for more examples than an epoch holds (every step then takes the
        whole epoch, fewer examples than the recipe's batch), else None."""
        if self.global_batch <= self.num_examples:
            return None
        return (f"train: a step takes micro_batch_size {self.micro_batch_size} × grad_accum {self.grad_accum} × "
                f"{self.world_size} process(es) = {self.global_batch:,d} examples, more than the {self.num_examples:,d} "
                f"an epoch of the train data holds: every step takes those {self.num_examples:,d} (one epoch a step); "
                "lower train.micro_batch_size or train.grad_accum, or add data")

    def epoch_order(self, epoch: int):
        """The example indices of ``epoch`` in order (an int64 tensor: 8 bytes an example, never a Python list)."""
        import torch

        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            if self.weights is None:
                order = torch.randperm(self.num_examples, generator=generator)
            else:
                order = self._weighted(generator)
            if self.lengths is not None:
                order = torch.tensor(self._group_by_length(order.tolist(), generator), dtype=torch.int64)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def _weighted(self, generator):
        """Each source's draw for the epoch (its rows in seeded order, cycled when the weight exceeds 1), then all
        draws shuffled together. Deterministic from (seed, epoch): a resumed run draws the same."""
        import torch

        members = torch.from_numpy(np.asarray(self.sources, dtype=np.int64))
        picked = []
        for source, draw in enumerate(self.draws):
            rows = torch.nonzero(members == source).flatten()
            cycles = [rows[torch.randperm(len(rows), generator=generator)] for _ in range(-(-draw // max(len(rows), 1)))]
            picked.append(torch.cat(cycles)[:draw] if cycles else rows[:0])
        everything = torch.cat(picked)
        return everything[torch.randperm(len(everything), generator=generator)]

    def _group_by_length(self, order: list[int], generator) -> list[int]:
        import torch

        mega, grouped = self.global_batch * self.MEGA_STEPS, []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start : start + mega], key=lambda i: -self.lengths[i])
            steps = [chunk[i : i + self.global_batch] for i in range(0, len(chunk), self.global_batch)]
            # The last mega-run may end in a partial step: it stays last, so every other step is full.
            full = [s for s in steps if len(s) == self.global_batch]
            shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
            grouped += [i for s in shuffled + [s for s in steps if len(s) < self.global_batch] for i in s]
        return grouped

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's micro-batches (lists of example indices) for optimizer step ``step`` (0-based)."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        chunk = order[offset * self.global_batch : (offset + 1) * self.global_batch].tolist()
        micro = [chunk[i : i + self.micro_batch_size] for i in range(0, len(chunk), self.micro_batch_size)]
        return micro[self.rank :: self.world_size]

    def epochs_done(self, steps: int) -> float:
        """Epochs completed after ``steps`` optimizer steps, as transformers' Trainer logs its epoch: 0.5 halfway
        through the first, 1.0 at its end (a partial last step counts as a whole one)."""
        return round(steps / self.steps_per_epoch, 4)
