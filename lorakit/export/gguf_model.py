"""A Hugging Face model directory written as one GGUF file, tensor by tensor, through the `gguf` package's writer.

Tensor names come from gguf's own map (get_tensor_name_map), hyperparameters from config.json under the keys
llama.cpp reads (its convert_hf_to_gguf.py is the reference). Only one tensor is in memory at a time: every
tensor's name, type and size goes into the header first (known from the safetensors headers), then each is read,
converted and appended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lorakit.errors import UsageError
from lorakit.merge.weights_io import StoredTensor, TensorReader, list_tensors

QUANTS = ("f16", "bf16", "q8_0", "q4_0")
ROPE_TYPES = ("default", "linear", "llama3")


def _qtypes():
    import gguf

    Q = gguf.GGMLQuantizationType
    # (file type, type of 2-D weights, type of the embeddings and output head). q4_0 keeps those two at q8_0, as
    # llama.cpp's quantizer keeps them above 4 bits: they cost little and carry most of the damage.
    return {
        "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16, Q.F16),
        "bf16": (gguf.LlamaFileType.MOSTLY_BF16, Q.BF16, Q.BF16),
        "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0, Q.Q8_0),
        "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_0, Q.Q8_0),
    }


@dataclass
class Hyper:
    """The hyperparameters GGUF needs, read from config.json."""

    n_layers: int
    hidden: int
    ffn: int
    n_head: int
    n_kv_head: int
    head_dim: int
    context: int
    rms_eps: float
    rope_theta: float
    rope: dict
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict, where: Path) -> "Hyper":
        n_head = config["num_attention_heads"]
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type not in ROPE_TYPES:
            raise UsageError(f"{where}/config.json: rope type {rope_type!r} is not exported by lorakit "
                             f"(it writes {', '.join(ROPE_TYPES)})")
        rope["rope_type"] = rope_type
        return cls(
            n_layers=config["num_hidden_layers"], hidden=config["hidden_size"], ffn=config["intermediate_size"],
            n_head=n_head, n_kv_head=config.get("num_key_value_heads") or n_head,
            head_dim=config.get("head_dim") or config["hidden_size"] // n_head,
            context=config.get("max_position_embeddings", 2048), rms_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)), rope=rope,
            vocab=config["vocab_size"], tied=bool(config.get("tie_word_embeddings", False)),
        )


def add_hyperparameters(writer, hp: Hyper, quant: str, name: str) -> None:
    writer.add_name(name)
    writer.add_vocab_size(hp.vocab)
    writer.add_context_length(hp.context)
    writer.add_embedding_length(hp.hidden)
    writer.add_block_count(hp.n_layers)
    writer.add_feed_forward_length(hp.ffn)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_kv_head)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim != hp.hidden // hp.n_head:  # e.g. Mistral Nemo: heads narrower than hidden / n_head
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    if hp.rope["rope_type"] == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(hp.rope["factor"])
    writer.add_file_type(_qtypes()[quant][0])
    writer.add_quantization_version(2)


def llama3_rope_factors(hp: Hyper) -> np.ndarray:
    """Llama 3.1's frequency-dependent RoPE scaling as the per-frequency divisors llama.cpp reads (rope_freqs)."""
    r = hp.rope
    factor, low, high, old = r["factor"], r["low_freq_factor"], r["high_freq_factor"], r["original_max_position_embeddings"]
    freqs = 1.0 / (hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float64) / hp.head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    factors = np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


@dataclass
class OutTensor:
    name: str  # GGUF name
    source: StoredTensor | None  # None: computed (rope_freqs)
    qtype: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    permute_heads: int | None = None  # Llama q/k: rows regrouped per head for llama.cpp's RoPE layout
    data: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def plan_tensors(model_dir: Path, arch: str, hp: Hyper, quant: str) -> list[OutTensor]:
    """Every GGUF tensor: its name, source, output type; refuses a tensor the GGUF architecture has no name for."""
    import gguf

    gguf_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(gguf_arch, hp.n_layers)
    _, weight_type, embed_type = _qtypes()[quant]
    Q = gguf.GGMLQuantizationType
    out = []
    for stored in list_tensors(model_dir):
        if stored.key.endswith("rotary_emb.inv_freq") or (hp.tied and stored.key == "lm_head.weight"):
            continue  # recomputed by llama.cpp / the same tensor as the embeddings
        name = names.get_name(stored.key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UsageError(f"{model_dir}: tensor {stored.key} has no GGUF {arch} name; the model is not a plain "
                             f"{arch} model and cannot be exported")
        if len(stored.shape) < 2:
            qtype = Q.F32  # norms and biases: small, and llama.cpp computes them in float32
        else:
            qtype = embed_type if name.startswith(("token_embd.", "output.")) else weight_type
            block = gguf.GGML_QUANT_SIZES[qtype][0]
            if stored.shape[-1] % block:  # rows that do not split into blocks stay 16-bit (llama.cpp does the same)
                qtype = Q.F16
        heads = None
        if arch == "llama" and ".attn_q." in name:
            heads = hp.n_head
        elif arch == "llama" and ".attn_k." in name:
            heads = hp.n_kv_head
        out.append(OutTensor(name, stored, qtype, stored.shape, heads))
    if hp.rope["rope_type"] == "llama3":
        factors = llama3_rope_factors(hp)
        out.append(OutTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", None, Q.F32,
                             factors.shape, data=factors))
    return out


def permute_for_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face stores Llama q/k rows per head as [first halves | second halves] (rotate_half RoPE);
    llama.cpp rotates adjacent pairs, so each head's rows are interleaved: row i of each half goes to 2i / 2i+1."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert(tensor: torch.Tensor, t: OutTensor) -> np.ndarray:
    import gguf

    if t.permute_heads:
        tensor = permute_for_rope(tensor, t.permute_heads)
    data = tensor.to(torch.float32).numpy()
    Q = gguf.GGMLQuantizationType
    if t.qtype == Q.F32:
        return data.astype(np.float32, copy=False)
    if t.qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, t.qtype)


def add_tensor_infos(writer, tensors: list[OutTensor]) -> None:
    import gguf

    Q = gguf.GGMLQuantizationType
    for t in tensors:
        if t.qtype in (Q.F32, Q.F16):
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32 if t.qtype == Q.F32 else np.float16), t.nbytes)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)


def write_tensors(writer, tensors: list[OutTensor], advance: Callable[[int], None]) -> None:
    """Append every tensor's data in header order, reading one source tensor at a time."""
    with TensorReader() as reader:
        for t in tensors:
            data = t.data if t.source is None else convert(reader.get(t.source), t)
            writer.write_tensor_data(data)
            advance(t.nbytes)
