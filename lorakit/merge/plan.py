"""Planning a merge: which stored base tensors an adapter changes, how the output is sharded, and the
checks (shapes, tied embeddings, quantized modules) that must pass before anything is written."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.adapters.files import Adapter
from lorakit.config.schema import ModelSection
from lorakit.errors import CheckpointError, UsageError
from lorakit.merge.tokens import grown_embeddings, is_token_rows
from lorakit.merge.weights_io import StoredTensor, nbytes
from lorakit.models.meta import build_meta_model


_ADAPTER_SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "B_bias", ".lora_embedding_A": "A",
    ".lora_embedding_B": "B", ".lora_magnitude_vector": "m", ".ia3_l": "ia3",
}


@dataclass
class ModuleUpdate:
    """The adapter's tensors for one module of the base, and how the module stores its weight."""

    module: str
    transposed: bool = False  # Conv1D and Embedding store the weight as (in, out)
    scaling: float = 1.0
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # A, B, B_bias, m, ia3

    def apply_weight(self, weight: torch.Tensor, device: str) -> torch.Tensor:
        """The merged weight in float32, as PEFT's forward computes it (peft/tuners/lora, ia3); ``weight`` may be
        updated in place (fresh allocations of every weight would cost page faults for nothing)."""
        w = weight.to(device, torch.float32)
        w = w.T if self.transposed else w  # (out, in) from here on
        p = {k: v.to(device, torch.float32) for k, v in self.parts.items()}
        if "ia3" in p:
            w.mul_(p["ia3"])  # (1, in) scales inputs (feedforward), (out, 1) scales outputs
        elif "A" in p:
            w.addmm_(p["B"], p["A"], alpha=self.scaling)  # W + s·B·A
            if "m" in p:  # DoRA: magnitude times the row-normalised direction, the norm taken after the update
                w.mul_((p["m"] / torch.linalg.norm(w, dim=1)).view(-1, 1))
        return (w.T if self.transposed else w).contiguous()

    @property
    def changes_bias(self) -> bool:
        return "B_bias" in self.parts or ("ia3" in self.parts and self.parts["ia3"].shape[1] == 1)

    def apply_bias(self, bias: torch.Tensor, device: str) -> torch.Tensor:
        b = bias.to(device, torch.float32)
        if "ia3" in self.parts:  # output scaling scales the bias too
            return b * self.parts["ia3"].to(device, torch.float32).flatten()
        return b + self.parts["B_bias"].to(device, torch.float32) * self.scaling


