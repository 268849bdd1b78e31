"""`lorakit inspect`: a model's targetable modules and what an adapter would train, from shapes alone.

The model is built on the meta device from its config (no weights are read), the adapter is applied by the
same builder training uses, and the counts are PEFT's own: they are the numbers a run prints at its start.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.config.load import apply_overrides, check_flag_over_set, parse_recipe, parse_targets, read_yaml, section
from lorakit.config.methods import METHOD_KEY_DEFAULTS, REGISTRY, peft_config_class
from lorakit.config.schema import AdapterSection, ModelSection
from lorakit.errors import UsageError

RANKS = (1, 4, 8, 16, 64)


@dataclass
class Report:
    model: str
    model_type: str
    num_layers: int
    hidden_size: int
    adapter: str
    linear: list[tuple[str, int, tuple[int, int]]]  # (short name, count, (out, in))
    trainable: list[tuple[str, int, int | None, int]]  # (group, count, each or None when it varies, total)
    trainable_params: int
    all_params: int
    rank_rows: list[tuple[tuple[int, int], list[str], list[int], int]]  # (shape, modules, per rank, full)
    notes: list[str] = field(default_factory=list)


def lora_params(d_in: int, d_out: int, r: int) -> int:
    """Trainable parameters of one LoRA update B·A on a d_out×d_in matrix: A is r×d_in, B is d_out×r."""
    return r * (d_in + d_out)


def rank_table(shapes: dict[tuple[int, int], list[str]], ranks=RANKS):
    """For each (out, in) shape: the modules with it, LoRA params per matrix at each rank, and full d_in·d_out."""
    return [
        (shape, modules, [lora_params(shape[1], shape[0], r) for r in ranks], shape[0] * shape[1])
        for shape, modules in shapes.items()
    ]


# ----------------------------------------------------------------------------------------------------------
# From the CLI's arguments to the recipe sections inspect needs


def inspect_sections(recipe_path: Path | None, model: str | None, method: str | None, r: int | None,
                     targets: str | None, overrides: list[str]) -> tuple[ModelSection, AdapterSection]:
    """The model and adapter sections from a recipe and/or --model/--method/--r/--targets/--set."""
    if recipe_path is None and model is None:
        raise UsageError("inspect: give a RECIPE or --model PATH")
    data = read_yaml(recipe_path) if recipe_path is not None else {}
    source = str(recipe_path) if recipe_path else "inspect"
    from_recipe = section(data, "adapter", source)
    if method in METHOD_KEY_DEFAULTS and method != from_recipe.get("method", "lora"):
        # Before --set: the recipe's keys that --method's method has no use for go; a key the user sets is kept
        # and judged as validate judges it (refused where the method does not use it).
        data["adapter"] = _keys_for_method(from_recipe, method)
    overrides = list(overrides or [])
    apply_overrides(data, overrides)
    given = {"model.name_or_path": ("--model", model), "adapter.method": ("--method", method),
             "adapter.r": ("--r", r), "adapter.target_modules": ("--targets", targets)}
    for key, (flag, typed) in given.items():
        if typed is None:
            continue
        value = parse_targets(typed) if flag == "--targets" else typed
        check_flag_over_set(data, overrides, key, value, f"{flag} {typed}")
        section_name, name = key.split(".")
        section(data, section_name, source)[name] = value  # an unknown method: the schema refuses it, naming all
    adapter = section(data, "adapter", source)
    _require_method_keys(adapter, recipe_path, model, method)
    if recipe_path is None:  # inspect needs only model and adapter; placeholders satisfy the other sections
        section(data, "data", source).setdefault("train", "-")  # beside, not over, what --set gave them
        if "epochs" not in section(data, "train", source):
            data["train"].setdefault("max_steps", 1)
    recipe = parse_recipe(data, source=source)
    return recipe.model, recipe.adapter


def _require_method_keys(adapter: dict, recipe_path: Path | None, model: str | None, method: str | None) -> None:
    """Exit 2 with the command to run when the method needs a key inspect was not given: prefix and prompt tuning
    train virtual tokens, not target modules, and their count is what inspect shows."""
    name = adapter.get("method")
    missing = [key for key in (REGISTRY[name].required if name in REGISTRY else ()) if key not in adapter]
    if missing:
        given = [str(recipe_path) if recipe_path else "", f"--model {model}" if model else "",
                 f"--method {method}" if method else ""]
        command = " ".join(["lorakit inspect", *filter(None, given), *(f"--set adapter.{k}=20" for k in missing)])
        raise UsageError(f"adapter.{missing[0]}: required for method {name}, which trains that many virtual tokens "
                         f"instead of target modules; run: {command}")


def _keys_for_method(adapter: dict, method: str) -> dict:
    """The recipe's adapter keys that still mean something for another method (--method switches method); keys
    given with --set are not filtered here."""
    import dataclasses

    own = {"r", "lora_alpha", "lora_dropout", "target_modules"}
    fields = {f.name for f in dataclasses.fields(peft_config_class(method))}
    kept = {k: v for k, v in adapter.items() if (k in METHOD_KEY_DEFAULTS[method]) or (k not in own and k in fields)}
    kept["method"] = method
    return kept


# ----------------------------------------------------------------------------------------------------------
# The report


def inspect_model(model_section: ModelSection, adapter: AdapterSection) -> Report:
    from lorakit.adapters.build import apply_adapter, counting_section  # heavy: torch, transformers
    from lorakit.models.loading import trainable_summary
    from lorakit.models.meta import build_meta_model, load_model_config
    from lorakit.models.presets import preset_config, preset_names

    name = model_section.name_or_path
    # a preset (or its hub id) as estimate-memory takes it: offline; a hub id out of reach names the presets
    config, where = preset_config(name) or (
        load_model_config(name, model_section.trust_remote_code, model_section.revision,
                          remedy=f"offline presets: {', '.join(preset_names())}"), name)
    model = build_meta_model(config, model_section.trust_remote_code)
    text_config = model.config.get_text_config()
    linear = linear_groups(model)
    shapes: dict[tuple[int, int], list[str]] = defaultdict(list)
    for name, _, shape in linear:
        shapes[shape].append(name)
    adapted = apply_adapter(model, counting_section(adapter), low_cpu_mem_usage=True)
    trainable, total = adapted.get_nb_trainable_parameters()
    notes = []
    if model_section.quantization != "none":
        notes.append(f"model.quantization {model_section.quantization}: the adapter's counts are the same on the "
                     "quantized base (memory: lorakit estimate-memory)")
    notes.append(trainable_summary(adapted))
    if getattr(getattr(adapted, "peft_config", {}).get("default"), "is_prompt_learning", False):
        notes.append(f"{adapter.method} tuning targets none of the linear modules above; the LoRA rank table is for "
                     "lora and dora (--method lora)")
    return Report(
        model=where,
        model_type=model.config.model_type,
        num_layers=text_config.num_hidden_layers,
        hidden_size=text_config.hidden_size,
        adapter=describe_adapter(adapter, adapted),
        linear=linear,
        trainable=trainable_groups(adapted),
        trainable_params=trainable,
        all_params=total,
        rank_rows=rank_table(dict(shapes)),
        notes=notes,
    )


def linear_groups(model) -> list[tuple[str, int, tuple[int, int]]]:
    """(short name, how many, (out, in)) of the linear layers an adapter can target, the LM head excluded."""
    import torch

    head = model.get_output_embeddings()
    counts: dict[tuple[str, tuple[int, int]], int] = defaultdict(int)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            counts[(name.rsplit(".", 1)[-1], tuple(module.weight.shape))] += 1
    return [(short, n, shape) for (short, shape), n in counts.items()]


def trainable_groups(adapted) -> list[tuple[str, int, int | None, int]]:
    """Trainable parameters grouped by the module that holds them (q_proj, ..., prompt_encoder, bottleneck)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    from lorakit.adapters.bottleneck import BottleneckAdapter

    sizes: dict[str, list[int]] = defaultdict(list)
    seen: set[int] = set()
    for name, module in adapted.named_modules():
        if not isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper, BottleneckAdapter)):
            continue
        params = [p for p in module.parameters() if p.requires_grad and id(p) not in seen]
        if not params:
            continue
        seen.update(id(p) for p in params)
        short = name.rsplit(".", 1)[-1]
        group = f"bottleneck after {short}" if isinstance(module, BottleneckAdapter) else short
        sizes[group].append(sum(p.numel() for p in params))
    for name, p in adapted.named_parameters():
        if p.requires_grad and id(p) not in seen:
            sizes[name.removeprefix("base_model.model.")].append(p.numel())
    return [(g, len(v), v[0] if len(set(v)) == 1 else None, sum(v)) for g, v in sizes.items()]


