"""Benchmark `lorakit merge` against PEFT's merge_and_unload + save_pretrained: peak RSS, wall time, outputs.

    python scripts/bench_merge.py                       # ~0.5B-parameter fp32 Llama in 5 shards, r=16 all-linear
    python scripts/bench_merge.py --hidden 64 --layers 2 --intermediate 128 --shard-size 50KB   # seconds

Builds a random Llama (lorakit.testing.build_tiny_llama) and a random all-linear LoRA adapter, then runs each
merge in its own process and reads that process's peak RSS from the kernel (os.wait4). Goals (issue 5):
lorakit's peak RSS <= 0.5x PEFT's, wall time <= 1.0x, outputs equal. Exit 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEFT_MERGE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base, adapter, out, shard = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size=shard)
AutoTokenizer.from_pretrained(adapter).save_pretrained(out)
"""


def build(work: Path, args) -> None:
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from lorakit.testing import build_random_adapter, build_tiny_llama

    base = build_tiny_llama(
        work / "base", hidden_size=args.hidden, num_layers=args.layers, intermediate_size=args.intermediate,
        num_heads=args.heads, num_kv_heads=args.kv_heads, max_shard_size=args.shard_size,
    )
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", init_lora_weights=False)
    adapter = build_random_adapter(base, work / "adapter", config)
    AutoTokenizer.from_pretrained(base).save_pretrained(adapter)


def measure(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process."""
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: a chatty child must never block on stderr
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, with its resource usage
        if proc.returncode != 0:
            errors.seek(0)
            sys.exit(f"error: {' '.join(cmd[:4])} ... failed:\n{errors.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def max_difference(a: Path, b: Path) -> tuple[float, int]:
    """Largest |a - b| over every tensor, read one tensor at a time; and how many tensors were compared."""
    from lorakit.merge.weights_io import TensorReader, list_tensors

    theirs = {t.key: t for t in list_tensors(b)}
    worst, count = 0.0, 0
    with TensorReader() as ra, TensorReader() as rb:
        for t in list_tensors(a):
            if t.key not in theirs:
                sys.exit(f"error: {t.key} is in {a} but not in {b}")
            x, y = ra.get(t), rb.get(theirs[t.key])
            worst = max(worst, (x.double() - y.double()).abs().max().item())
            count += 1
    if count != len(theirs):
        sys.exit(f"error: {b} has {len(theirs)} tensors, {a} has {count}")
    return worst, count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--shard-size", default="500MB", help="input and output shard size")
    parser.add_argument("--workdir", type=Path, help="keep the models here (default: a temporary directory)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.build_only:
        build(args.workdir, args)
        return 0
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        # Built in a child: a forked child's peak RSS (ru_maxrss) can include its parent's memory at the fork,
        # so the parent that launches the measured merges must stay small.
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--workdir", str(work), "--build-only"], check=True,
                       stdout=sys.stderr)
        base, adapter = work / "base", work / "adapter"
        shards = len(list(base.glob("*.safetensors")))
        size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        lorakit = measure([sys.executable, "-m", "lorakit", "merge", str(adapter), "--output", str(work / "lorakit"),
                           "--base", str(base), "--no-verify", "--max-shard-size", args.shard_size, "--overwrite"])
        shutil.rmtree(work / "peft", ignore_errors=True)
        peft = measure([sys.executable, "-c", PEFT_MERGE, str(base), str(adapter), str(work / "peft"), args.shard_size])
        diff, tensors = max_difference(work / "lorakit", work / "peft")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    result = {
        "model_bytes": size, "input_shards": shards, "tensors": tensors, "rank": args.rank,
        "lorakit": {"wall_s": round(lorakit[0], 2), "peak_rss_bytes": lorakit[1]},
        "peft": {"wall_s": round(peft[0], 2), "peak_rss_bytes": peft[1]},
        "rss_ratio": round(lorakit[1] / peft[1], 3), "time_ratio": round(lorakit[0] / peft[0], 3),
        "max_abs_diff": diff,
    }
    goals = {"rss_ratio <= 0.5": result["rss_ratio"] <= 0.5, "time_ratio <= 1.0": result["time_ratio"] <= 1.0,
             "outputs equal (max |diff| <= 1e-5)": diff <= 1e-5}
    if args.json:
        print(json.dumps({**result, "goals": goals}))
    else:
        gib = 1024**3
        print(f"model: {size / gib:.2f} GiB fp32 in {shards} shards, {tensors} tensors, LoRA r={args.rank} all-linear")
        print(f"{'':10}{'wall s':>10}{'peak RSS GiB':>15}")
        for name in ("lorakit", "peft"):
            print(f"{name:10}{result[name]['wall_s']:>10.1f}{result[name]['peak_rss_bytes'] / gib:>15.2f}")
        print(f"ratios: RSS {result['rss_ratio']:.2f}x, time {result['time_ratio']:.2f}x; max |diff| {diff:.2e}")
        for goal, ok in goals.items():
            print(f"{'ok  ' if ok else 'MISS'} {goal}")
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
