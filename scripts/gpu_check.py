"""The GPU checks of docs/scaling.md, as one command for a machine with one NVIDIA GPU. NOT RUN YET: no session
has been lent a GPU so far; expect to adjust it on its first run.

On the device tool's machine (Python 3.12) python3 already has torch, transformers, accelerate, typer and rich;
carry the rest as wheels (47 MB, under the tool's 64 MiB with this repository), prepared here:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl bitsandbytes==0.50.2 peft==0.21.2 datasets pydantic \
        pydantic-core annotated-types typing-inspection dill multiprocess

then one call, carry [".whl"], timeout_s 540:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
    PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py $OUT

(transformers there was 5.17 when last listed; lorakit is tested with 5.24, whose wheel adds 14 MB.)

What it runs on recipes/smoke.yaml's tiny model, in bf16 on the GPU: one process; FSDP through `accelerate
launch --config_file recipes/accelerate/fsdp.yaml --num_processes 1` (the wrapping, gathering, checkpoint and
resume code CPU runs cannot reach, as accelerate enables FSDP on GPUs only); the same with fsdp2.yaml, and with
fsdp-qlora.yaml and an nf4 base. Each FSDP run is also killed while writing its step-4 checkpoint and resumed, and its adapter
compared with the uninterrupted run's. One line per run goes to OUT/gpu_check.txt: copy them into
docs/scaling.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(out: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from lorakit.testing import build_tiny_llama, write_memorisation_data

    out.mkdir(parents=True, exist_ok=True)
    model, data = build_tiny_llama(out / "model"), write_memorisation_data(out / "train.jsonl")
    # Without a GPU it still runs, as a dry run of this script: accelerate then trains unsharded (fsdp=False).
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (dry run)"
    lines = [f"{device}, torch {torch.__version__}"]
    train = ["-m", "lorakit", "train", str(ROOT / "recipes" / "smoke.yaml"), "--set", f"model.name_or_path={model}",
             "--set", f"data.train={data}", "--set", "model.dtype=bfloat16", "--set", "train.max_steps=6",
             "--set", "train.save_every=2", "--set", "train.log_every=1"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--config_file"]
    runs = {
        "one process": [sys.executable, *train],
        "fsdp": [*launch, str(ROOT / "recipes/accelerate/fsdp.yaml"), *train],
        "fsdp2": [*launch, str(ROOT / "recipes/accelerate/fsdp2.yaml"), *train],
        "fsdp-qlora": [*launch, str(ROOT / "recipes/accelerate/fsdp-qlora.yaml"), *train,
                       "--set", "model.quantization=nf4"],
    }
    for name, cmd in runs.items():
        run = out / name.replace(" ", "-")
        started = time.monotonic()
        code = _run([*cmd, "--output-dir", str(run), "--overwrite"], out / f"{run.name}.log")
        line = f"{name}: exit {code}, {time.monotonic() - started:.0f} s"
        if code == 0:
            records = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
            losses = [r["loss"] for r in records if "loss" in r]
            state = json.loads(sorted((run / "checkpoints").glob("step-*/trainer_state.json"))[-1].read_text())
            line += f", loss {losses[0]:.3f} -> {losses[-1]:.3f}, checkpoint fsdp={state.get('fsdp')}"
        if code == 0 and name != "one process":
            resumed = out / f"{run.name}-resumed"
            env = {**os.environ, "LORAKIT_TEST_CHECKPOINT_FAULT": "kill:rng:4"}
            killed = _run([*cmd, "--output-dir", str(resumed), "--overwrite"], out / f"{resumed.name}-killed.log", env)
            again = _run([*cmd, "--output-dir", str(resumed), "--resume"], out / f"{resumed.name}.log")
            if again == 0:
                a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (run, resumed))
                diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
                line += f"; killed at the step-4 checkpoint (exit {killed}), resumed: adapter max|diff| {diff:.3g}"
            else:
                line += f"; killed (exit {killed}), resume failed with exit {again}"
        print(line, flush=True)
        lines.append(line)
    (out / "gpu_check.txt").write_text("\n".join(lines) + "\n")


def _run(cmd: list[str], log: Path, env: dict | None = None) -> int:
    with log.open("w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=300).returncode


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu-check"))
