#!/usr/bin/env python
"""Measure training memory and compare it with `lorakit estimate-memory`'s estimate.

Runs real optimizer steps as lorakit's loop takes them (2 micro-batches through lorakit.training.loss, forward +
backward, clipping, AdamW) of models built by lorakit's own builder (lorakit.models.loading.build_model: bitsandbytes
base, k-bit preparation, checkpointing, PEFT adapter) over a grid of model sizes × sequence lengths ×
{lora, qlora} × checkpointing off/on, and prints estimate/measured ratios.

Measured peak: on a GPU torch.cuda.max_memory_allocated (the estimate's CUDA-context constant left out, since
the allocator does not see it); on CPU the peak of live tensor storage, followed from creation to free by a
TorchDispatchMode (every op's outputs) and weakref finalizers on the storages (not process RSS, which counts
allocator caches and freed pages). The second optimizer step is measured, so optimizer states exist.

    python scripts/bench_memory.py                 # the default grid (about a minute on 2 CPU cores)
    python scripts/bench_memory.py --markdown      # the table for docs/memory.md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
import warnings
import weakref
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, once per model

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

# (name, hidden, layers, heads, kv heads, intermediate, vocab): Llama architecture, GQA, vocabularies large
# enough that the logits matter as they do in real models.
MODELS = {
    "llama-h128-l4-v8k": (128, 4, 4, 2, 344, 8192),
    "llama-h256-l6-v16k": (256, 6, 8, 2, 688, 16384),
}
SEQ_LENS = (128, 512)
BATCH = 2
MICRO_STEPS = 2  # gradient accumulation: the second micro-step runs with the first one's gradients alive


class LiveStorage(TorchDispatchMode):
    """Peak bytes of live tensor storage: storages are counted once, from the op that made them to their free."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def track(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = id(storage)  # storage objects are preserved while the storage lives, so the id is stable
        if key in self.live or storage.nbytes() == 0:
            return
        self.live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def track_existing(self) -> None:
        """Every tensor alive now (weights, quantization states, optimizer states, inputs)."""
        gc.collect()
        with warnings.catch_warnings():  # isinstance() on some deprecated torch.distributed objects warns
            warnings.simplefilter("ignore")
            tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
        for tensor in tensors:
            self.track(tensor)
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.track(t)
        return out


def write_model(out_dir: Path, hidden, layers, heads, kv_heads, intermediate, vocab) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    return out_dir


# With a small vocabulary the loss buffers no longer set the peak under checkpointing: the recomputed layer
# starting its backward does (--variants measures it).
SMALL_VOCAB = ("llama-h128-l4-v512", (128, 4, 4, 2, 344, 512))
# Extra points (--variants, first model, longer sequence, LoRA): the paths the grid does not take.
VARIANTS = {
    "bfloat16": {"model": {"dtype": "bfloat16"}},
    "no dropout": {"adapter": {"lora_dropout": 0.0}},
    "eager attention": {"model": {"attn_implementation": "eager"}},
    "q,v only": {"adapter": {"target_modules": ["q_proj", "v_proj"]}},
    "plain loss": {"train": {"chunked_loss": False}},
    "bfloat16 nf4": {"model": {"dtype": "bfloat16", "quantization": "nf4"}},
    "bfloat16 nf4, upcast": {"model": {"dtype": "bfloat16", "quantization": "nf4", "upcast_unquantized": True}},
    "full fine-tuning": {},
    "full fine-tuning (bfloat16)": {"model": {"dtype": "bfloat16"}},
}


def recipe_for(model_dir: Path, method: str, seq_len: int, checkpointing: bool, dtype: str, variant: dict = None):
    from lorakit.config.load import parse_recipe

    variant = variant or {}
    return parse_recipe({
        "model": {"name_or_path": str(model_dir), "dtype": dtype,
                  "quantization": "nf4" if method == "qlora" else "none", **variant.get("model", {})},
        "adapter": {"method": "lora", "r": 16, "target_modules": "all-linear", **variant.get("adapter", {})},
        "data": {"train": "(benchmark)", "max_seq_len": seq_len},
        "train": {"max_steps": 2, "micro_batch_size": BATCH, "grad_accum": MICRO_STEPS,
                  "gradient_checkpointing": checkpointing, **variant.get("train", {})},
    }, source="bench")


def estimate_for(recipe, device: str, full: bool = False) -> int:
    from dataclasses import replace

    from lorakit.memory.estimate import estimate
    from lorakit.memory.profile import inspect_model
    from lorakit.memory.report import Flags, settings_from
    from lorakit.models.presets import load_model_config

    config, source = load_model_config(recipe.model.name_or_path)
    profile = inspect_model(config, recipe.adapter, recipe.model.name_or_path, source)
    settings = replace(settings_from(recipe, Flags(method="full" if full else None)), device=device)
    est = estimate(profile, settings)
    return est.total_bytes - est.line("framework_overhead").bytes