def describe_adapter(adapter: AdapterSection, adapted) -> str:
    keys = {k: v for k, v in adapter.model_dump().items() if v is not None and k != "method"}
    text = " ".join([adapter.method] + [f"{k}={_short(v)}" for k, v in keys.items()])
    if adapter.method == "ia3" and adapter.target_modules is None:  # say which defaults PEFT chose
        config = adapted.peft_config["default"]
        text += (f" (PEFT's defaults: target_modules={_short(sorted(config.target_modules))} "
                 f"feedforward_modules={_short(sorted(config.feedforward_modules or []))})")
    return text


def _short(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def report_record(report: Report) -> dict:
    """The report as `lorakit --json-logs inspect` emits it: the tables as lists of named fields."""
    return {
        "model": report.model, "model_type": report.model_type, "num_layers": report.num_layers,
        "hidden_size": report.hidden_size, "adapter": report.adapter,
        "linear": [{"module": name, "count": n, "shape": [o, i]} for name, n, (o, i) in report.linear],
        "trainable": [{"group": g, "count": n, "each": each, "total": total} for g, n, each, total in report.trainable],
        "trainable_params": report.trainable_params, "all_params": report.all_params,
        "rank_table": [{"shape": [o, i], "modules": mods, "per_rank": dict(zip(map(str, RANKS), counts)), "full": full}
                       for (o, i), mods, counts, full in report.rank_rows],
        "notes": list(report.notes),
    }


def format_report(report: Report) -> str:
    lines = [
        f"model: {report.model} ({report.model_type}, {report.num_layers} layers, hidden {report.hidden_size}; "
        "meta device, no weights loaded)",
        "",
        "linear modules an adapter can target (lm_head excluded):",
        _table(["module", "count", "shape (out×in)", "params each"],
               [[name, n, f"{o}×{i}", o * i] for name, n, (o, i) in report.linear]),
        "",
        f"adapter: {report.adapter}",
        _table(["trainable in", "count", "each", "total"],
               [[g, n, "varies" if each is None else each, total] for g, n, each, total in report.trainable]),
        *report.notes,
        "",
        "LoRA rank table: trainable params per matrix, r·(d_in+d_out), vs full fine-tuning d_in·d_out",
        _table(["shape (out×in)", *[f"r={r}" for r in RANKS], "full", "modules"],
               [[f"{o}×{i}", *counts, full, ",".join(mods)] for (o, i), mods, counts, full in report.rank_rows]),
    ]
    return "\n".join(lines)


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[f"{c:,d}" if isinstance(c, int) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    left = {0, len(header) - 1} if header[-1] == "modules" else {0}
    return "\n".join(
        ("  " + "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        .rstrip()
        for row in cells
    )
