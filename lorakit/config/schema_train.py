"""The recipe's train section: schedule, objective (supervised or a preference loss), evaluation, checkpoints.

Part of the recipe schema (lorakit.config.schema re-exports everything here); nothing imports torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lorakit.config.schema_base import Section, _did_you_mean

EVAL_METRICS = ("exact", "contains", "regex", "rouge-l")  # `lorakit eval --metric` and train.eval_metric
# transformers' SchedulerType values; tests/config/test_recipe.py fails when transformers changes them.
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",
)
# Training objectives (train.objective): supervised fine-tuning, or a preference loss over chosen/rejected pairs.
OBJECTIVES = ("sft", "dpo", "ipo", "orpo", "simpo")
PREFERENCE_OBJECTIVES = OBJECTIVES[1:]
# The preference keys of train each objective uses, with their defaults (None: no default, the key is optional).
# DPO/IPO β 0.1 as in the DPO paper and TRL; SimPO β 2.0 and γ 0.5 as in the SimPO paper; ORPO λ 0.1 as in TRL.
OBJECTIVE_KEYS = {
    "sft": {},
    "dpo": {"beta": 0.1, "label_smoothing": 0.0, "reference": "base"},
    "ipo": {"beta": 0.1, "reference": "base"},
    "orpo": {"orpo_lambda": 0.1},
    "simpo": {"beta": 2.0, "simpo_gamma": 0.5},
}
REFERENCES = ("base", "precomputed", "init_from")
# Schedules get_scheduler cannot build from the step count alone: they step on a metric, or need arguments a
# recipe has no key for. Refused when the recipe is read, not with exit 1 once the model has loaded.
_STEPS_ON_A_METRIC = "it steps on a metric (an eval loss after every step), not on the step count"
_NEEDS_MIN_LR = "it needs min_lr or min_lr_rate, which a recipe has no key for"
UNSUPPORTED_SCHEDULERS = {
    "reduce_lr_on_plateau": _STEPS_ON_A_METRIC,
    "greedy": _STEPS_ON_A_METRIC,
    "cosine_with_min_lr": _NEEDS_MIN_LR,
    "cosine_warmup_with_min_lr": _NEEDS_MIN_LR,
    "warmup_stable_decay": "it needs num_decay_steps, which a recipe has no key for",
}
USABLE_SCHEDULERS = tuple(name for name in SCHEDULERS if name not in UNSUPPORTED_SCHEDULERS)
# Schedules transformers' get_scheduler builds without num_warmup_steps: a warmup given with them is refused.
NO_WARMUP_SCHEDULERS = ("constant",)


class TrainSection(Section):
    max_steps: int | None = Field(None, gt=0, description="Number of optimizer steps (set this or train.epochs).")
    epochs: int | None = Field(None, gt=0, description="Number of passes over the training data (or train.max_steps).")
    micro_batch_size: int = Field(4, gt=0, description="Examples per forward/backward pass on each device.")
    grad_accum: int = Field(
        4, gt=0, description="Micro-batches accumulated per optimizer step (trades memory for speed)."
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: str = Field(
        "cosine", description="Learning-rate schedule: a transformers scheduler that runs on the step count ("
        + ", ".join(USABLE_SCHEDULERS) + ")."
    )
    warmup_steps: int = Field(
        0, ge=0, description="Linear warmup steps (or train.warmup_ratio). As in transformers' schedules the "
        "learning rate climbs from 0: optimizer step k (from 1) runs at (k - 1) / warmup_steps of "
        "train.learning_rate, so step 1 changes no weight. Refused with the constant schedule, which has no warmup.",
    )
    warmup_ratio: float | None = Field(
        None, ge=0, lt=1, description="Warmup as a fraction of the total steps (instead of train.warmup_steps)."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the trainable parameters.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw", description="adamw (torch's AdamW, its fused kernel on CPU and CUDA), adamw_8bit or paged_adamw_8bit "
        "(bitsandbytes)."
    )
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the gradient norm to this value (0 disables clipping).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: much less memory, ~30% slower."
    )
    chunked_loss: bool = Field(
        True,
        description="Apply the LM head and cross-entropy in chunks over supervised positions only: no "
        "full-vocabulary logits for the whole batch (less memory, and no head FLOPs on prompt or pad tokens). "
        "Uses Liger's fused kernel when liger-kernel is installed and a GPU is present; falls back to the "
        "model's own loss where the head cannot run apart (an adapter on the head, a sharded head, logit "
        "soft-capping). Refused with prompt/prefix tuning, which always runs the model's own loss.",
    )
    compile: bool = Field(
        False,
        description="torch.compile the model (dynamic shapes). Speed knob: pays on long runs with a GPU; the "
        "first steps are slower while it compiles.",
    )
    liger: bool = Field(
        False,
        description="Apply Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) to the model. Needs a GPU and "
        "pip install liger-kernel.",
    )
    threads: int | None = Field(
        None,
        gt=0,
        description="CPU threads of torch's intra-op pool. Default: OMP_NUM_THREADS if set, else the CPUs this "
        "process may use (its affinity mask and cgroup quota, not the machine's core count), divided among the "
        "processes launched on the machine. Fewer threads than cores leave room for other jobs; more than usable "
        "makes every step wait; more than the machine's CPUs is refused.",
    )
    objective: Literal[OBJECTIVES] = Field(
        "sft",
        description="What is learned: sft (cross-entropy on the answers), or a preference loss over chosen/rejected "
        "pairs (data.format: preference): dpo (Rafailov et al. 2023), ipo (Azar et al. 2023, length-normalised "
        "log-probs), orpo (Hong et al. 2024: the chosen answer's NLL plus an odds-ratio term, no reference) or "
        "simpo (Meng et al. 2024: length-normalised log-probs and a margin, no reference). docs/preference.md.",
    )
    beta: float | None = Field(
        None, gt=0,
        description="dpo/ipo/simpo: the preference loss's β (how far the policy may move from the reference; "
        "SimPO: the reward scale). Default 0.1 (dpo, ipo), 2.0 (simpo).",
    )
    label_smoothing: float | None = Field(
        None, ge=0, lt=0.5,
        description="dpo only: the probability that a pair's labels are flipped (conservative DPO); default 0.",
    )
    simpo_gamma: float | None = Field(
        None, ge=0, description="simpo only: the target reward margin γ; default 0.5."
    )
    orpo_lambda: float | None = Field(
        None, gt=0, description="orpo only: the weight λ of the odds-ratio term beside the chosen answer's NLL; "
        "default 0.1.",
    )
    reference: Literal[REFERENCES] | None = Field(
        None,
        description="dpo/ipo: the reference model's log-probabilities. base (default): the same model with the "
        "adapter switched off, one extra forward without gradients per micro-batch, no second copy of the "
        "weights. precomputed: the same, computed once before training in one pass and stored in the data cache "
        "(no reference forward during training). init_from: the adapter named by adapter.init_from, as it is "
        "loaded (the model this stage starts from), its log-probs precomputed the same way.",
    )
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for initialisation, data order and dropout.")
    log_every: int = Field(10, gt=0, description="Log metrics every N optimizer steps.")
    eval_every: int = Field(0, ge=0, description="Evaluate every N optimizer steps (0: only at the end).")
    eval_generate: int = Field(
        0, ge=0,
        description="At each evaluation and at the end, also answer the first N eval rows greedily (prompts "
        "rendered as in training, as `lorakit eval` does) and score them with train.eval_metric: eval_score in "
        "metrics.jsonl, the trackers and the plot. Needs eval data with answers (not data.format text).",
    )
    eval_metric: Literal[EVAL_METRICS] = Field(
        "exact", description="How train.eval_generate scores an answer: exact, contains, regex (the answer is a "
        "pattern) or rouge-l; whitespace normalised, case folded. Refused without train.eval_generate.",
    )
    save_every: int = Field(0, ge=0, description="Write a resumable checkpoint every N optimizer steps (0: never).")
    save_each_epoch: bool = Field(False, description="Also write a resumable checkpoint at the end of every epoch.")
    keep_last: int = Field(
        2, gt=0, description="How many of the newest complete checkpoints to keep (older ones are deleted). Refused "
        "when the run writes none (train.save_every 0 and train.save_each_epoch false).",
    )
    # Kept in every recipe, though it matters only with several processes: a recipe runs on one GPU and on many
    # (lorakit.config.start refuses keys by the recipe alone, never by the machine).
    ddp_timeout: int = Field(
        1800,
        gt=0,
        description="Multi-process runs: seconds a process waits in a collective (gradient all-reduce, barrier, "
        "checkpoint save) for the others before the whole run fails; bounds how long a dead or stuck rank can "
        "hang the job. Raise it when saving a checkpoint of a large model takes longer.",
    )

    @model_validator(mode="after")
    def _one_length(self) -> "TrainSection":
        if (self.max_steps is None) == (self.epochs is None):
            both = "both are set" if self.max_steps is not None else "neither is set"
            raise ValueError(f"train.max_steps / train.epochs: set exactly one of them ({both})")
        return self

    @model_validator(mode="after")
    def _one_warmup(self) -> "TrainSection":
        if self.warmup_ratio is not None and self.warmup_steps > 0:
            raise ValueError("train.warmup_steps / train.warmup_ratio: set only one of them")
        if (self.warmup_steps or self.warmup_ratio) and self.lr_scheduler in NO_WARMUP_SCHEDULERS:
            key = "train.warmup_steps" if self.warmup_steps else "train.warmup_ratio"
            raise ValueError(f"{key}: the {self.lr_scheduler} schedule has no warmup; use train.lr_scheduler: "
                             f"constant_with_warmup (or another schedule with one), or remove {key}")
        return self

    @model_validator(mode="after")
    def _objective_keys(self) -> "TrainSection":
        used = OBJECTIVE_KEYS[self.objective]
        given = [k for k in ("beta", "label_smoothing", "simpo_gamma", "orpo_lambda", "reference")
                 if k not in used and getattr(self, k) is not None]
        if given:
            users = {k: [o for o, keys in OBJECTIVE_KEYS.items() if k in keys] for k in given}
            keys = "; ".join(f"train.{k} is for {'/'.join(users[k])}" for k in given)
            raise ValueError(f"{keys}: not used by train.objective {self.objective}; remove "
                             f"{'it' if len(given) == 1 else 'them'}")
        for key, default in used.items():
            if getattr(self, key) is None:
                setattr(self, key, default)
        return self

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, name: str) -> str:
        if name in UNSUPPORTED_SCHEDULERS:
            raise ValueError(f"train.lr_scheduler: {name!r} cannot run from a recipe: {UNSUPPORTED_SCHEDULERS[name]}; "
                             f"choose one of {', '.join(USABLE_SCHEDULERS)}")
        if name not in SCHEDULERS:
            raise ValueError(
                f"train.lr_scheduler: unknown scheduler {name!r}{_did_you_mean(name, USABLE_SCHEDULERS)}"
                f"; choose one of {', '.join(USABLE_SCHEDULERS)}"
            )
        return name
