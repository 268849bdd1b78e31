"""Training-memory estimates: exact parameter counts from a meta-device model, then bytes line by line.

`inspect_model` builds the model on the meta device from its config (no weights read), applies the recipe's
PEFT config there and records what the formulas need; `estimate` turns that profile and the knobs (batch,
sequence, precision, optimizer, checkpointing, GPUs) into breakdown lines, each carrying its formula.
Activation formulas count the tensors autograd keeps for backward; scripts/bench_memory.py measures them.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from dataclasses import dataclass, field, replace

from lorakit.errors import UsageError

GiB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAPTER_BYTES = 4  # get_peft_model(autocast_adapter_dtype=True) keeps adapter weights in fp32 on bf16/fp16 bases
OVERHEAD_BYTES = GiB  # CUDA context (~0.5 GiB with lazy loading) + cuBLAS workspaces + caching-allocator slack
NF4_BLOCK, DQ_BLOCK = 64, 256  # bitsandbytes 4-bit block size; second-level block of double quantization
OPT8_BLOCK, OPT8_MIN_NUMEL, PAGED_MIN_NUMEL = 256, 4096, 100_000  # bitsandbytes 8-bit optimizer constants
LOGITS_BYTES = 12  # per token·vocab entry at the loss backward: fp32 log-softmax + its gradient + the logits' grad

# Which linear layers read the same input tensor (so one saved copy serves all of them).
_GROUPS = {
    "attn_in": {"q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query_key_value", "Wqkv", "query", "key", "value"},
    "attn_out": {"o_proj", "out_proj", "dense"},
    "mlp_in": {"gate_proj", "up_proj", "gate_up_proj", "c_fc", "fc1", "w1", "w3", "gate"},
    "mlp_out": {"down_proj", "fc2", "w2"},
}
_ORDER = ("attn_in", "attn_out", "mlp_in", "mlp_out")


@dataclass(frozen=True)
class Settings:
    """The knobs an estimate depends on (already resolved from the recipe and the command line)."""

    method: str = "lora"  # full | lora (any PEFT adapter)
    quantization: str = "none"  # none | nf4 | fp4 | int8
    double_quant: bool = True
    dtype: str = "bfloat16"
    batch_size: int = 1
    seq_len: int = 2048
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    attn_implementation: str = "auto"  # auto | sdpa | eager | flash_attention_2
    lora_dropout: float = 0.05
    gpus: int = 1
    strategy: str = "ddp"  # ddp | fsdp
    device: str = "cuda"  # cuda | cpu: on CPU dropout keeps a full noise tensor, no CUDA context (benchmarks only)


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


@dataclass
class Line:
    key: str
    label: str
    bytes: int
    formula: str
    parts: dict = field(default_factory=dict)


@dataclass
class Estimate:
    profile: ModelProfile
    settings: Settings
    lines: list
    total_bytes: int
    per_device_bytes: int
    peak_formula: str
    per_device_formula: str
    notes: list

    def line(self, key: str) -> Line:
        return next(line for line in self.lines if line.key == key)

    @property
    def trainable_params(self) -> int:
        return self.profile.base_params if self.settings.method == "full" else self.profile.trainable_params

    @property
    def total_params(self) -> int:
        return self.profile.base_params if self.settings.method == "full" else self.profile.total_params


def gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB"


# ----------------------------------------------------------------------------------------------------------
# Profile: one meta-device build per model and adapter config


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
    """The ModuleList of decoder layers (model.model.layers, transformer.h, ...)."""
    import torch

    n = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise UsageError(f"model_type {model.config.model_type!r}: cannot find its {n} decoder layers")


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

    c = model.config
    layer = decoder_layers(model)[0]
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    norms = [m for m in layer.modules() if type(m).__name__.endswith("Norm")]
    names = {n.rsplit(".", 1)[-1] for n, _ in layer.named_modules()} | {n.rsplit(".", 1)[-1] for n, _ in layer.named_parameters()}
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
    from lorakit.model import build_meta_model

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
    builder; (model, base params of that model, method used, notes)."""
    import torch

    from lorakit.inspect import counting_section
    from lorakit.model import apply_adapter

    notes, section = [], counting_section(adapter)
    for attempt in (section, section.model_copy(update={"method": "lora"})):
        model = _meta_model(config)
        if keep:
            _keep_layers(model, keep)
        base = sum(p.numel() for p in model.parameters())
        try:
            with torch.device("meta"):
                return apply_adapter(model, attempt, low_cpu_mem_usage=True), base, attempt.method, notes
        except UsageError as e:
            if attempt.method in ("lora", "dora"):
                raise
            notes.append(f"adapter.method {attempt.method} cannot be built here ({e}); estimated as lora, same r/targets")
    raise AssertionError("unreachable")