def collect_updates(adapter: Adapter, base_keys: set[str]) -> tuple[dict[str, ModuleUpdate], dict]:
    """Group the adapter's tensors by base module; full replacements (modules_to_save, saved embeddings) apart."""
    updates: dict[str, ModuleUpdate] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, tensor in adapter.tensors.items():
        if is_token_rows(key):
            continue  # whole grown embeddings, merge.tokens.grown_embeddings
        suffix = next((s for s in _ADAPTER_SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            module = key[: -len(suffix)]
            updates.setdefault(module, ModuleUpdate(module)).parts[_ADAPTER_SUFFIXES[suffix]] = tensor
        elif ".base_layer." in key:  # PEFT saved the (possibly resized) embedding the adapter sits on
            replacements[key.replace(".base_layer.", ".")] = tensor
        elif key in base_keys:  # modules_to_save: a fully trained copy of the module
            replacements[key] = tensor
        else:
            raise CheckpointError(
                f"{adapter.path}: adapter tensor {key} matches no weight of the base; "
                "was the adapter trained on another model?"
            )
    patterns = adapter.config.get("alpha_pattern") or {}
    for name, update in updates.items():
        if "A" in update.parts:
            r = update.parts["A"].shape[0]  # rank_pattern is already in the tensor shapes
            # alpha_pattern keys match a module name's dotted suffix, as peft.utils.other.get_pattern_key
            # matches them (not imported: importing peft costs seconds and nothing else here needs it).
            key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", name)), None)
            alpha = patterns[key] if key is not None else adapter.config["lora_alpha"]
            update.scaling = alpha / (r**0.5) if adapter.config.get("use_rslora") else alpha / r
    return updates, replacements


@dataclass
class OutTensor:
    name: str
    source: StoredTensor
    dtype: torch.dtype
    update: ModuleUpdate | None = None
    replacement: torch.Tensor | None = None
    round_trip: bool = False

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        """The source's, or a replacement's that grew (an embedding with added tokens)."""
        return tuple(self.replacement.shape) if self.replacement is not None else self.source.shape


@dataclass
class MergePlan:
    tensors: list[OutTensor]
    shards: list[list[OutTensor]]
    untie: bool
    quantized_modules: set[str]
    merged_modules: int
    vocab_size: int | None = None  # grown by trainable token rows (model.add_tokens)


def meta_model(base_dir: Path):
    """The base architecture on the meta device (no memory): module types, tied weights, quantizable layers."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base_dir)
        return config, build_meta_model(config)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--base {base_dir}: cannot build the model from its config.json ({e})") from None


def quantized_module_names(model) -> set[str]:
    """The layers bitsandbytes quantizes when transformers loads this model in 4 or 8 bits."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = get_keys_to_not_convert(model) + list(model._keep_in_fp32_modules or [])
    return {
        name for name, m in model.named_modules()
        if (type(m) is torch.nn.Linear or isinstance(m, Conv1D)) and should_convert_module(name, skip)
    }


def plan_merge(adapter, base_tensors, model, dtype, round_trip: bool, max_shard_bytes: int) -> MergePlan:
    """Match every adapter tensor to a base weight, check shapes, and lay the output out in shards."""
    from transformers.pytorch_utils import Conv1D

    by_key = {t.key: t for t in base_tensors}
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}  # tied lm_head.weight too
    updates, replacements = collect_updates(adapter, set(by_key) | params)
    untie, extra = _untie(adapter, model, by_key, updates, replacements)
    sources = {**by_key, **dict(extra)}
    modules = dict(model.named_modules())
    for name, update in updates.items():
        module = modules.get(name)
        if module is None or f"{name}.weight" not in sources:
            raise CheckpointError(f"{adapter.path}: the adapter targets {name}, which the base does not have")
        if not isinstance(module, (torch.nn.Linear, Conv1D, torch.nn.Embedding)):
            raise UsageError(f"{adapter.path}: {name} is a {type(module).__name__}; lorakit merges Linear, Conv1D "
                             "and Embedding layers only")
        update.transposed = isinstance(module, (Conv1D, torch.nn.Embedding))
        _check_shapes(adapter, update, sources[f"{name}.weight"].shape, sources.get(f"{name}.bias"))
    for key, tensor in replacements.items():
        if key not in sources or tuple(tensor.shape) != sources[key].shape:
            raise CheckpointError(f"{adapter.path}: adapter tensor {key} {tuple(tensor.shape)} does not fit the base "
                                  f"weight {sources[key].shape if key in sources else '(missing)'}")
    grown = grown_embeddings(adapter, model, sources)  # after _untie: a tied head stays tied to the grown rows
    replacements.update(grown)

    quantized = quantized_module_names(model) if round_trip else set()
    out = []
    for name, source in [(t.key, t) for t in base_tensors] + extra:
        module, _, param = name.rpartition(".")
        update = updates.get(module)
        if update is not None and not (param == "weight" or (param == "bias" and update.changes_bias)):
            update = None
        out.append(OutTensor(
            name=name, source=source, update=update, replacement=replacements.get(name),
            dtype=dtype if (dtype is not None and source.dtype.is_floating_point) else source.dtype,
            round_trip=param == "weight" and module in quantized,
        ))
    vocab = max((t.shape[0] for t in grown.values()), default=None)
    return MergePlan(out, _shards(out, max_shard_bytes), untie, quantized, len(updates) + len(replacements), vocab)


def _check_shapes(adapter: Adapter, update: ModuleUpdate, stored: tuple, bias: StoredTensor | None) -> None:
    out_f, in_f = (stored[1], stored[0]) if update.transposed else stored
    p = update.parts
    expected = {"ia3": [(1, in_f), (out_f, 1)]} if "ia3" in p else {
        "A": [(p["A"].shape[0], in_f)], "B": [(out_f, p["A"].shape[0])], "m": [(out_f,)], "B_bias": [(out_f,)],
    }
    if "ia3" not in p and ("A" not in p or "B" not in p):
        raise CheckpointError(f"{adapter.path}: {update.module} has only half of its LoRA pair (lora_A/lora_B)")
    for part, tensor in p.items():
        if tuple(tensor.shape) not in expected.get(part, []):
            raise CheckpointError(
                f"{adapter.path}: adapter tensor {update.module} {part} {tuple(tensor.shape)} does not fit the "
                f"base weight {update.module} ({out_f} out x {in_f} in); was the adapter trained on another model?"
            )
    if "B_bias" in p and bias is None:
        raise UsageError(f"{adapter.path}: {update.module} has a LoRA bias (lora_bias) but the base layer has none, "
                         "so a merged model has nowhere to put it (or --base is not the model it was trained on); "
                         f"serve the adapter with `lorakit generate --adapter {adapter.path}`")


def _output_embedding_name(model) -> str:
    out = model.get_output_embeddings()
    return next(name for name, m in model.named_modules() if m is out)


def _untie(adapter, model, by_key, updates, replacements) -> tuple[bool, list[tuple[str, StoredTensor]]]:
    """Tied input/output embeddings that the adapter touches are written apart, to keep the adapter's logits."""
    out_mod, in_mod = model.get_output_embeddings(), model.get_input_embeddings()
    if out_mod is None or in_mod is None or out_mod.weight is not in_mod.weight:
        return False, []
    in_name = next(n for n, m in model.named_modules() if m is in_mod)
    out_name = _output_embedding_name(model)
    touched = {k.rpartition(".")[0] for k in replacements} | set(updates)
    if not {in_name, out_name} & touched:
        return False, []
    if adapter.config.get("ensure_weight_tying"):
        raise UsageError(f"{adapter.path}: ensure_weight_tying adapters on tied embeddings are not mergeable by "
                         "lorakit yet; serve the adapter with `lorakit generate --adapter`")
    out_key = f"{out_name}.weight"
    return True, [] if out_key in by_key else [(out_key, by_key[f"{in_name}.weight"])]


def _shards(tensors: list[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    shards, current, size = [], [], 0
    for t in tensors:
        if current and size + t.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += t.nbytes
    return shards + [current] if current else shards


def round_trip_weight(weight: torch.Tensor, record: dict) -> torch.Tensor:
    """The weight as the quantized base served it during training: bitsandbytes quantize → dequantize."""
    import bitsandbytes.functional as bnbf

    quant = record.get("quantization")
    if quant == "int8":  # LLM.int8: row-wise absmax of the fp16 weight (bitsandbytes Int8Params._quantize)
        cb, scb, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        return bnbf.int8_vectorwise_dequant(cb, scb)
    dtype = _training_dtype(record)
    # bitsandbytes Params4bit quantizes the weight cast to the load dtype, in blocks of 64 (its default).
    double_quant = record.get("double_quant", ModelSection.model_fields["double_quant"].default)
    q, state = bnbf.quantize_4bit(weight.to(dtype).contiguous(), blocksize=64, quant_type=quant,
                                  compress_statistics=bool(double_quant))
    return bnbf.dequantize_4bit(q, state)


def _training_dtype(record: dict) -> torch.dtype:
    from lorakit.models.loading import resolve_dtype

    return resolve_dtype(record.get("dtype") or "auto")
