"""README.md model cards for DIR/adapter and merged models, in place of PEFT's placeholder.

A Hugging Face card: YAML front matter the hub reads (base_model, library_name, pipeline_tag, tags, datasets),
then the method, data, training results and how to load the artifact, all taken from what the run left on disk
(run.json, recipe.yaml, lorakit.json, adapter_config.json), so `hf upload` of either folder makes
a complete hub repository.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import yaml

from lorakit.paths import is_local

CARD = "README.md"
ADAPTER_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "use_rslora", "init_lora_weights",
                "num_virtual_tokens", "bias")
TRAIN_KEYS = ("learning_rate", "lr_scheduler", "warmup_steps", "micro_batch_size", "grad_accum", "max_steps",
              "epochs", "optimizer", "seed")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {} if path.is_file() else {}


def _is_hub_id(base: str, record: dict) -> bool:
    """Whether ``base`` may stand as the card's base_model: the hub refuses an upload whose card names a local
    path there (its metadata check), so a base trained from disk is named in the text only. A run records the
    resolved path beside the name; the two differ exactly when the base was local."""
    return base != "unknown" and record.get("base_model_path", base) == base and not is_local(base)


def quantized_tag(method: str, quantized: bool) -> str:
    """qlora, qdora for LoRA and DoRA over a quantized base; any other method keeps its name."""
    return f"q{method}" if quantized and method in ("lora", "dora") else method


def method_tag(config: dict, record: dict) -> str:
    """lora, qlora, dora, qdora, ia3, prefix, ... (q- when the base was quantized for training)."""
    peft_type = str(config.get("peft_type", record.get("method", "adapter"))).lower()
    name = {"prefix_tuning": "prefix", "prompt_tuning": "prompt"}.get(peft_type, peft_type)
    if name == "lora" and config.get("use_dora"):
        name = "dora"
    return quantized_tag(name, record.get("quantization") not in (None, "none"))


def build_card(adapter_dir: Path, *, merged: bool = False, merge_record: dict | None = None) -> str:
    """The card text for ``adapter_dir`` (or, ``merged``, for the model merged from it): the run it comes from
    is the adapter's parent directory when that holds run.json / recipe.yaml."""
    adapter_dir = Path(adapter_dir)
    config, record = _read_json(adapter_dir / "adapter_config.json"), _read_json(adapter_dir / "lorakit.json")
    run, recipe = _read_json(adapter_dir.parent / "run.json"), _read_yaml(adapter_dir.parent / "recipe.yaml")
    base = record.get("base_model") or config.get("base_model_name_or_path") or "unknown"
    method = method_tag(config, record)
    hub_data = [d["source"] for d in run.get("data", []) if d.get("kind") == "hub"]
    front = {"library_name": "transformers" if merged else "peft",
             "pipeline_tag": "text-generation", "tags": ["lorakit", method] + (["merged"] if merged else [])}
    if _is_hub_id(base, record):
        front = {"base_model": base, **front}
    if hub_data:
        front["datasets"] = hub_data
    title = f"{base} + {method}" + (" (merged)" if merged else " adapter")
    parts = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", "",
             f"Fine-tuned with [lorakit](https://github.com/lorakit/lorakit) from `{base}` with {method}."]
    parts += _method(config, record, recipe, merge_record)
    parts += _data(run, recipe)
    parts += _training(run, recipe)
    parts += _usage(base, merged, (recipe.get("data") or {}).get("format", "alpaca") if recipe else None)
    parts += _reproduce(run)
    return "\n".join(parts) + "\n"


def _method(config: dict, record: dict, recipe: dict, merge_record: dict | None) -> list[str]:
    lines = ["", "## Method", "", "| setting | value |", "|---|---|"]
    settings = {"method": method_tag(config, record), "quantization": record.get("quantization"),
                "dtype": record.get("dtype")}
    settings.update({k: config[k] for k in ADAPTER_KEYS if config.get(k) not in (None, False)})
    if init_from := (record.get("init") or {}).get("init_from"):  # PEFT's config says true: the fresh weights' init
        settings.pop("init_lora_weights", None)
        settings["init_from"] = init_from
    if merge_record:
        settings.update({"merged into": merge_record.get("base"), "merge base precision":
                         merge_record.get("base_precision"), "merged dtype": merge_record.get("dtype")})
    settings.update({f"train.{k}": v for k, v in (recipe.get("train") or {}).items() if k in TRAIN_KEYS})
    lines += [f"| {k} | `{v}` |" for k, v in settings.items() if v is not None]
    return lines


