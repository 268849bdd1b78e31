"""Activation memory: what each decoder layer saves for backward, with and without checkpointing."""

from __future__ import annotations

from lorakit.memory.lines import _ORDER, Line, Settings, gib
from lorakit.memory.lines import ADAPTER_BYTES, DTYPE_BYTES
from lorakit.memory.profile import Geometry, ModelProfile


def act_bytes(s: Settings) -> int:
    """Element size of activations. With model.upcast_unquantized a k-bit base keeps embeddings, norms and LM
    head in fp32 (PEFT's prepare_model_for_kbit_training), and bitsandbytes layers return their input's dtype:
    its residual stream then runs in fp32. Otherwise in model.dtype, as for LoRA."""
    upcast = s.quantization != "none" and s.method != "full" and s.upcast_unquantized
    return 4 if upcast else DTYPE_BYTES[s.dtype]


def positions(s: Settings) -> int:
    """Positions per sequence through the layers: the data's, and prompt tuning's virtual tokens before them."""
    return s.seq_len + (s.prompt_tokens if s.method != "full" else 0)


def _keys(s: Settings) -> int:
    """Keys each query may attend to: the positions, and prefix tuning's virtual keys."""
    return positions(s) + (s.prefix_tokens if s.method != "full" else 0)


def _tokens(s: Settings) -> int:
    return s.batch_size * positions(s)


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
        scores = s.batch_size * g.heads * positions(s) * _keys(s)
        kept = "fp32 softmax" + (f", its {e}-byte copy" if e != 4 else "")
        kept += ", tanh soft-cap" if g.attn_softcap else ""
        return 3 * T * q * e + scores * per_score, (
            f"eager: T·3·{q}·{e} (q, and k/v repeated to all heads) + b·heads·s² × {per_score} B ({kept})"
        )
    prefix = 2 * s.batch_size * (_keys(s) - positions(s)) * kv * e  # prefix tuning's keys/values, kept with k/v
    return 2 * T * q * e + 2 * T * kv * e + T * g.heads * 4 + prefix, (
        f"{impl}: T·(2·{q} + 2·{kv})·{e} (q, k, v, output; GQA keys/values stay narrow) "
        f"+ T·{g.heads}·4 (logsumexp)" + (f" + 2·b·{_keys(s) - positions(s)}·{kv}·{e} (prefix keys/values)"
                                          if prefix else "")
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


def _lora_bytes(mods: list, s: Settings, flowing: bool, input_kept: bool) -> int:
    """What autograd keeps for the LoRA branches of modules that read one input tensor (``input_kept``: that
    tensor is kept for backward anyway)."""
    T, e, a = _tokens(s), act_bytes(s), ADAPTER_BYTES
    mask = a if s.device == "cpu" else 1  # CUDA keeps a bool mask; CPU dropout keeps a noise tensor
    total, shared = 0, input_kept
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

    # sdpa/flash kernels lay their output out as (batch, seq, heads, dim) and keep it for backward, so the
    # o_proj input (its transpose made contiguous) is that same storage.
    fused_attention = attn_implementation(p, s) != "eager"

    def visit(group: str) -> None:
        nonlocal flowing
        mine = [m for m in mods if m.group == group]
        kept = group == "attn_out" and fused_attention and flowing
        parts["adapter"] += _lora_bytes(mine, s, flowing, kept)
        if full and group in inputs and not kept:
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
    for group in groups[3:]:  # mlp_out, then modules of no known group
        visit(group)
    return parts, flowing


def activations(p: ModelProfile, s: Settings) -> tuple[Line, int]:
    """(activations line, bytes of the largest layer, which checkpointing recomputes in backward)."""
    g, T, e = p.geometry, _tokens(s), act_bytes(s)
    by_layer: dict[int, list] = {}
    for m in p.lora_modules if s.method != "full" else ():
        by_layer.setdefault(m.layer, []).append(m)
    # Without LoRA modules to find, gradients flow from the first layer: IA3 scales k/v in every layer, bottleneck
    # blocks follow every sublayer, prefix keys/values join every attention, prompt embeddings enter before layer 0.
    # Each layer then keeps its activations as under LoRA (the adapters' own small tensors are not modelled).
    flowing, layers = s.method == "full" or p.adapter_method not in ("lora", "dora"), []
    for i in range(g.layers):
        parts, flowing = layer_saved(p, s, by_layer.get(i, []), flowing)
        layers.append(parts)
    largest = max(layers, key=lambda parts: sum(parts.values()))
    head_input = s.method == "full" and loss_path(p, s) == "plain"  # a trainable head keeps its input
    final = _norm_bytes(g, s)[0] + (T * g.hidden * e if head_input else 0)
    rotary = 2 * _keys(s) * g.head_dim * e if g.rotary else 0
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
    virtual = f" + {s.prompt_tokens} virtual" if positions(s) != s.seq_len else ""
    line = Line("activations", "activations", n,
                f"T = b·s = {s.batch_size}·({s.seq_len}{virtual}) = {T:,} tokens; {f}" if virtual else
                f"T = b·s = {s.batch_size}·{s.seq_len} = {T:,} tokens; {f}")
    return line, sum(largest.values())


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


def attn_implementation(profile: ModelProfile, settings: Settings) -> str:
    impl = settings.attn_implementation if settings.attn_implementation != "auto" else profile.geometry.attn_default
    if profile.geometry.attn_softcap and impl == "sdpa":
        return "eager"  # transformers refuses attention soft-capping under sdpa
    return impl


def loss_path(p: ModelProfile, s: Settings) -> str:
    """Which of lorakit.training.loss's paths training takes: "chunked" (or Liger's fused kernel) or "plain"."""
    g = p.geometry
    head_adapted = any(m.name.rsplit(".", 1)[-1] == g.head_name.rsplit(".", 1)[-1] for m in p.lora_modules)
    usable = not (
        p.adapter_method in ("prefix", "prompt") and s.method != "full"
        or s.strategy == "fsdp" and s.gpus > 1
        or head_adapted and s.method != "full"
        or g.logit_transform
    )
    return "chunked" if s.chunked_loss and usable else "plain"
