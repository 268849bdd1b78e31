"""`make smoke`: train a tiny random model for a few dozen steps on CPU and check the adapter.

Checks: the loss falls, and the saved adapter reloads with plain PEFT and keeps the gain.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    from lorakit.testing import build_tiny_llama, write_memorisation_data

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_llama(tmp / "model")
        data = write_memorisation_data(tmp / "train.jsonl")
        run = tmp / "run"
        cmd = [
            sys.executable, "-m", "lorakit", "train", str(ROOT / "recipes" / "smoke.yaml"),
            "--set", f"model.name_or_path={model}", "--set", f"data.train={data}", "--output-dir", str(run),
        ]
        subprocess.run(cmd, check=True, cwd=ROOT)
        losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        if not losses[-1] < 0.5 * losses[0]:
            sys.exit("smoke: the loss did not fall by half")
        from lorakit.testing import adapter_loss_gain

        base_loss, tuned_loss = adapter_loss_gain(model, run / "adapter", data)
        print(f"reloaded with PEFT: loss on the data {base_loss:.3f} (base) -> {tuned_loss:.3f} (adapter)")
        if not tuned_loss < 0.5 * base_loss:
            sys.exit("smoke: the reloaded adapter does not reproduce the training gain")
        print("smoke: ok")


if __name__ == "__main__":
    main()
