"""Side-by-side training benchmark: `lorakit train` against transformers.Trainer + PEFT.

    python scripts/bench_train.py [--repeats 3] [--steps 6] [--knobs "chunked_loss off,..."|none]
                                  [--threads 1] [--out runs/bench] [--profile] [--ceiling]
    make bench

Both sides get the same model, data, LoRA config (r 16, alpha 32, dropout 0.05, all linear layers),
precision, optimizer (torch AdamW), learning rate and cosine schedule, micro-batch, accumulation and
number of optimizer steps, and the same example order (scripts/bench_reference_trainer.py).
Each run is its own process; the two sides alternate (which goes first flips every repeat); medians over
the repeats and the ratios lorakit/reference are reported for:
- supervised tokens/s: supervised (non-pad, unmasked) targets / wall seconds of the training loop
  (model loading excluded); also per CPU-second, which is steadier when other processes share the CPU;
- peak memory: peak RSS of the process (CPU) or CUDA max allocated (GPU), and, in one extra run per side
  under lorakit.training.perf.TensorMemoryTracker, the peak of tensors allocated by torch ops;
- loss: of the last 3 training steps, and on 32 held-out rows after training (token-weighted, the same rows
  for both sides). Both sides draw micro-batches from the same seeded permutation, so the two agree to
  fp32 noise (unless a knob turns on data.group_by_length).
Then each speed knob's effect on lorakit alone (one run each), and one run per side beside each of two
background loads (a matmul loop on every usable CPU, niced and at the same priority; --no-load skips
them). Results go to OUT/bench_train.json.

CPU setup (no GPU): a random Llama with 32,768-token vocabulary, hidden 256, 4 layers (≈20M parameters,
two thirds of them embeddings and head, as in small real models), float32, and a synthetic alpaca dataset
of variable length (see make_dataset). The tokenizer is lorakit.testing's byte-level BPE; its few hundred
tokens are the low ids of the 32k vocabulary: the model's config has vocab_size 32768 beyond the tokenizer,
as Qwen's and Llama's padded vocabularies do, so the head and softmax cost what a 32k vocabulary costs.
GPU setup (CUDA present): a random ≈1.1B Llama (hidden 2048, 20 layers), bfloat16, examples up to 4,096
tokens; peak memory is CUDA max allocated; the knobs add packed 4K rows (data.packing), flattened
micro-batches (flash_attention_2, when flash-attn is installed) and Liger's kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "the quick brown fox jumps over lazy dog journey of a thousand miles begins with single step what is capital "
    "France Paris translate to French hello world bonjour you are helpful assistant answer question summarize text "
    "one two three four five six seven eight nine ten below instruction that describes task write response"
).split()

CPU = dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, vocab=32768, dtype="float32",
           rows=400, max_seq_len=512, prompt_words=(3.4, 0.7), response_words=(3.2, 0.8),
           steps=6, micro_batch=4, grad_accum=2, lr=2e-3)
GPU = dict(hidden=2048, layers=20, heads=16, kv_heads=8, intermediate=5632, vocab=32768, dtype="bfloat16",
           rows=2000, max_seq_len=4096, prompt_words=(5.6, 0.9), response_words=(5.4, 0.9),
           steps=30, micro_batch=4, grad_accum=2, lr=2e-4)
# Speed knobs, each run on the lorakit side alone: --set overrides on top of the common recipe.
KNOBS = {
    "default": [],
    "chunked_loss off": ["train.chunked_loss=false"],
    "padding_free off": ["data.padding_free=false"],
    "packing on": ["data.packing=true"],
    "attn eager": ["model.attn_implementation=eager"],
    "compile on": ["train.compile=true"],
    "liger on": ["train.liger=true"],
    "attn flash_attention_2": ["model.attn_implementation=flash_attention_2"],
}
GPU_ONLY = {"liger on": "needs a GPU (Triton kernels)", "attn flash_attention_2": "needs a GPU and flash-attn"}


# ----------------------------------------------------------------------------------------------------------
# Model and data


def make_model(out: Path, cfg: dict) -> Path:
    """A random Llama with cfg's shape and a 32k vocabulary, lorakit.testing's tokenizer (cached in ``out``)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.testing import build_tokenizer

    tokenizer = build_tokenizer(512)
    config = LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"],
        max_position_embeddings=max(cfg["max_seq_len"], 2048), eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(getattr(torch, cfg["dtype"])).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_dataset(path: Path, cfg: dict, seed: int = 0) -> Path:
    """Alpaca rows whose instruction and response lengths (in words) are log-normal: many short, a long tail.

    CPU: median ≈ 30 instruction words and ≈ 25 response words (≈ 60–500 tokens with the template), so a
    random micro-batch of 4 is about a third padding, and about half of the real tokens are prompt.
    """
    rng = random.Random(seed)

    def words(mu_sigma) -> str:
        n = max(1, min(int(rng.lognormvariate(*mu_sigma)), cfg["max_seq_len"] // 2))
        return " ".join(rng.choice(WORDS) for _ in range(n))

    with path.open("w") as f:
        for _ in range(cfg["rows"]):
            row = {"instruction": words(cfg["prompt_words"]), "input": "", "output": words(cfg["response_words"])}
            f.write(json.dumps(row) + "\n")
    return path


def recipe_for(model: Path, data: Path, eval_data: Path, cfg: dict, steps: int) -> dict:
    return {
        "model": {"name_or_path": str(model), "dtype": cfg["dtype"]},
        "adapter": {"method": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
        "data": {"train": str(data), "eval": str(eval_data), "format": "alpaca", "max_seq_len": cfg["max_seq_len"],
                 "cache": False},
        "train": {
            "max_steps": steps, "micro_batch_size": cfg["micro_batch"], "grad_accum": cfg["grad_accum"],
            "learning_rate": cfg["lr"], "lr_scheduler": "cosine", "warmup_steps": 0, "optimizer": "adamw",
            "max_grad_norm": 1.0, "seed": 42, "log_every": 1,
        },
    }


# ----------------------------------------------------------------------------------------------------------
# Runs: each side in its own process, through the `--child` mode of this script


def child(kind: str, result: Path, track: bool, argv: list[str]) -> int:
    """Run one side in this process; write its peak memory to ``result``."""
    if kind == "lorakit":
        from lorakit.training.threads import choose_openmp_waits

        choose_openmp_waits()  # as lorakit's entry point does before torch loads; the reference runs as it is
    import torch

    from lorakit.training.perf import TensorMemoryTracker

    sys.path.insert(0, str(ROOT / "scripts"))
    tracker = TensorMemoryTracker() if track else None
    code = 0
    if tracker is not None:
        tracker.__enter__()
    try:
        if kind == "lorakit":
            from lorakit.cli.main import app

            try:
                app(args=argv, prog_name="lorakit")
            except SystemExit as e:
                code = e.code or 0
        else:
            import bench_reference_trainer

            code = bench_reference_trainer.main(argv)
    finally:
        if tracker is not None:
            tracker.__exit__(None, None, None)
    memory = {
        "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "cuda_max_allocated": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "tensor_peak_bytes": tracker.peak if tracker is not None else None,
    }
    result.write_text(json.dumps(memory))
    return code


def run_side(kind: str, run_dir: Path, recipe: dict, overrides: list[str], track: bool = False) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    memory_file = run_dir / "memory.json"
    if kind == "lorakit":
        recipe_file = run_dir / "recipe.yaml"
        recipe_file.write_text(yaml.safe_dump(recipe))
        argv = ["train", str(recipe_file), "--output-dir", str(run_dir / "run")]
        argv += [a for o in overrides for a in ("--set", o)]
    else:
        t, m = recipe["train"], recipe
        argv = [
            "--model", m["model"]["name_or_path"], "--data", m["data"]["train"], "--eval", m["data"]["eval"],
            "--out", str(run_dir / "result.json"),
            "--max-seq-len", str(m["data"]["max_seq_len"]), "--steps", str(t["max_steps"]),
            "--micro-batch", str(t["micro_batch_size"]), "--grad-accum", str(t["grad_accum"]),
            "--lr", str(t["learning_rate"]), "--seed", str(t["seed"]), "--dtype", m["model"]["dtype"],
        ]
    cmd = [sys.executable, __file__, "--child", kind, str(memory_file), *(["--track"] if track else []), "--", *argv]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    (run_dir / "log.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:], "process_seconds": 0}
    out = {**json.loads(memory_file.read_text()), "process_seconds": time.perf_counter() - t0}
    out.update(lorakit_result(run_dir / "run") if kind == "lorakit" else reference_result(run_dir))
    supervised = out["supervised_tokens_per_s"] * out["train_seconds"]
    return {**out, "process_tokens_per_s": supervised / out["process_seconds"]}


def lorakit_result(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    final = [r for r in records if "mfu" in r][-1]
    supervised = final["tokens_per_s"] * final["train_seconds"]
    return {
        "supervised_tokens_per_s": final["tokens_per_s"],
        "supervised_tokens_per_cpu_s": supervised / final["train_cpu_seconds"],
        "train_seconds": final["train_seconds"],
        "final_loss": statistics.mean(losses[-3:]),
        "eval_loss": next((r["eval_loss"] for r in records if "eval_loss" in r), None),
        "mfu": final["mfu"],
        "losses": losses,
    }


def reference_result(run_dir: Path) -> dict:
    r = json.loads((run_dir / "result.json").read_text())
    return {
        "supervised_tokens_per_s": r["supervised_tokens"] / r["train_seconds"],
        "supervised_tokens_per_cpu_s": r["supervised_tokens"] / r["train_cpu_seconds"],
        "train_seconds": r["train_seconds"],
        "final_loss": statistics.mean(r["losses"][-3:]),
        "eval_loss": r.get("eval_loss"),
        "pad_fraction": 1 - r["tokens"] / r["padded_tokens"],
        "losses": r["losses"],
    }


def first_steps(recipe: dict):
    """(model, tokenizer, {side: (padding_free, loss, micro-batches of the first optimizer step)}), built in this
    process the way each side builds them: lorakit's batching decision and chunked loss, against padded
    micro-batches in plain random order and the model's own loss."""
    from lorakit.console import configure

    configure()  # library warnings as `lorakit train` shows them (console.KNOWN_NOISE hidden), before they import
    from lorakit.data import StepSampler, load_datasets
    from lorakit.training.loss import build_loss, plain_loss
    from lorakit.adapters.build import build_model
    from lorakit.models.loading import load_tokenizer, resolve_model_path
    from lorakit.training.perf import choose_batching
    from lorakit.config.load import parse_recipe

    parsed = parse_recipe(recipe)
    tokenizer = load_tokenizer(parsed.model, resolve_model_path(parsed.model))
    examples = load_datasets(parsed.data, tokenizer, parsed.train.seed).train
    model = build_model(parsed)
    batching = choose_batching(parsed, model, None)
    t = parsed.train

    def first(lengths):
        sampler = StepSampler(num_examples=len(examples), micro_batch_size=t.micro_batch_size,
                              grad_accum=t.grad_accum, seed=t.seed, lengths=lengths)
        return [[examples[i] for i in idx] for idx in sampler.micro_batches(0)]

    return model, tokenizer, {
        "lorakit": (batching.padding_free, build_loss(model, chunked=True), first(batching.lengths)),
        "reference": (False, plain_loss, first(None)),
    }


def step_flops(recipe: dict) -> dict:
    """Matmul FLOPs (torch's FlopCounterMode) per supervised target of the first optimizer step, each side
    computing it its own way (see first_steps). Independent of machine load: it shows what the speed-up is
    made of, where wall-clock numbers on a shared CPU are noisy."""
    from torch.utils.flop_counter import FlopCounterMode

    from lorakit.data import collate
    from lorakit.training.perf import Work

    model, tokenizer, sides = first_steps(recipe)
    out = {}
    for name, (padding_free, loss, micro) in sides.items():
        work = Work()
        with FlopCounterMode(display=False) as counter:
            for batch in micro:
                work.add(batch)
                loss(model, collate(batch, tokenizer, padding_free), 100.0).backward()
        out[name] = counter.get_total_flops() / work.targets
    return out


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")
# Operator families for the profile: where the CPU time of a step goes.
FAMILIES = (
    ("matmul", MATMULS),
    ("attention", ("scaled_dot_product", "aten::_softmax")),
    ("loss: softmax/CE over the vocabulary", ("log_softmax", "nll_loss", "logsumexp", "aten::exp", "aten::gather",
                                              "aten::index_put", "aten::sub_")),
    ("dropout", ("bernoulli", "aten::random_")),
    ("copies, fills, indexing", ("aten::copy_", "aten::fill_", "aten::zero_", "aten::index", "aten::scatter",
                                 "aten::cat", "aten::clone", "aten::contiguous")),
)


def side_step(model, tokenizer, name: str, side: tuple):
    """(loss, collated micro-batches, Work) of one side's first step (first_steps), with that side's own LoRA
    dropout swapped into the model both sides share."""
    from lorakit.adapters.dropout import use_lora_dropout
    from lorakit.data import collate
    from lorakit.training.perf import Work

    padding_free, loss, micro = side
    use_lora_dropout(model, fast=name == "lorakit")
    work = Work()
    for batch in micro:
        work.add(batch)
    return loss, [collate(b, tokenizer, padding_free) for b in micro], work


def profile_step(recipe: dict, repeats: int = 2) -> dict:
    """Self CPU seconds per 1,000 supervised targets, by operator family, over the first optimizer step of each
    side (torch.profiler; the sides' first steps hold different examples when lorakit groups by length)."""
    from torch.profiler import ProfilerActivity, profile

    model, tokenizer, sides = first_steps(recipe)
    out = {}
    for name, side in sides.items():
        loss, batches, work = side_step(model, tokenizer, name, side)
        loss(model, batches[0], 100.0).backward()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                for batch in batches:
                    loss(model, batch, 100.0).backward()
        families = dict.fromkeys([f for f, _ in FAMILIES] + ["other elementwise (norms, SiLU, RoPE, adds)"], 0.0)
        for event in prof.key_averages():
            family = next((f for f, keys in FAMILIES if any(k in event.key for k in keys)), None)
            family = family or "other elementwise (norms, SiLU, RoPE, adds)"
            families[family] += event.self_cpu_time_total / 1e6 / repeats / (work.targets / 1000)
        out[name] = families
    return out


def matmul_ceiling(recipe: dict, repeats: int = 10) -> dict:
    """How far the MFU goal is from this machine's limit: lorakit's first optimizer step (forward and backward of
    its micro-batches, no optimizer), its best time over ``repeats``, against the same step's matmuls each timed
    alone at its best (shapes and counts from torch.profiler) plus its attention kernels as measured in the step.
    The ceiling is the MFU the step would reach if every other operator (norms, activations, LoRA's products and
    scaling, dropout, copies, the loss's softmax) took no time and no matmul waited on memory."""
    import collections

    import torch
    from torch.profiler import ProfilerActivity, profile

    from lorakit.training.perf import ModelShape, matmul_probe

    model, tokenizer, sides = first_steps(recipe)
    loss, batches, work = side_step(model, tokenizer, "lorakit", sides["lorakit"])
    flops = ModelShape.of(model).flops(work, checkpointing=False)

    def step() -> float:
        t0 = time.perf_counter()
        for batch in batches:
            loss(model, batch, 100.0).backward()
        seconds = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return seconds

    step(), step()  # warm-up
    step_seconds = min(step() for _ in range(repeats))
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    matmuls, attention = collections.Counter(), 0.0
    for event in prof.events():
        if event.name in MATMULS:
            matmuls[(event.name, tuple(tuple(s) for s in event.input_shapes if s))] += 1
        elif "scaled_dot_product" in event.name and event.name.startswith("aten::_"):  # the kernels, fwd and bwd
            attention += event.self_cpu_time_total / 1e6
    ops = {"aten::mm": torch.mm, "aten::bmm": torch.bmm, "aten::addmm": torch.addmm}
    alone = 0.0
    for (name, shapes), count in matmuls.items():
        args = [torch.randn(*shape) for shape in shapes[:3]]
        for _ in range(3):
            ops[name](*args)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            ops[name](*args)
            best = min(best, time.perf_counter() - t0)
        alone += count * best
    peak = max(matmul_probe(torch.device("cpu"), torch.float32, 0.5) for _ in range(3))
    return {"probe_flops": peak, "step_seconds": step_seconds, "step_mfu": flops / step_seconds / peak,
            "matmuls": sum(matmuls.values()), "matmul_seconds_alone": alone, "attention_seconds": attention,
            "ceiling_mfu": flops / (alone + attention) / peak}


def print_ceiling(c: dict) -> int:
    print(f"matmul probe {c['probe_flops'] / 1e9:.0f} GFLOP/s; lorakit's first step (best of 10, no optimizer) "
          f"{1e3 * c['step_seconds']:.0f} ms: MFU {c['step_mfu']:.1%}")
    print(f"its {c['matmuls']} matmuls each alone at their best {1e3 * c['matmul_seconds_alone']:.0f} ms, its "
          f"attention kernels {1e3 * c['attention_seconds']:.0f} ms: ceiling MFU {c['ceiling_mfu']:.1%} "
          "(every other operator free)")
    return 0


# ----------------------------------------------------------------------------------------------------------
# Report


def median(runs: list[dict], key: str):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(lk: list[dict], ref: list[dict], lk_mem: dict, ref_mem: dict, gpu: bool) -> list[tuple]:
    """Rows (metric, lorakit, reference, ratio, goal) of the comparison."""
    mib = 1 / 2**20
    memory_key = "cuda_max_allocated" if gpu else "rss_peak_bytes"
    rows = [
        ("supervised tokens/s (wall)", median(lk, "supervised_tokens_per_s"), median(ref, "supervised_tokens_per_s"),
         ">= 3"),
        ("supervised tokens / process second", median(lk, "process_tokens_per_s"), median(ref, "process_tokens_per_s"),
         ">= 2.2"),
        ("supervised tokens/CPU-s", median(lk, "supervised_tokens_per_cpu_s"),
         median(ref, "supervised_tokens_per_cpu_s"), ">= 1.5"),
        ("peak CUDA allocated MiB" if gpu else "peak RSS MiB", median(lk, memory_key) * mib,
         median(ref, memory_key) * mib, "<= 0.6"),
        ("tensor peak MiB", _scaled(lk_mem.get("tensor_peak_bytes"), mib),
         _scaled(ref_mem.get("tensor_peak_bytes"), mib), "<= 0.8"),
        ("train loss (mean of last 3 steps)", median(lk, "final_loss"), median(ref, "final_loss"), "≈ 1"),
        ("eval loss after training", median(lk, "eval_loss"), median(ref, "eval_loss"), "≈ 1"),
    ]
    return [(name, a, b, (a / b if a and b else None), goal) for name, a, b, goal in rows]


def _scaled(value, factor):
    return None if value is None else value * factor


def print_table(rows, header=("metric", "lorakit", "reference", "ratio", "goal")) -> None:
    print(f"{header[0]:36s} {header[1]:>12s} {header[2]:>12s} {header[3]:>8s}  {header[4]}")
    for name, a, b, ratio, goal in rows:
        fmt = lambda v, width: f"{'-':>{width}s}" if v is None else f"{v:{width}.4g}"  # noqa: E731
        print(f"{name:36s} {fmt(a, 12)} {fmt(b, 12)} {fmt(ratio, 8)}  {goal}")


def print_profile(families: dict) -> int:
    print(f"{'self CPU seconds per 1k supervised tokens':44s} {'lorakit':>9s} {'reference':>10s}")
    for family in families["reference"]:
        print(f"{family:44s} {families['lorakit'][family]:9.3f} {families['reference'][family]:10.3f}")
    total = {k: sum(v.values()) for k, v in families.items()}
    print(f"{'total':44s} {total['lorakit']:9.3f} {total['reference']:10.3f}")
    return 0


def machine() -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: 6 CPU, 30 GPU)")
    parser.add_argument("--knobs", default=",".join(KNOBS), help=f"comma-separated, of: {', '.join(KNOBS)}; or none")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    parser.add_argument("--no-track", action="store_true", help="skip the tensor-peak runs")
    parser.add_argument("--profile", action="store_true",
                        help="only profile one optimizer step of each side in this process (torch.profiler)")
    parser.add_argument("--ceiling", action="store_true",
                        help="only measure lorakit's first step against its matmuls timed alone (the MFU ceiling)")
    parser.add_argument("--no-load", action="store_true",
                        help="skip the variant beside a background load (a niced matmul loop on every usable CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (OMP_NUM_THREADS); 1 keeps CPU-seconds meaningful on a shared CPU")
    args = parser.parse_args()

    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every run
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available()
    cfg = GPU if gpu else CPU
    steps = args.steps or cfg["steps"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = make_model(out / ("model-gpu" if gpu else "model-cpu"), cfg)
    data = make_dataset(out / "data.jsonl", cfg)
    eval_data = make_dataset(out / "eval.jsonl", {**cfg, "rows": 32}, seed=1)
    recipe = recipe_for(model, data, eval_data, cfg, steps)
    if args.profile:
        return print_profile(profile_step(recipe))
    if args.ceiling:
        return print_ceiling(matmul_ceiling(recipe))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs_dir = out / f"runs-{stamp}"
    before = machine()
    print(f"bench_train: {'GPU ' + before.get('gpu', '') if gpu else 'CPU'}, {steps} steps × "
          f"{cfg['micro_batch']}×{cfg['grad_accum']} examples, {args.repeats} repeats; "
          f"load average {before['load_average']}")

    sides, tracked = compare(recipe, runs_dir, args.repeats, track=not args.no_track)
    rows = summarize(sides["lorakit"], sides["reference"], tracked["lorakit"], tracked["reference"], gpu)
    flops = step_flops(recipe)
    rows.append(("matmul MFLOP per supervised token", flops["lorakit"] / 1e6, flops["reference"] / 1e6,
                 flops["lorakit"] / flops["reference"], "(counted in step 1)"))
    print()
    print_table(rows)
    wanted = [] if args.knobs == "none" else [k.strip() for k in args.knobs.split(",") if k.strip()]
    knob_results = run_knobs(recipe, runs_dir, [k for k in wanted if k != "default"], sides["lorakit"], gpu)
    loaded = {} if args.no_load or gpu else beside_load(recipe, runs_dir, sides)

    report = {
        "setup": {**cfg, "steps": steps, "repeats": args.repeats, "threads": args.threads},
        "machine_before": before,
        "machine_after": machine(),
        "comparison": [dict(zip(("metric", "lorakit", "reference", "ratio", "goal"), r)) for r in rows],
        "runs": sides,
        "tracked": tracked,
        "knobs": knob_results,
        "beside_load": loaded,
    }
    (out / "bench_train.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"\nresults: {out / 'bench_train.json'} (logs under {runs_dir})")
    return 0


def compare(recipe: dict, runs_dir: Path, repeats: int, track: bool) -> tuple[dict, dict]:
    """The two sides, alternating, ``repeats`` times; then one tensor-tracked run each."""
    sides = {"lorakit": [], "reference": []}
    for rep in range(repeats):
        for kind in ["lorakit", "reference"] if rep % 2 == 0 else ["reference", "lorakit"]:
            result = run_side(kind, runs_dir / f"{kind}-{rep}", recipe, [])
            sides[kind].append(result)
            print(f"  {kind:9s} repeat {rep}: " + _brief(result))
    tracked = {"lorakit": {}, "reference": {}}
    for kind in tracked if track else []:
        tracked[kind] = run_side(kind, runs_dir / f"{kind}-tracked", recipe, [], track=True)
        print(f"  {kind:9s} tracked: tensor peak {tracked[kind].get('tensor_peak_bytes', 0) / 2**20:.1f} MiB")
    return sides, tracked


LOAD = ("import torch\nfrom lorakit.training.threads import usable_cpus\ntorch.set_num_threads(usable_cpus())\n"
        "a = torch.randn(768, 768)\nwhile True:\n    a @ a")


# Background loads: a second user's job, niced and at the run's own priority (beside that one lorakit waits
# passively; beside the niced one it keeps its short spin).
LOADS = {
    "nice 10 matmul loop on every usable CPU": ["nice", "-n", "10", sys.executable, "-c", LOAD],
    "the same matmul loop at the same priority": [sys.executable, "-c", LOAD],
}


def beside_load(recipe: dict, runs_dir: Path, quiet: dict) -> dict:
    """One run per side beside each background load (as a second user's job would run): how much each side
    slows down against its own quiet median."""
    out = {}
    for name, command in LOADS.items():
        load = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(2)  # the load is running before the first side starts
            slug = "beside-load" if name.startswith("nice") else "beside-busy"
            runs = {kind: run_side(kind, runs_dir / f"{kind}-{slug}", recipe, []) for kind in ("lorakit", "reference")}
        finally:
            load.kill()
            load.wait()
        print(f"\nbeside a background load ({name}), one run per side:")
        result = {}
        for kind, run in runs.items():
            tps, calm = run.get("supervised_tokens_per_s"), median(quiet[kind], "supervised_tokens_per_s")
            result[kind] = {"supervised_tokens_per_s": tps, "slowdown": calm / tps if tps and calm else None}
            print(f"  {kind:9s}: {_fmt(tps)} supervised tokens/s, {_fmt(result[kind]['slowdown'])}× slower than quiet")
        waits = _openmp_waits(runs_dir / f"lorakit-{slug}" / "log.txt")
        ratio = (result["lorakit"]["supervised_tokens_per_s"] or 0) / (result["reference"]["supervised_tokens_per_s"] or 1)
        print(f"  lorakit / reference beside the load: {ratio:.2f}× (lorakit's OpenMP waits: {waits})")
        out[name] = {**result, "ratio": ratio, "lorakit_openmp_waits": waits}
    return out


def _openmp_waits(log: Path) -> str:
    """What the lorakit run's settings said about its OpenMP waits."""
    text = log.read_text() if log.is_file() else ""
    return next((line.split("OpenMP waits:", 1)[1].strip() for line in text.splitlines() if "OpenMP waits:" in line),
                "-")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def run_knobs(recipe: dict, runs_dir: Path, names: list[str], default_runs: list[dict], gpu: bool) -> dict:
    """One lorakit run per knob; a table of supervised tokens/s against the default's median."""
    rows, results = [], {}
    default_tps = median(default_runs, "supervised_tokens_per_s")
    default_cpu = median(default_runs, "supervised_tokens_per_cpu_s")
    for name in names:
        if name in GPU_ONLY and not gpu:
            rows.append((name, None, None, None, GPU_ONLY[name]))
            continue
        result = results[name] = run_side("lorakit", runs_dir / f"knob-{name.replace(' ', '-')}", recipe, KNOBS[name])
        print(f"  knob {name:16s}: " + _brief(result))
        cpu = result.get("supervised_tokens_per_cpu_s")
        note = (f"train loss {result['final_loss']:.4f}, eval loss {result['eval_loss']:.4f}" if "final_loss" in result
                else f"error {result.get('error')}")
        rows.append((name, result.get("supervised_tokens_per_s"), cpu,
                     cpu / default_cpu if cpu and default_cpu else None, note))
    if rows:
        print(f"\nknobs (lorakit alone; default: {default_tps:.1f} supervised tokens/s wall, "
              f"{default_cpu:.1f} per CPU-s)")
        print_table(rows, header=("knob", "tok/s wall", "tok/CPU-s", "CPU-s ×", "note"))
    return results


def _brief(result: dict) -> str:
    if "error" in result:
        return f"FAILED {result['error']}"
    return (f"{result['supervised_tokens_per_s']:.1f} sup tok/s, {result['supervised_tokens_per_cpu_s']:.1f}/CPU-s, "
            f"RSS {result['rss_peak_bytes'] / 2**20:.0f} MiB, loss {result['final_loss']:.4f} "
            f"(eval {result['eval_loss']:.4f}), "
            f"process {result['process_seconds']:.0f} s")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, result_file = sys.argv[2], Path(sys.argv[3])
        rest = sys.argv[4:]
        track = bool(rest) and rest[0] == "--track"
        rest = rest[1:] if track else rest
        sys.exit(child(kind, result_file, track, rest[1:] if rest and rest[0] == "--" else rest))
    sys.exit(main())