def _adapted(config, adapter, base_params: int, layers: int, keep: int | None):
    """(trainable, total, trainable tensor sizes, LoRA modules, method, notes), extrapolated when ``keep``."""
    from peft.tuners.lora import LoraLayer

    model, kept_base, method, notes = apply_adapter_meta(config, adapter, keep)
    trainable, total = model.get_nb_trainable_parameters()
    tensors = [(_layer_index(n), p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    lora = [
        LoraModule(_layer_index(n), n, _group(n, n.rsplit(".", 1)[0]), m.in_features, m.out_features, m.r["default"])
        for n, m in model.named_modules()
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
    return trainable, total, tuple(t for _, t in tensors), tuple(lora), method, notes


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
    trainable, total, adapter_tensors, lora, method, notes = adapted
    if geo.experts and quant.numel < sum(base) / 2:
        notes.append(
            "MoE experts are fused 3-D parameters in transformers 5: bitsandbytes does not quantize them, "
            "so they stay unquantized (in fp32 after k-bit preparation)"
        )
    return ModelProfile(
        name=name or getattr(config, "_name_or_path", "") or config.model_type,
        source=source,
        model_type=config.model_type,
        base_params=sum(base),
        total_params=total,
        trainable_params=trainable,
        adapter_method=method,
        base_tensors=tuple(base),
        adapter_tensors=adapter_tensors,
        buffer_bytes=buffer_bytes,
        quantizable=quant,
        geometry=geo,
        lora_modules=lora,
        notes=tuple(notes),
    )


# ----------------------------------------------------------------------------------------------------------
# Breakdown lines


def attn_implementation(profile: ModelProfile, settings: Settings) -> str:
    impl = settings.attn_implementation if settings.attn_implementation != "auto" else profile.geometry.attn_default
    if profile.geometry.attn_softcap and impl == "sdpa":
        return "eager"  # transformers refuses attention soft-capping under sdpa
    return impl


def weights_line(p: ModelProfile, s: Settings) -> Line:
    e, q = DTYPE_BYTES[s.dtype], p.quantizable
    rest = p.base_params - q.numel
    kept = (
        f"{rest:,} params bitsandbytes leaves unquantized (embeddings, LM head, norms, biases) × 4 B: "
        "prepare_model_for_kbit_training casts them to fp32"
    )
    if s.quantization == "none" or s.method == "full":
        parts = {s.dtype: p.base_params * e}
        formula = f"{p.base_params:,} params × {e} B ({s.dtype})"
    elif s.quantization == "int8":
        parts = {"int8": q.numel, "int8_row_scales": 4 * q.rows, "float32": rest * 4}
        formula = f"{q.numel:,} linear weights × 1 B (int8) + {q.rows:,} rows × 4 B (fp32 scale per row) + {kept}"
    else:
        if s.double_quant:
            consts = q.blocks + 4 * q.blocks2 + q.tensors * (4 + 1024 + 64)
            how = (
                f"{q.blocks:,} blocks of {NF4_BLOCK} × 1 B (8-bit absmax) + {q.blocks2:,} blocks of {DQ_BLOCK} "
                f"× 4 B (fp32 second-level absmax) + {q.tensors:,} tensors × 1,092 B (offset, code tables)"
            )
        else:
            consts = 4 * q.blocks + 64 * q.tensors
            how = f"{q.blocks:,} blocks of {NF4_BLOCK} × 4 B (fp32 absmax) + {q.tensors:,} tensors × 64 B (code table)"
        parts = {s.quantization: q.packed_bytes, f"{s.quantization}_constants": consts, "float32": rest * 4}
        formula = f"{q.numel:,} quantized params × 0.5 B ({s.quantization}) + constants [{how}] + {kept}"
    if p.buffer_bytes:
        parts["float32_buffers"] = p.buffer_bytes
        formula += f" + {p.buffer_bytes:,} B of buffers (rotary tables)"
    return Line("weights", "base weights", sum(parts.values()), formula, parts)


def _trainable(p: ModelProfile, s: Settings) -> tuple[tuple, int, str]:
    """(tensor sizes, bytes per element, dtype name) of what the optimizer updates."""
    if s.method == "full":
        return p.base_tensors, DTYPE_BYTES[s.dtype], s.dtype
    return p.adapter_tensors, ADAPTER_BYTES, "float32"


def adapter_line(p: ModelProfile, s: Settings) -> Line:
    if s.method == "full":
        return Line("adapter_weights", "adapter weights", 0, "none: full fine-tuning trains the base weights")
    n = sum(p.adapter_tensors)
    return Line(
        "adapter_weights", "adapter weights", n * ADAPTER_BYTES,
        f"{n:,} trainable params × {ADAPTER_BYTES} B (PEFT keeps adapter weights in float32)",
    )


def gradients_line(p: ModelProfile, s: Settings) -> Line:
    tensors, b, dtype = _trainable(p, s)
    n = sum(tensors)
    return Line("gradients", "gradients", n * b, f"{n:,} trainable params × {b} B ({dtype}, one gradient each)")


def optimizer_line(p: ModelProfile, s: Settings) -> Line:
    tensors, b, dtype = _trainable(p, s)
    n = sum(tensors)
    if s.optimizer == "adamw":
        total = 2 * n * b + 4 * len(tensors)
        return Line(
            "optimizer_states", "optimizer states", total,
            f"AdamW: 2 moments × {n:,} params × {b} B ({dtype}, torch keeps them in the parameter dtype) "
            f"+ {len(tensors):,} step counters × 4 B",
        )
    big = [t for t in tensors if t >= OPT8_MIN_NUMEL]
    small = n - sum(big)
    blocks = sum(math.ceil(t / OPT8_BLOCK) for t in big)
    total = 2 * sum(big) + 8 * blocks + 8 * small + 2 * 256 * 4
    parts = {"8bit": 2 * sum(big) + 8 * blocks, "float32": 8 * small, "quantization_maps": 2048}
    formula = (
        f"bitsandbytes 8-bit AdamW: 2 moments × {sum(big):,} params × 1 B + {blocks:,} blocks of {OPT8_BLOCK} × 2 × 4 B "
        f"(absmax) + {small:,} params in tensors under {OPT8_MIN_NUMEL:,} elements × 8 B (kept in fp32) + 2 KiB maps"
    )
    if s.optimizer == "paged_adamw_8bit":
        paged = [t for t in big if t >= PAGED_MIN_NUMEL]
        parts["pageable"] = 2 * sum(paged) + 8 * sum(math.ceil(t / OPT8_BLOCK) for t in paged)
        formula += (
            f"; paged: {gib(parts['pageable'])} of it (tensors ≥ {PAGED_MIN_NUMEL:,} elements) lives in unified "
            "memory that the driver can evict to CPU RAM under pressure"
        )
    return Line("optimizer_states", "optimizer states", total, formula, parts)


def act_bytes(s: Settings) -> int:
    """Element size of activations. lorakit prepares a k-bit base with PEFT's prepare_model_for_kbit_training,
    which keeps embeddings, norms and LM head in fp32, and bitsandbytes layers return their input's dtype: the
    residual stream of a quantized base runs in fp32."""
    return 4 if s.quantization != "none" and s.method != "full" else DTYPE_BYTES[s.dtype]


def _tokens(s: Settings) -> int:
    return s.batch_size * s.seq_len


def _norm_bytes(g: Geometry, s: Settings) -> tuple[int, str]:
    T, e = _tokens(s), act_bytes(s)
    if g.norm_kind == "rms":
        n, f = T * (4 * g.hidden + 4), "T·(4·h + 4) (RMSNorm keeps an fp32 copy of its input and 1/rms per token)"
    else:
        n, f = T * (e * g.hidden + 8), f"T·({e}·h + 8) (LayerNorm keeps its input, mean and 1/std)"
    if s.method == "full":
        n, f = n + T * g.hidden * e, f + f" + T·h·{e} (normalized input, for the norm weight's gradient)"
    return n, f


def _attention_bytes(p: ModelProfile, s: Settings) -> tuple[int, str]:
    g, T, e = p.geometry, _tokens(s), act_bytes(s)
    q, kv = g.heads * g.head_dim, g.kv_heads * g.head_dim
    impl = attn_implementation(p, s)
    if impl == "eager":
        per_score = 4 + (e if e != 4 else 0) + (e if g.attn_softcap else 0)
        scores = s.batch_size * g.heads * s.seq_len**2
        return 3 * T * q * e + scores * per_score, (
            f"eager: T·3·{q}·{e} (q, and k/v repeated to all heads) + b·heads·s² × {per_score} B "
            f"(fp32 softmax{', its ' + str(e) + '-byte copy' if e != 4 else ''}{', tanh soft-cap' if g.attn_softcap else ''})"
        )
    return 2 * T * q * e + 2 * T * kv * e + T * g.heads * 4, (
        f"{impl}: T·(2·{q} + 2·{kv})·{e} (q, k, v, output; GQA keys/values stay narrow) + T·{g.heads}·4 (logsumexp)"
    )


def _mlp_bytes(g: Geometry, s: Settings) -> tuple[int, str]:
    T, e, i = _tokens(s), act_bytes(s), g.intermediate
    if g.experts:
        k = g.experts_per_token
        n = k * (3 * T * i * e + T * g.hidden * e) + T * g.experts * 4 + 16 * T * k
        return n, f"MoE: {k} experts/token × T·(3·{i} + {g.hidden})·{e} + router T·{g.experts}·4 + T·{k}·16"
    if g.gated_mlp:
        return 3 * T * i * e, f"T·3·{i}·{e} (gate, activation, up)"
    return T * i * e, f"T·{i}·{e} (activation input)"


def _lora_bytes(mods: list, s: Settings, flowing: bool) -> int:
    """What autograd keeps for the LoRA branches of modules that read one input tensor."""
    T, e, a = _tokens(s), act_bytes(s), ADAPTER_BYTES
    mask = a if s.device == "cpu" else 1  # CUDA keeps a bool mask; CPU dropout keeps a noise tensor
    total, shared = 0, False
    for m in mods:
        total += T * m.r * a  # lora_A output, kept by lora_B
        if s.lora_dropout > 0:
            total += T * m.in_features * (a + (mask if flowing else 0))  # dropout output (+ mask if grads flow back)
        elif e != a:
            total += T * m.in_features * a  # each module casts the shared input to fp32 on its own
        elif not shared:
            total, shared = total + T * m.in_features * e, True  # one input tensor serves every module
    return total


def _lora_formula(s: Settings) -> str:
    mask = "4" if s.device == "cpu" else "1"
    if s.lora_dropout > 0:
        return f"per adapted module T·(in·(4 + {mask}) + r·4) (fp32 dropout output, dropout mask, A output)"
    if act_bytes(s) != ADAPTER_BYTES:
        return "per adapted module T·(in + r)·4 (fp32 cast of its input, A output)"
    return "per adapted module T·r·4 (A output) + one T·in·4 input per group of modules sharing it"


def layer_saved(p: ModelProfile, s: Settings, mods: list, flowing: bool) -> tuple[dict, bool]:
    """Bytes autograd keeps for one decoder layer, in forward order; grads flow only after a trainable module."""
    g, T, e = p.geometry, _tokens(s), act_bytes(s)
    norm = _norm_bytes(g, s)[0]
    full = s.method == "full"
    inputs = dict(g.group_inputs)
    parts = {"norms": 0, "attention": 0, "mlp": 0, "adapter": 0, "linear_inputs": 0}
    groups = list(_ORDER) + sorted({m.group for m in mods} - set(_ORDER))

    def visit(group: str) -> None:
        nonlocal flowing
        mine = [m for m in mods if m.group == group]
        parts["adapter"] += _lora_bytes(mine, s, flowing)
        if full and group in inputs:
            scale = g.experts_per_token if g.experts and group.startswith("mlp") else 1
            parts["linear_inputs"] += scale * T * inputs[group] * e
        flowing = flowing or bool(mine)

    parts["norms"] += norm if flowing else 0
    visit("attn_in")
    parts["attention"] += _attention_bytes(p, s)[0] if flowing else 0
    visit("attn_out")
    parts["norms"] += (g.norms_per_layer - 1) * norm if flowing else 0
    visit("mlp_in")
    parts["mlp"] += _mlp_bytes(g, s)[0] if flowing else 0
    for group in groups[3:]:
        visit(group)
    return parts, flowing


def activations(p: ModelProfile, s: Settings) -> tuple[Line, int, dict]:
    """(activations line, bytes of one layer recomputed by checkpointing, the largest layer's parts)."""
    g, T, e = p.geometry, _tokens(s), act_bytes(s)
    by_layer: dict[int, list] = {}
    for m in p.lora_modules if s.method != "full" else ():
        by_layer.setdefault(m.layer, []).append(m)
    flowing, layers = s.method == "full", []
    for i in range(g.layers):
        parts, flowing = layer_saved(p, s, by_layer.get(i, []), flowing)
        layers.append(parts)
    largest = max(layers, key=lambda parts: sum(parts.values()))
    final = _norm_bytes(g, s)[0] + (T * g.hidden * e if s.method == "full" else 0)
    rotary = 2 * s.seq_len * g.head_dim * e if g.rotary else 0
    per_layer = " + ".join(f"{k} {gib(v)}" for k, v in largest.items() if v)
    if s.gradient_checkpointing:
        kept = g.layers * T * g.hidden * e
        n = kept + final + rotary
        f = (
            f"checkpointing: {g.layers} layer inputs × T·h·{e} = {g.layers} × {T:,}·{g.hidden}·{e} = {gib(kept)}"
            f" + final norm {gib(final)} + rotary cos/sin {gib(rotary)}; one layer ({per_layer}) is recomputed "
            "during backward (see backward_transient)"
        )
    else:
        kept = sum(sum(parts.values()) for parts in layers)
        n = kept + final + rotary
        f = f"{g.layers} layers, largest: {per_layer}; sum {gib(kept)} + final norm {gib(final)} + rotary {gib(rotary)}"
    return Line("activations", "activations", n, f"T = b·s = {s.batch_size}·{s.seq_len} = {T:,} tokens; " + f), sum(
        largest.values()
    ), largest


def activation_formulas(p: ModelProfile, s: Settings) -> list[str]:
    """The per-component formulas behind the activations line (for --explain)."""
    g = p.geometry
    lines = [
        f"norms: {g.norms_per_layer} per layer × {_norm_bytes(g, s)[1]}",
        f"attention: {_attention_bytes(p, s)[1]}",
        f"MLP: {_mlp_bytes(g, s)[1]}",
    ]
    if p.lora_modules and s.method != "full":
        lines.append(f"adapter: {_lora_formula(s)}; nothing is kept before the first adapted module")
    if s.method == "full":
        lines.append(f"linear inputs: one T·in·{act_bytes(s)} per input shared by trainable linears")
    return lines


def logits_line(p: ModelProfile, s: Settings) -> Line:
    g, T, e = p.geometry, _tokens(s), act_bytes(s)
    n = LOGITS_BYTES * T * g.vocab + 16 * T
    f = (
        f"{LOGITS_BYTES} B × T·V = {LOGITS_BYTES} × {T:,} × {g.vocab:,} (fp32 log-softmax kept for backward, "
        "then its gradient and the logits' gradient, all live at the start of backward) + 16 B × T (labels)"
    )
    if g.logit_softcap:
        n += 2 * T * g.vocab * e
        f += f" + 2 × T·V·{e} (final-logit soft-capping: tanh output and its gradient)"
    return Line("logits_and_loss", "logits and loss", n, f)


def backward_line(p: ModelProfile, s: Settings, recompute: int) -> Line:
    """Peak working set while one decoder layer runs backward (its recomputation under checkpointing)."""
    g, T, e = p.geometry, _tokens(s), act_bytes(s)
    n = T * (3 * g.intermediate + 3 * g.hidden) * e
    f = f"layer gradients T·(3·{g.intermediate} + 3·{g.hidden})·{e}"
    if s.gradient_checkpointing:
        n, f = n + recompute, f + f" + the recomputed layer's saved tensors {gib(recompute)}"
    if s.quantization != "none" and s.method != "full":
        n += p.quantizable.largest * DTYPE_BYTES[s.dtype]
        f += f" + one dequantized weight {p.quantizable.largest:,} × {DTYPE_BYTES[s.dtype]} B"
    return Line("backward_transient", "backward working set", n, f)


# ----------------------------------------------------------------------------------------------------------
# Totals


def estimate(p: ModelProfile, s: Settings) -> Estimate:
    """Every breakdown line for ``p`` under ``s``, the single-device peak and the per-device peak."""
    if s.method == "full" and s.quantization != "none":
        raise UsageError("full fine-tuning cannot train a quantized base: use --method lora/qlora or no quantization")
    weights, adapter, grads, opt = weights_line(p, s), adapter_line(p, s), gradients_line(p, s), optimizer_line(p, s)
    act, recompute, _ = activations(p, s)
    logits, bwd = logits_line(p, s), backward_line(p, s, recompute)
    overhead = Line(
        "framework_overhead", "framework overhead", OVERHEAD_BYTES if s.device == "cuda" else 0,
        "constant 1 GiB: CUDA context (~0.5 GiB with lazy module loading), cuBLAS workspaces and caching-allocator "
        "slack; torch.cuda.max_memory_allocated does not see it, nvidia-smi does",
    )
    lines = [weights, adapter, grads, opt, act, logits, bwd, overhead]
    static = weights.bytes + adapter.bytes + grads.bytes + opt.bytes
    dynamic = act.bytes + max(logits.bytes, bwd.bytes)
    total = static + dynamic + overhead.bytes
    peak_formula = (
        "weights + adapter + gradients + optimizer + activations + max(logits_and_loss, backward_transient) "
        "+ overhead (gradients coexist with activations under gradient accumulation; the loss buffers are freed "
        "before the first layer runs backward)"
    )
    per_device, per_device_formula = _per_device(p, s, static, dynamic + overhead.bytes, weights, grads)
    notes = list(p.notes)
    if p.adapter_method not in ("lora", "dora") and s.method != "full":
        notes.append(f"activations of {p.adapter_method} adapters are not modelled beyond the base model's")
    if p.adapter_method == "dora" and s.method != "full":
        notes.append("DoRA also builds each adapted weight (out × in, fp32) during forward; not counted")
    return Estimate(p, s, lines, total, per_device, peak_formula, per_device_formula, notes)


def _per_device(p: ModelProfile, s: Settings, static: int, rest: int, weights: Line, grads: Line) -> tuple[int, str]:
    if s.gpus <= 1:
        return static + rest, "one GPU: the total"
    if s.strategy == "ddp":
        return static + grads.bytes + rest, (
            f"DDP on {s.gpus} GPUs: every GPU holds the whole total plus DDP's gradient buckets (+{gib(grads.bytes)})"
        )
    g, e = p.geometry, DTYPE_BYTES[s.dtype]
    outside = p.base_params - g.layers * g.layer_params  # embeddings, LM head, final norm: FSDP's root unit
    per_layer = max(0, weights.bytes - outside * e - p.buffer_bytes) // g.layers
    gathered = outside * e + 2 * per_layer + (g.layer_params * e if s.method == "full" else 0)
    return static // s.gpus + gathered + rest, (
        f"FSDP over {s.gpus} GPUs: (weights + adapter + gradients + optimizer) / {s.gpus} + gathered parameters "
        f"{gib(gathered)} (root unit with embeddings/LM head + the current and the prefetched layer) + activations, "
        "loss buffers and overhead, which are per GPU"
    )
