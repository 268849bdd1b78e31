"""What a model is, for memory estimates: exact parameter counts and shapes from a meta-device build.

`inspect_model` builds the model from its config on the meta device (no weights read), applies the recipe's
adapter there with training's own builder, and keeps what lorakit.memory.estimate's formulas need: PEFT's counts, the
weights bitsandbytes would quantize, the decoder geometry and every LoRA module.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from dataclasses import dataclass, replace

from lorakit.config.tokens import tokens_to_train
from lorakit.errors import UsageError

NF4_BLOCK, DQ_BLOCK = 64, 256  # bitsandbytes 4-bit block size; second-level block of double quantization

# Which linear layers read the same input tensor (so one saved copy serves all of them).
_GROUPS = {
    "attn_in": {"q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query_key_value", "Wqkv", "query", "key", "value"},
    "attn_out": {"o_proj", "out_proj", "dense"},
    "mlp_in": {"gate_proj", "up_proj", "gate_up_proj", "c_fc", "fc1", "w1", "w3", "gate"},
    "mlp_out": {"down_proj", "fc2", "w2"},
}


@dataclass(frozen=True)
class LoraModule:
    layer: int
    name: str
    group: str
    in_features: int
    out_features: int
    r: int


@dataclass(frozen=True)
class Geometry:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool
    norms_per_layer: int
    norm_kind: str  # rms | layer
    experts: int  # 0 for dense models
    experts_per_token: int
    attn_default: str
    attn_softcap: bool
    logit_softcap: bool
    logit_transform: bool  # the model scales or soft-caps its logits after the head (lorakit.training.loss then runs plain)
    head_name: str
    max_positions: int | None
    rotary: bool
    layer_params: int
    group_inputs: tuple  # ((group, in_features), ...) of the linear layers in one decoder layer


@dataclass(frozen=True)
class Quantizable:
    """The weights bitsandbytes would replace (nn.Linear/Conv1D outside transformers' skip list)."""

    numel: int = 0
    tensors: int = 0
    blocks: int = 0  # sum over tensors of ceil(n / 64)
    blocks2: int = 0  # sum over tensors of ceil(blocks / 256)
    packed_bytes: int = 0  # sum over tensors of ceil(n / 2)
    rows: int = 0  # out_features summed (int8 keeps one fp32 scale per row)
    largest: int = 0


@dataclass(frozen=True)
class ModelProfile:
    name: str
    source: str
    model_type: str
    base_params: int
    total_params: int  # PEFT's count with the adapter (= base_params for full fine-tuning)
    trainable_params: int  # PEFT's count of the adapter
    adapter_method: str
    base_tensors: tuple  # numel of every base parameter (optimizer states of full fine-tuning)
    adapter_tensors: tuple
    buffer_bytes: int
    quantizable: Quantizable
    geometry: Geometry
    lora_modules: tuple
    notes: tuple = ()


@contextlib.contextmanager
def _quiet():
    """Meta builds of foreign configs warn about token ids and deprecations that do not matter for counting."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def decoder_layers(model):
    from lorakit.models.loading import decoder_layers as layers  # torch-importing module: loaded only when counting

    return layers(model)


def quantizable_weights(model) -> Quantizable:
    """Mirror of transformers' replace_with_bnb_linear: which weights bitsandbytes quantizes."""
    import torch
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    sizes, rows = [], 0
    for name, module in model.named_modules():
        if should_convert_module(name, skip) and (isinstance(module, Conv1D) or type(module) is torch.nn.Linear):
            sizes.append(module.weight.numel())
            rows += module.weight.shape[1] if isinstance(module, Conv1D) else module.out_features
    blocks = [math.ceil(n / NF4_BLOCK) for n in sizes]
    return Quantizable(
        numel=sum(sizes),
        tensors=len(sizes),
        blocks=sum(blocks),
        blocks2=sum(math.ceil(b / DQ_BLOCK) for b in blocks),
        packed_bytes=sum(math.ceil(n / 2) for n in sizes),
        rows=rows,
        largest=max(sizes, default=0),
    )


def _group(name: str, parent: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "c_proj":  # GPT-2 uses c_proj for both attention and MLP outputs
        return "attn_out" if "attn" in parent else "mlp_out"
    return next((g for g, names in _GROUPS.items() if leaf in names), f"other:{leaf}")


def geometry(model) -> Geometry:
    import torch
    from transformers.pytorch_utils import Conv1D

    from lorakit.training.loss import LOGIT_TRANSFORMS

    c = model.config
    layer = decoder_layers(model)[0]
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    norms = [m for m in layer.modules() if type(m).__name__.endswith("Norm")]
    names = {n.rsplit(".", 1)[-1] for n, _ in [*layer.named_modules(), *layer.named_parameters()]}
    groups: dict[str, int] = {}
    for name, module in layer.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            inp = module.weight.shape[0] if isinstance(module, Conv1D) else module.in_features
            groups.setdefault(_group(name, name.rsplit(".", 1)[0]), inp)
    return Geometry(
        layers=c.num_hidden_layers,
        hidden=c.hidden_size,
        heads=heads,
        kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate=getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * c.hidden_size,
        vocab=model.get_output_embeddings().weight.shape[0],
        gated_mlp=bool(names & {"gate_proj", "gate_up_proj", "w1"}),
        norms_per_layer=len(norms),
        norm_kind="layer" if norms and isinstance(norms[0], torch.nn.LayerNorm) else "rms",
        experts=getattr(c, "num_local_experts", 0) or 0,
        experts_per_token=getattr(c, "num_experts_per_tok", 0) or 0,
        attn_default=c._attn_implementation or "sdpa",
        attn_softcap=bool(getattr(c, "attn_logit_softcapping", None)),
        logit_softcap=bool(getattr(c, "final_logit_softcapping", None)),
        logit_transform=any(getattr(c, k, None) not in (None, 1, 1.0) for k in LOGIT_TRANSFORMS),
        head_name=next(n for n, m in model.named_modules() if m is model.get_output_embeddings()),
        max_positions=getattr(c, "max_position_embeddings", None),
        rotary=any("rotary" in n for n, _ in model.named_modules()),
        layer_params=sum(p.numel() for p in layer.parameters()),
        group_inputs=tuple(groups.items()),
    )


def _layer_index(name: str) -> int:
    found = re.search(r"\.(\d+)\.", name)
    return int(found.group(1)) if found else -1


# Adapter options that can treat layers differently: with them every layer is built and counted.
_LAYER_SPECIFIC = {"layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "exclude_modules"}
EXTRAPOLATE_ABOVE = 32  # layers; below this the whole model is adapted (fast enough), above it two layers are


def _meta_model(config):
    from lorakit.models.meta import build_meta_model

    try:
        return build_meta_model(config)
    except (ValueError, KeyError) as e:
        raise UsageError(f"--model: cannot build a causal LM from this config: {str(e).splitlines()[0]}") from None


def _extrapolatable(model, adapter) -> bool:
    """Identical layers and a layer-blind adapter: two adapted layers then give every count exactly."""
    layers = decoder_layers(model)
    if len(layers) <= EXTRAPOLATE_ABOVE or adapter.method not in ("lora", "dora"):
        return False
    targets = adapter.target_modules
    if not (targets == "all-linear" or (isinstance(targets, list) and not any("." in t for t in targets))):
        return False
    if _LAYER_SPECIFIC & set(adapter.model_extra or {}):
        return False
    shapes = [tuple((n, tuple(p.shape)) for n, p in layer.named_parameters()) for layer in layers]
    return all(shape == shapes[0] for shape in shapes)


def _keep_layers(model, keep: int) -> None:
    """Cut the meta model's decoder stack to its first ``keep`` layers (our own throwaway model)."""
    import torch

    layers = decoder_layers(model)
    for _, parent in model.named_modules():
        for attr, child in parent.named_children():
            if child is layers:
                setattr(parent, attr, torch.nn.ModuleList(list(layers)[:keep]))
                return


def apply_adapter_meta(config, adapter, keep: int | None):
    """A fresh meta model (first ``keep`` layers only, if given) with the adapter applied by training's own
    builder (its errors are the recipe's errors); (model, base params of that model)."""
    import torch

    from lorakit.adapters.build import counting_section
    from lorakit.adapters.build import apply_adapter

    model = _meta_model(config)
    if keep:
        _keep_layers(model, keep)
    base = sum(p.numel() for p in model.parameters())
    with torch.device("meta"):
        return apply_adapter(model, counting_section(adapter), low_cpu_mem_usage=True), base


def _adapted(config, adapter, base_params: int, layers: int, keep: int | None):
    """(trainable, total, trainable tensor sizes, LoRA modules), extrapolated when ``keep``."""
    from peft.tuners.lora import LoraLayer

    model, kept_base = apply_adapter_meta(config, adapter, keep)
    trainable, total = model.get_nb_trainable_parameters()
    tensors = [(_layer_index(n), p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    lora = [  # PEFT nests wrappers of several parameters of one module (MoE experts) as .base_layer
        LoraModule(_layer_index(n), n, _group(n, n.rsplit(".", 1)[0]), m.in_features, m.out_features, m.r["default"])
        for n, m in ((re.sub(r"(\.base_layer)+$", "", n), m) for n, m in model.named_modules())
        if isinstance(m, LoraLayer) and "default" in m.r
    ]
    if keep:
        first, last = ([t for i, t in tensors if i == k] for k in (0, keep - 1))
        if sorted(first) != sorted(last):
            return None
        extra = layers - keep
        trainable += extra * sum(last)
        total += base_params - kept_base + extra * sum(last)
        tensors += [(i, t) for i in range(keep, layers) for t in last]
        lora += [replace(m, layer=i) for i in range(keep, layers) for m in lora if m.layer == keep - 1]
    return trainable, total, tuple(t for _, t in tensors), tuple(lora)


def inspect_model(config, adapter, name: str = "", source: str = "") -> ModelProfile:
    """Exact counts and shapes for ``config`` with the recipe's ``adapter`` section applied (meta device).

    Models with many identical layers adapt two layers and multiply: the counts equal PEFT's on the whole model.
    """
    with _quiet():
        model = _meta_model(config)
        base = [p.numel() for p in model.parameters()]  # parameters() skips tied duplicates, like PEFT's count
        buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
        quant, geo = quantizable_weights(model), geometry(model)
        keep = 2 if _extrapolatable(model, adapter) else None
        adapted = _adapted(config, adapter, sum(base), geo.layers, keep)
        if adapted is None:
            adapted = _adapted(config, adapter, sum(base), geo.layers, None)
    trainable, total, adapter_tensors, lora = adapted
    notes = []
    if geo.experts and quant.numel < sum(base) / 2:
        notes.append(
            "MoE experts are fused 3-D parameters in transformers 5: bitsandbytes does not quantize them, "
            "so they stay unquantized (in model.dtype; fp32 with model.upcast_unquantized)"
        )
    return ModelProfile(
        name=name or getattr(config, "_name_or_path", "") or config.model_type,
        source=source,
        model_type=config.model_type,
        base_params=sum(base),
        total_params=total,
        trainable_params=trainable,
        adapter_method=adapter.method,
        base_tensors=tuple(base),
        adapter_tensors=adapter_tensors,
        buffer_bytes=buffer_bytes,
        quantizable=quant,
        geometry=geo,
        lora_modules=lora,
        notes=tuple(notes),
    )


def add_token_rows(config, profile: ModelProfile, recipe) -> ModelProfile:
    """``profile`` with model.add_tokens and adapter.trainable_tokens counted: the vocabulary grows by every added
    token (assumed new: the tokenizer is not read here), and each trainable token adds one row per embedding
    matrix it trains (the input embedding, and the LM head unless tied), as PEFT's trainable_token_indices does."""
    trained, added = len(tokens_to_train(recipe)), len(recipe.model.add_tokens)
    if not trained:
        return profile
    text = config.get_text_config()
    matrices = 1 if getattr(text, "tie_word_embeddings", False) else 2
    rows = trained * text.hidden_size
    grown = added * text.hidden_size * matrices
    return replace(
        profile,
        base_params=profile.base_params + grown,
        total_params=profile.total_params + grown + rows * matrices,
        trainable_params=profile.trainable_params + rows * matrices,
        base_tensors=profile.base_tensors + ((added * text.hidden_size,) * matrices if added else ()),
        adapter_tensors=profile.adapter_tensors + (rows,) * matrices,
        notes=profile.notes + (f"{trained} trainable token rows × {matrices} embedding matrices"
                               + (f", vocabulary + {added} added tokens" if added else ""),),
    )
