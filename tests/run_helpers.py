"""Small helpers for tests that run `lorakit train` on the tiny model: data, recipes, the CLI, tree hashes."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import yaml


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And two plus two?"},
    {"role": "assistant", "content": "four"},
]


def write_jsonl(path: Path, rows) -> str:
    """Rows (dicts, or strings written as they are) one per line; the path as a string."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def write_data(path: Path, n: int = 40) -> Path:
    """``n`` short alpaca rows (about 50 tokens each with the tiny tokenizer)."""
    with open(path, "w") as f:
        for i in range(n):
            row = {"instruction": f"Count to {i % 7 + 1}", "input": "", "output": " ".join(map(str, range(i % 7 + 1)))}
            f.write(json.dumps(row) + "\n")
    return path


def recipe_dict(model_dir, data, out, adapter: dict | None = None, **train) -> dict:
    """A tiny fp32 CPU recipe: dropout on (so RNG matters), 2 micro-batches of 2 per step, a log line per step."""
    return {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "adapter": {"r": 4, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"], **(adapter or {})},
        "data": {"train": str(data), "max_seq_len": 128},
        "train": {
            "max_steps": 6, "micro_batch_size": 2, "grad_accum": 2, "learning_rate": 1e-3, "log_every": 1,
            "lr_scheduler": "cosine", "seed": 7, **train,
        },
        "output": {"dir": str(out)},
    }


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def cli(*args: str):
    """Run the CLI in this process; returns typer's Result (exit_code, output with stderr mixed in)."""
    from typer.testing import CliRunner

    from lorakit.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def sigint_as_from_a_terminal() -> None:
    """Popen's preexec_fn: Ctrl-C (SIGINT) reaches the child's default handler, as it does from a terminal. A shell
    starts a background command (`make test &`, a CI step that backgrounds) with SIGINT ignored, and children
    inherit that: Python then never raises KeyboardInterrupt and a Ctrl-C test sees the run go on."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def lorakit(*args, env: dict | None = None, timeout: float = 300, cwd=None) -> subprocess.CompletedProcess:
    """``python -m lorakit ARGS`` as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "lorakit", *map(str, args)], capture_output=True, text=True, env=env or subprocess_env(),
        timeout=timeout, cwd=cwd,
    )


def tree_hash(root: Path) -> dict:
    """{relative path: sha256} of every file under ``root`` (and the set of directories): byte-for-byte identity."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def adapter_hash(adapter_dir: Path) -> dict:
    """tree_hash of a saved adapter without its model card (README.md records the run's wall time and date)."""
    return {k: v for k, v in tree_hash(adapter_dir).items() if k != "README.md"}


def training_records(metrics: Path) -> list[dict]:
    """metrics.jsonl without the timing-dependent fields: what must match between an interrupted and a clean run."""
    records = []
    for line in Path(metrics).read_text().splitlines():
        record = json.loads(line)
        if "loss" in record or "eval_loss" in record:
            records.append({k: v for k, v in record.items() if not k.endswith("per_s")})
    return records


def write_metrics(run_dir: Path, steps=20, every=5) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(every, steps + 1, every):
        lines.append({"step": step, "loss": 3.0 / step, "lr": 1e-3 * (1 - step / steps), "grad_norm": 0.5})
        if step % 10 == 0:
            lines.append({"step": step, "eval_loss": 3.5 / step})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature and the chunk's CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body, crc = data[16:29], struct.unpack(">I", data[29:33])[0]
    assert zlib.crc32(kind + body) == crc, "IHDR CRC mismatch"
    assert data.endswith(b"IEND\xaeB`\x82"), "PNG is truncated"
    return struct.unpack(">II", body[:8])


def train_chat_memorisation(tmp: Path, model_dir: Path) -> Path:
    """A run (adapter and merged model) memorising short chat answers in the model's own chat template: 40 steps,
    enough for confident answers that end with the template's end-of-turn token."""
    from lorakit.testing import write_memorisation_data

    data = write_memorisation_data(tmp / "train.jsonl", fmt="chat")
    recipe = {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "adapter": {"r": 8, "lora_dropout": 0.0, "target_modules": ".*(proj|lm_head)"},
        "data": {"train": str(data), "format": "chat", "max_seq_len": 128},
        "train": {"max_steps": 40, "micro_batch_size": 4, "grad_accum": 2, "learning_rate": 1e-2,
                  "lr_scheduler": "constant", "log_every": 10, "seed": 3},
        "output": {"dir": str(tmp / "run"), "save": "both"},
    }
    result = cli("train", write_recipe(tmp / "recipe.yaml", recipe))
    assert result.exit_code == 0, result.output
    return tmp / "run"


def write_pairs(path: Path, n: int = 24, chat: bool = False) -> Path:
    """``n`` preference rows: a short correct count (chosen) against a long, wrong ramble (rejected); ``chat``: the
    prompt as messages with a system turn and the chosen answer as an assistant message."""
    with open(path, "w") as f:
        for i in range(n):
            k = i % 7 + 1
            prompt, chosen = f"Count to {k}", " ".join(map(str, range(k)))
            rejected = "the quick brown fox jumps over the lazy dog " * (1 + i % 3)
            row = {"prompt": prompt, "chosen": chosen, "rejected": rejected.strip()}
            if chat:
                row = {"messages": [{"role": "system", "content": "Answer briefly."},
                                    {"role": "user", "content": prompt}],
                       "chosen": [{"role": "assistant", "content": chosen}], "rejected": rejected.strip()}
            f.write(json.dumps(row) + "\n")
    return path


def pref_recipe(model_dir, data, out, objective="dpo", **train) -> dict:
    """A tiny fp32 preference recipe: dropout on, 2 micro-batches of 2 pairs per step, eval on a fifth, a log line
    per step."""
    return {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "adapter": {"r": 4, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(data), "format": "preference", "max_seq_len": 128, "eval_split": 0.2},
        "train": {"objective": objective, "max_steps": 4, "micro_batch_size": 2, "grad_accum": 2,
                  "learning_rate": 5e-3, "log_every": 1, "eval_every": 2, "seed": 7, **train},
        "output": {"dir": str(out)},
    }
