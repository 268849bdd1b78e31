"""LoRA initialisations that need a step beyond PEFT's config class (adapter.init_lora_weights).

- Weight-rewriting inits (PiSSA, OLoRA) replace each target weight W by a residual W − s·B₀A₀. The adapter is
  saved through PEFT's own conversion (save_pretrained's path_initial_model_for_weight_conversion) into a plain
  LoRA delta on the original base, so every loader (vLLM, `lorakit merge`) gets the trained model: DIR/adapter,
  and each checkpoint's adapter/ (the trained B, A for resume go beside it: lorakit.checkpoint.format).
- Data-driven inits: EVA runs PEFT's initialize_lora_eva_weights on the run's first training micro-batches.
Which inits are refused before loading: lorakit.config.inits.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.adapters.files import stable_config
from lorakit.config.inits import init_name, rewrites_base
from lorakit.config.methods import is_lora_family
from lorakit.errors import UsageError

# The folder name of the initial adapter: PEFT loads it as a second adapter of that name while converting.
INITIAL = "lorakit_initial"
# A checkpoint's folder of the unconverted B, A (resume continues from them; its adapter/ is converted).
RESIDUAL_ADAPTER = "residual_adapter"


@dataclass
class InitRecord:
    """What the init did, for the effective-settings block and lorakit.json."""

    name: str = "default"
    rewritten_modules: int = 0
    initial: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # B₀, A₀ as PEFT saves them
    eva_batches: int = 0
    eva_ranks: dict[str, int] = field(default_factory=dict)
    init_from: str | None = None  # adapter.init_from: the saved adapter whose weights replaced the fresh ones

    @property
    def converted_at_save(self) -> bool:
        return bool(self.initial)

    def summary(self) -> dict:
        # adapter.init_from replaces the fresh weights (the schema refuses it beside another init): the init is
        # that adapter's, not PEFT's default, which a reader of lorakit.json would otherwise take it for
        return {"init_lora_weights": "init_from" if self.init_from else self.name,
                "base_rewritten_modules": self.rewritten_modules,
                "converted_at_save": self.converted_at_save, "eva_batches": self.eva_batches,
                "eva_ranks": dict(self.eva_ranks), "init_from": self.init_from}


def capture_initial(model, section, init_from: Path | None = None) -> InitRecord:
    """Right after the adapter is built (before training or restoring a checkpoint): for a rewriting init, a copy
    of the initial B₀, A₀. A resumed run rebuilds the same decomposition from the same seed, so it captures the
    same tensors, and its final adapter converts exactly as the uninterrupted run's. ``init_from``: the adapter
    directory the weights were loaded from (adapter.init_from), recorded as the init."""
    name = init_name(section.model_extra or {}) if is_lora_family(section.method) else "default"
    record = InitRecord(name=name, init_from=None if init_from is None else str(init_from))
    if not rewrites_base(name):
        return record
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    record.initial = {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}
    record.rewritten_modules = sum(isinstance(m, LoraLayer) for m in model.modules())
    return record


def save_converted(model, out: Path, record: InitRecord) -> None:
    """PEFT's save_pretrained with path_initial_model_for_weight_conversion: the saved adapter is ΔW = BA − B₀A₀
    as a rank-2r LoRA ([A; A₀], [B, −B₀]) on the original base, and its config says init_lora_weights: true,
    so no loader re-runs the decomposition. PEFT writes the initial adapter's config itself.

    Used at every checkpoint as well as at the end, so it must leave a training run as it found it: PEFT attaches
    B₀, A₀ as a second adapter for the conversion (drawing random numbers for its fresh layers and switching the
    model to eval mode) and deletes it again; the RNG and each module's mode are restored here.
    """
    from safetensors.torch import save_file

    modes = [(module, module.training) for module in model.modules()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with tempfile.TemporaryDirectory(prefix="lorakit-init-") as tmp, torch.random.fork_rng(devices=devices):
        initial = Path(tmp) / INITIAL
        initial.mkdir()
        save_file(record.initial, str(initial / "adapter_model.safetensors"))
        model.save_pretrained(out, path_initial_model_for_weight_conversion=str(initial))
    stable_config(Path(out))
    for module, training in modes:
        module.training = training


# ----------------------------------------------------------------------------------------------------------
# Data-driven inits


def eva_components(section) -> int:
    """The most singular vectors EVA computes for one layer: r·rho (PEFT's max_components)."""
    rho = ((section.model_extra or {}).get("eva_config") or {}).get("rho", 2.0)
    return round(section.r * rho)


def run_eva(model, batches: list[dict], record: InitRecord, section) -> None:
    """PEFT's initialize_lora_eva_weights on ``batches`` (this rank's first training micro-batches, padded).

    Under DDP each rank passes its own micro-batches and PEFT gathers the layer inputs of all ranks for the SVD
    (gather_distributed_inputs), so every rank computes the same A. PEFT cycles the batches until the singular
    vectors converge; a batch with fewer usable tokens than components never counts, so too little data is
    refused here rather than left to loop.
    """
    from peft import initialize_lora_eva_weights

    batches = [dict(b) for b in batches]  # PEFT wants plain dicts, not the collator's BatchEncoding
    eva = (section.model_extra or {}).get("eva_config") or {}
    use_mask = eva.get("use_label_mask", True)
    usable = [int((b["labels"] != -100).sum()) if use_mask else int(b["attention_mask"].sum()) for b in batches]
    need = eva_components(section)
    if max(usable, default=0) < need:
        what = "supervised tokens" if use_mask else "tokens"
        raise UsageError(
            f"adapter.init_lora_weights: eva needs a first micro-batch with at least {need} {what} (r·rho) for its "
            f"SVD, the largest has {max(usable, default=0)}; raise train.micro_batch_size, lower adapter.r, or set "
            "adapter.eva_config: {use_label_mask: false}"
        )
    initialize_lora_eva_weights(model, batches, show_progress_bar=False)
    record.eva_batches = len(batches)
    from peft.tuners.lora import LoraLayer

    record.eva_ranks = {n.removeprefix("base_model.model."): m.r["default"] for n, m in model.named_modules()
                        if isinstance(m, LoraLayer) and "default" in m.r}
