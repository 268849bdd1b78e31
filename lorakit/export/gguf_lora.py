"""`--format gguf-lora`: a LoRA adapter as a GGUF adapter file, for llama.cpp's --lora (several adapters hot-swapped
over one base GGUF) and Ollama's ADAPTER.

llama.cpp adds scale·B·A to each weight's output, with scale = alpha / rank from the file's adapter.lora.alpha,
or the user's --lora-scaled factor alone when alpha is 0. lorakit writes alpha 0 and folds each module's own
PEFT scaling (alpha / r, rsLoRA's alpha / sqrt(r), alpha_pattern, rank_pattern) into B, so every module keeps
exactly the scaling it was trained with. Llama's q/k rows are regrouped as in the model export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lorakit.errors import UsageError, VerificationError
from lorakit.export.gguf_model import Hyper, permute_for_rope
from lorakit.export.run import ExportReport, check_apart, check_output, temporary_file
from lorakit.publish import publish_file_output
from lorakit.export.target import display_name, plain_lora_only, resolve_target
from lorakit.merge.weights_io import list_tensors

LORA_QUANTS = ("f32", "f16", "bf16", "q8_0")


def lora_tensors(adapter, base_dir: Path, arch: str, hp: Hyper, quant: str) -> list[tuple[str, np.ndarray, object]]:
    """[(GGUF name, data, GGML type)] for every lora_a / lora_b pair, scaling folded into B."""
    import gguf

    from lorakit.merge.plan import collect_updates

    if why := plain_lora_only(adapter.path, adapter.config):
        raise UsageError(why)
    updates, replacements = collect_updates(adapter, {t.key for t in list_tensors(base_dir)})
    gguf_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(gguf_arch, hp.n_layers)
    merged = f"export the merged model: lorakit export {adapter.path} --format gguf -o FILE.gguf"
    # Modules first: PEFT saves a targeted LM head or embedding whole beside its LoRA, so an adapter on the head
    # also has a replacement, and "holds whole tensors" below would hide the cause.
    gguf_names = {}
    for module, update in sorted(updates.items()):
        name = gguf_names[module] = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if name is None or "B_bias" in update.parts or name.startswith("token_embd."):
            raise UsageError(f"{adapter.path}: LoRA on {module} has no llama.cpp equivalent; {merged}")
        if name.startswith("output.") and hp.tied:
            raise UsageError(f"{adapter.path}: LoRA on {module}, an LM head tied to the input embeddings "
                             "(tie_word_embeddings): llama.cpp has no separate output weight to apply it to; "
                             f"{merged}")
    if replacements:
        under_lora = any(key.removesuffix(".weight") in updates for key in replacements)
        why = "modules_to_save, new tokens, or a LoRA on the LM head, which PEFT saves whole beside it" if (
            under_lora) else "modules_to_save or new tokens"
        raise UsageError(f"{adapter.path}: the adapter holds whole tensors ({', '.join(sorted(replacements)[:3])}: "
                         f"{why}), which a GGUF LoRA cannot carry; {merged}")
    Q = gguf.GGMLQuantizationType
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[quant]
    out = []
    for module, update in sorted(updates.items()):
        name = gguf_names[module]
        a = update.parts["A"].to(torch.float32)
        b = update.parts["B"].to(torch.float32) * update.scaling
        if arch == "llama" and ".attn_q." in name:
            b = permute_for_rope(b, hp.n_head)
        elif arch == "llama" and ".attn_k." in name:
            b = permute_for_rope(b, hp.n_kv_head)
        for suffix, tensor in ((".lora_a", a), (".lora_b", b)):
            data = tensor.contiguous().numpy()
            t = qtype if data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else Q.F16
            out.append((name + suffix, gguf.quants.quantize(data, t), t))
    return out


def export_gguf_lora(target: str | Path, output: str | Path, *, quant: str = "f16", overwrite: bool = False,
                     verify: bool = False, base: str | None = None, allow_pickle: bool = False,
                     log: Callable[[str], None] = print) -> ExportReport:
    import gguf

    from lorakit.adapters.files import read_adapter

    if quant not in LORA_QUANTS:
        raise UsageError(f"--quant {quant}: a gguf-lora file is {', '.join(LORA_QUANTS)}")
    out = check_output(Path(output), overwrite)
    resolved = resolve_target(target, want="adapter", base=base, allow_pickle=allow_pickle)
    check_apart(out, resolved)
    adapter = read_adapter(resolved.adapter_dir, allow_pickle)
    hp = Hyper.from_config(resolved.config, resolved.model_dir)
    tensors = lora_tensors(adapter, resolved.model_dir, resolved.arch, hp, quant)
    tmp = temporary_file(out)
    writer = gguf.GGUFWriter(tmp, resolved.arch)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # 0: B already holds each module's scaling
        writer.add_name(display_name(resolved.adapter_dir))
        for name, data, qtype in tensors:
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()  # flushed before it is read back or renamed
        if verify:
            check_lora_file(tmp, tensors)
            log("verify: every lora_a/lora_b pair reads back as written: ok")
        publish_file_output(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    log(f"wrote {len(tensors) // 2} LoRA modules ({quant}) for a {resolved.arch} base {resolved.model_dir}")
    return ExportReport(out, quant)


def check_lora_file(path: Path, tensors) -> None:
    """Read the file back with gguf's reader: every tensor present, the same values."""
    import gguf

    reader = gguf.GGUFReader(path)
    read = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    for name, data, qtype in tensors:
        expected = gguf.quants.dequantize(data, qtype)
        if name not in read or not np.allclose(read[name].reshape(expected.shape), expected):
            raise VerificationError(f"{path.name}: tensor {name} does not read back as written; nothing was written")
