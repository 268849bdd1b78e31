"""What a training run works with: the run directory's layout, and the one typed context the loop takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.adapters.inits import InitRecord
from lorakit.checkpoint.format import TrainState
from lorakit.config.schema import Recipe
from lorakit.data import Datasets, StepSampler
from lorakit.training.perf import StepMeter


@dataclass
class RunPaths:
    root: Path

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"


@dataclass
class FitContext:
    """Everything the loop needs, built by run_training before it starts: the loop decides nothing about the
    method, the precision or the world size (those are settled in the builders)."""

    recipe: Recipe
    accelerator: Any  # accelerate.Accelerator (imported lazily: it pulls in torch.distributed)
    model: torch.nn.Module  # prepared by the accelerator (DDP/FSDP-wrapped when distributed)
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch.optim.lr_scheduler.LRScheduler from transformers' factory
    data: Datasets
    sampler: StepSampler
    total_steps: int
    paths: RunPaths
    meter: StepMeter
    start: TrainState = field(default_factory=TrainState)  # a resumed run's step, tokens and checkpoint
    resume_command: str = "lorakit train RECIPE --resume"  # what Ctrl-C tells the user to run
    padding_free: bool = False  # micro-batches as one flattened row (choose_batching)
    init: InitRecord = field(default_factory=InitRecord)  # what the LoRA init did (checkpoints convert PiSSA/OLoRA)
    loss: Any = field(kw_only=True)  # the training loss (build_training_loss), as the run's settings reported it
    # What mirrors the metrics records to the trackers (trackers.TrackerMirror, rank 0); None without trackers.
    mirror: Any = field(default=None, kw_only=True)