def _data(run: dict, recipe: dict) -> list[str]:
    data = recipe.get("data") or {}
    if not run.get("data") and not data:
        return []
    lines = ["", "## Data", "", f"Format `{data.get('format', 'alpaca')}`, max_seq_len {data.get('max_seq_len')}.",
             "", "| role | source | sha256 |", "|---|---|---|"]
    lines += [f"| {d['role']} | `{d['source']}` | `{d.get('sha256') or '-'}` |" for d in run.get("data", [])]
    for split, stats in (run.get("data_stats") or {}).items():
        if stats:
            lines.append(f"\n{split}: {stats['rows']} rows, {stats['kept']} kept ({stats['truncated']} truncated, "
                         f"{stats['too_long'] + stats['unsupervised']} dropped, {stats['bad']} malformed), "
                         f"{stats['supervised_tokens']:,} supervised tokens.")
    return lines


def _training(run: dict, recipe: dict) -> list[str]:
    final = run.get("final_metrics") or {}
    if not final:
        return []
    rows = {"steps": final.get("step"), "tokens": final.get("tokens"), "final train loss": final.get("loss"),
            "eval loss": final.get("eval_loss"), "wall time": f"{run['wall_time_s']:.0f} s" if run.get("wall_time_s")
            else None, "hardware": ", ".join(run.get("devices") or []) or None,
            "processes": run.get("world_size"), "tokens/s": final.get("input_tokens_per_s"), "MFU": final.get("mfu")}
    rows.update({k: v for k, v in final.items() if k.startswith("eval_") and k != "eval_loss"})
    lines = ["", "## Training", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows.items() if v is not None]
    versions = run.get("versions") or {}
    if versions:
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + "."]
    return lines


# How `lorakit generate` should be given a prompt for each data format: as training rendered it.
PROMPT_HOW = {
    "alpaca": "   # a prompt in the run's alpaca layout (### Instruction: ... ### Response:), not --chat: "
              "training never used the chat template",
    "completion": "   # the text to continue, as the run's prompts were given (not --chat)",
    "text": "   # the text to continue (not --chat: the run trained on plain text)",
}


def _usage(base: str, merged: bool, data_format: str | None) -> list[str]:
    """The loading snippets; ``data_format``: the run's data.format (None when no run is around the adapter)."""
    chat = data_format not in PROMPT_HOW
    tokenizer_note = "with the chat template trained on" if chat else "the run's tokenizer"
    how = " --chat" if chat else ""
    note = "" if chat else PROMPT_HOW[data_format]
    if merged:
        code = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                'model = AutoModelForCausalLM.from_pretrained("THIS_DIR_OR_REPO")',
                'tokenizer = AutoTokenizer.from_pretrained("THIS_DIR_OR_REPO")']
        cli = f'lorakit generate --model THIS_DIR_OR_REPO{how} --prompt "..."{note}'
    else:
        code = ["from peft import AutoPeftModelForCausalLM",
                "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'model = AutoPeftModelForCausalLM.from_pretrained("THIS_DIR_OR_REPO")  # loads {base} too',
                f'tokenizer = AutoTokenizer.from_pretrained("THIS_DIR_OR_REPO")  # {tokenizer_note}',
                "# or with transformers alone (PEFT installed): the base with this adapter attached",
                'model = AutoModelForCausalLM.from_pretrained("THIS_DIR_OR_REPO")']
        cli = f'lorakit generate --model {base} --adapter tuned=THIS_DIR_OR_REPO{how} --prompt "..."{note}'
    return ["", "## Use it", "", "```python", *code, "```", "", "```bash", cli,
            "lorakit eval THIS_DIR --data questions.jsonl --base-too   # is it better than the base?", "```", "",
            "Publish this folder as a hub repository: `hf upload USER/REPO THIS_DIR` (huggingface_hub's CLI)."]


def _reproduce(run: dict) -> list[str]:
    argv = run.get("command") or []
    if not argv:
        return []
    return ["", "## Reproduce", "", "```bash", "lorakit " + shlex.join(argv[1:]), "```",
            "", "The resolved recipe is recipe.yaml in the run directory (sha256 in run.json)."]


def write_card(out_dir: Path, adapter_dir: Path, *, merged: bool = False, merge_record: dict | None = None) -> Path:
    """DIR/README.md, replacing the placeholder PEFT writes with save_pretrained."""
    path = Path(out_dir) / CARD
    path.write_text(build_card(adapter_dir, merged=merged, merge_record=merge_record))
    return path