def optimizer_step(model, optimizer, compute_loss, batches) -> None:
    """One step as lorakit's loop takes it: micro-batches through lorakit.training.loss, clipping, AdamW."""
    num_items = sum(int((b["labels"][..., 1:] != -100).sum()) for b in batches)
    for batch in batches:
        loss = compute_loss(model, batch, num_items)
        loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def full_model(recipe):
    """Full fine-tuning (not a lorakit method, but a row of the comparison table): every weight trains."""
    from transformers import AutoModelForCausalLM

    from lorakit.models.loading import enable_activation_checkpointing, resolve_dtype

    model = AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path, dtype=resolve_dtype(recipe.model.dtype))
    model.config.use_cache = False
    if recipe.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model


def measure(recipe, device: str, full: bool = False) -> int:
    from lorakit.training.loss import build_loss
    from lorakit.adapters.build import build_model

    model = (full_model(recipe) if full else build_model(recipe)).to(device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    compute_loss = build_loss(model, recipe.train.chunked_loss)
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(MICRO_STEPS):
        ids = torch.randint(0, vocab, (BATCH, recipe.data.max_seq_len), generator=gen).to(device)
        batches.append({"input_ids": ids, "labels": ids.clone()})
    optimizer_step(model, optimizer, compute_loss, batches)  # creates the optimizer states
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        optimizer_step(model, optimizer, compute_loss, batches)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        tracker = LiveStorage()
        tracker.track_existing()
        with tracker:
            optimizer_step(model, optimizer, compute_loss, batches)
        peak = tracker.peak
    del model, optimizer, batches
    gc.collect()
    return peak


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {mem:.0f} GiB RAM, {gpu}; "
            f"torch {torch.__version__}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seq-lens", nargs="*", type=int, default=list(SEQ_LENS))
    parser.add_argument("--variants", action="store_true",
                        help="Also: bf16, no dropout, eager attention, q/v only, plain loss, full fine-tuning, small vocabulary.")
    parser.add_argument("--markdown", action="store_true", help="Print the table as Markdown.")
    parser.add_argument("--json", type=Path, help="Also write the rows to this JSON file.")
    args = parser.parse_args()
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    rows, start = [], time.time()

    def point(model_dir, name, seq_len, method, checkpointing, variant=""):
        recipe = recipe_for(model_dir, method, seq_len, checkpointing, dtype, VARIANTS.get(variant))
        full = variant.startswith("full fine-tuning")
        measured, estimated = measure(recipe, args.device, full), estimate_for(recipe, args.device, full)
        shown = "qlora" if recipe.model.quantization != "none" else method
        label = variant.replace("full fine-tuning", "full") if full else shown + (f" ({variant})" if variant else "")
        rows.append({"model": name, "seq_len": seq_len, "method": label,
                     "checkpointing": checkpointing, "measured": measured, "estimated": estimated,
                     "ratio": estimated / measured})
        if not args.markdown:
            print(_row(rows[-1], False), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model_dir = write_model(Path(tmp) / name, *MODELS[name])
            for seq_len in args.seq_lens:
                for method in ("lora", "qlora"):
                    for checkpointing in (False, True):
                        point(model_dir, name, seq_len, method, checkpointing)
            if args.variants and name == args.models[0]:
                for variant in VARIANTS:
                    for checkpointing in (False, True) if variant.startswith("full fine-tuning") else (False,):
                        point(model_dir, name, max(args.seq_lens), "lora", checkpointing, variant)
        if args.variants:
            name, dims = SMALL_VOCAB
            model_dir = write_model(Path(tmp) / name, *dims)
            for method in ("lora", "qlora"):
                point(model_dir, name, max(args.seq_lens), method, True)
    ratios = [r["ratio"] for r in rows]
    worst = max(ratios, key=lambda r: abs(r - 1))
    summary = (f"{len(rows)} points, batch {BATCH} × {MICRO_STEPS} micro-steps, {dtype}, {args.device}; "
               f"mean ratio {sum(ratios) / len(ratios):.4f}, worst {worst:.4f}; {time.time() - start:.0f} s on "
               f"{machine()}")
    if args.markdown:
        print("| model | seq len | method | checkpointing | measured MiB | estimated MiB | estimate/measured |")
        print("|---|---:|---|---|---:|---:|---:|")
        for row in rows:
            print(_row(row, True))
    print(("\n" if args.markdown else "") + summary)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    ok = all(abs(r - 1) <= 0.10 for r in ratios) and abs(sum(ratios) / len(ratios) - 1) <= 0.05
    return 0 if ok else 1


def _row(row: dict, markdown: bool) -> str:
    cells = [row["model"], str(row["seq_len"]), row["method"], "on" if row["checkpointing"] else "off",
             f"{row['measured'] / 2**20:.1f}", f"{row['estimated'] / 2**20:.1f}", f"{row['ratio']:.4f}"]
    if markdown:
        return "| " + " | ".join(cells) + " |"
    return "  ".join(f"{c:>18}" if i == 0 else f"{c:>9}" for i, c in enumerate(cells))


if __name__ == "__main__":
    raise SystemExit(main())
