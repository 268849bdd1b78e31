"""`lorakit eval TARGET --data FILE`: is the tuned model better than the base on my task?

TARGET is a run directory, an adapter or a merged model. Each row's prompt is rendered as the run's training
rendered it (lorakit.scoring), answered greedily and scored; ``--base-too`` scores the base in the same process
(the adapter switched off, as `lorakit generate` does). Also the token-weighted loss on the answers, and
eval.json with every output, score and setting.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from accelerate import Accelerator
from transformers import AutoTokenizer

from lorakit.adapters.files import (RECORD_FILE, check_recorded_base, config_file, find_adapter_dir, is_model_dir,
                                    read_config, read_record, recorded_base, require_weights, target_dir)
from lorakit.config.load import parse_recipe, read_yaml
from lorakit.config.schema import PREFERENCE_OBJECTIVES, DataSection, ModelSection, Recipe, TrainSection
from lorakit.data.chat import resolve_chat_template
from lorakit.data.formats import num_targets
from lorakit.data.sources import BadRowError, read_rows
from lorakit.errors import CheckpointError, DataError, SafetyError, UsageError
from lorakit.merge.merge import PROVENANCE_FILE as MERGE_RECORD
from lorakit.models.checks import folder_problem
from lorakit.models.loading import load_tokenizer, resolve_device, resolve_model_path
from lorakit.paths import is_local, require_hub
from lorakit.publish import check_file_output, check_inputs_apart, set_aside
from lorakit.text import NotJsonObject, read_json_object
from lorakit.tools.generate import load_for_generation, precision_note
from lorakit.training.loop import evaluate
from lorakit.training.loss import build_loss
from lorakit.training.preference import NORMALISED, PreferenceLoss, compute_reference
from lorakit.training.scoring import METRICS, EvalItem, check_answers, check_new_tokens, eval_items, score_items
TOTALS = ("score", "loss", "perplexity", "preference_accuracy", "preference_margin")
# The format a row's keys give, first match first: a pair may hold its prompt as messages.
FORMAT_KEYS = {"chosen": "preference", "messages": "chat", "instruction": "alpaca", "completion": "completion",
               "text": "text"}
EXAMPLES_SHOWN = 3


@dataclass
class Target:
    kind: str  # "adapter" (a run directory's or a bare one) or "merged"
    path: Path  # the adapter or merged-model directory
    model: ModelSection  # what loads first: the base (adapter targets) or the merged model
    base: ModelSection | None  # merged targets: the base the adapter was merged into, for --base-too
    recipe: Recipe | None  # the run's recipe.yaml when the target sits in (or is) a run directory
    no_base: str = ""  # merged targets without a base: why (for --base-too's message)
    recorded_in: Path | None = None  # adapter targets: the file ``model``'s quantization was read from
    model_path: str | None = None  # a recorded hub id _recorded_base found within reach: not asked about again


def resolve_target(path: Path, base: str | None = None) -> Target:
    """A run directory (its adapter), an adapter directory, or a merged model directory. ``base`` (--base): the
    adapter's base, or a merged model's for --base-too, in place of the one recorded."""
    path = target_dir(Path(path))
    if base is not None and not base.strip():
        raise UsageError("--base: the value is empty; name the base model, or drop --base for the recorded one")
    recipe, recipe_file = _run_recipe(path)
    if is_model_dir(path):
        if problem := folder_problem(path, ("config.json", "generation_config.json")):
            raise CheckpointError(f"{problem}; the model is damaged: merge or copy it again")
        dtype = recipe.model.dtype if recipe else "auto"
        recorded, no_base = _merge_base(path)
        base_name = base or recorded
        base_section = ModelSection(name_or_path=base_name, dtype=dtype) if base_name else None
        return Target("merged", path, ModelSection(name_or_path=str(path), dtype=dtype), base_section, recipe, no_base)
    adapter = find_adapter_dir(path, "lorakit eval")
    record = read_record(adapter)
    if base is not None:
        check_recorded_base(record, base, "--base")  # another architecture: exit 4 before anything loads
        base_path = base
    else:
        base_path = _recorded_base(adapter, record)
    recorded_in = recipe_file
    if recipe is not None:
        model = recipe.model.model_copy(update={"name_or_path": base_path or recipe.model.name_or_path})
    elif base_path:
        model = ModelSection(name_or_path=base_path, quantization=record.get("quantization", "none"),
                             double_quant=record.get("double_quant", True), dtype=record.get("dtype", "auto"))
        recorded_in = adapter / RECORD_FILE
    else:
        config_base = read_config(adapter).get("base_model_name_or_path")
        if not config_base or not isinstance(config_base, str):
            raise CheckpointError(f"{config_file(adapter)}: records no base model (base_model_name_or_path is "
                                  f"{config_base!r}, and there is no lorakit.json); give the base it was trained on "
                                  "with --base, or set base_model_name_or_path there")
        model = ModelSection(name_or_path=config_base)
    require_weights(adapter, "lorakit eval")
    checked = base_path if base is None and base_path and not is_local(base_path) else None
    return Target("adapter", adapter, model, None, recipe, recorded_in=recorded_in, model_path=checked)


def _recorded_base(adapter: Path, record: dict) -> str | None:
    """The base lorakit.json records (adapters.files.recorded_base, as `lorakit merge` reads it); a hub id is
    checked within reach here, named as the adapter's record. Exit 2 when every recorded local path is gone."""
    name, recorded = recorded_base(record)
    if name is not None and not is_local(name):  # before the hub's minute of retries
        require_hub(f"{adapter}/{RECORD_FILE}: recorded base", name, record.get("revision"),
                    remedy="give --base a local model directory")
    if name is None and recorded:
        raise UsageError(f"{adapter}/{RECORD_FILE}: the base model it records ({' or '.join(dict.fromkeys(recorded))}) "
                         "is not on this machine; give it with --base PATH")
    return name


def _merge_base(path: Path) -> tuple[str | None, str]:
    """(the base lorakit_merge.json records, or None; why there is none)."""
    record_file = path / MERGE_RECORD
    if not record_file.is_file():
        return None, f"{record_file.name} missing"
    try:
        recorded = read_json_object(record_file).get("base")
    except NotJsonObject as e:
        return None, str(e)
    if not isinstance(recorded, str) or not recorded:
        return None, f"{record_file} records no base"
    if is_local(recorded) and not Path(recorded).expanduser().exists():
        return None, f"the base {record_file} records, {recorded}, is not on this machine"
    return recorded, ""


def _run_recipe(path: Path) -> tuple[Recipe | None, Path | None]:
    """The recipe.yaml of the run ``path`` is (or whose adapter/ or merged/ it is), if any, and its path."""
    for directory in (path, path.parent):
        if (directory / "recipe.yaml").is_file():
            file = directory / "recipe.yaml"
            return parse_recipe(read_yaml(file), str(file), recorded=True), file
    return None, None


def data_section(target: Target, data_file: Path, rows, keep_template: bool = False) -> DataSection:
    """How ``data_file``'s rows render: as training rendered them. With the run's recipe: the format, fields and
    chat template of the data.train source that is this file (a source's own chat_template included), else the
    data section's (rows of another format are refused, row by row, as training would). Without a recipe, the
    format is read off the first row's keys. The chat template is the one training saved with the artifact's
    tokenizer (``keep_template``: the recipe's, for an artifact saved without a tokenizer), unless the source
    has its own."""
    if target.recipe is not None:
        data = target.recipe.data
        update = {"train": str(data_file), "eval": None, "eval_split": None, "skip_bad_rows": False,
                  "chat_template": data.chat_template if keep_template else None}
        source = _source_of(data, data_file)
        if source is not None:
            update["format"] = source.format or data.format
            update["fields"] = data.fields if source.fields is None else source.fields
            if source.chat_template is not None:
                update["chat_template"] = source.chat_template
        return data.model_copy(update=update)
    keys_format = next((f for key, f in FORMAT_KEYS.items() if key in rows[0].data.keys()), None)
    if keys_format is None:
        raise DataError(f"{rows[0].where}: cannot tell the row format from its fields ({', '.join(rows[0].data)}); "
                        "expected messages, instruction/output, prompt/completion, text or chosen/rejected")
    return DataSection(train=str(data_file), format=keys_format, max_seq_len=1 << 20)


def _source_of(data: DataSection, data_file: Path):
    """The data.train source that is ``data_file`` (the same file, however the recipe spelled its path), if any."""
    for source in data.sources():
        try:
            if os.path.samefile(source.path, data_file):
                return source
        except OSError:  # a source that is no file here (a hub dataset id)
            continue
    return None


# ----------------------------------------------------------------------------------------------------------
# Running


def run_eval(target_path: Path, data_file: Path, *, metric: str = "exact", base_too: bool = False,
             batch_size: int = 8, max_new_tokens: int = 64, allow_pickle: bool = False,
             device: str | None = None, base: str | None = None, quantization: str | None = None,
             say=print) -> dict:
    """Score the target (and with ``base_too`` its base) on ``data_file``; returns what eval.json holds.
    ``quantization`` (--quantization): the precision to load the model in, in place of the recorded one."""
    if metric not in METRICS:
        raise UsageError(f"--metric {metric}: choose one of {', '.join(METRICS)}")
    device = resolve_device(device)
    target = resolve_target(target_path, base)
    if base is not None and target.kind == "merged" and not base_too:
        raise UsageError(f"--base {base}: {target.path} is a whole model; --base names the base for --base-too "
                         "(or an adapter's), so add --base-too or drop --base")
    if base_too and target.kind == "merged" and target.base is None:
        raise UsageError(f"--base-too: {target.path} records no base model ({target.no_base}); give it with --base "
                         "PATH, or drop --base-too")
    if Path(data_file).is_dir():
        raise DataError(f"--data {data_file}: a directory; give the file of rows (.jsonl, .json, .csv, .parquet)")
    if not Path(data_file).is_file():
        raise DataError(f"--data {data_file}: not found")
    try:
        rows = read_rows(str(data_file)).rows
    except BadRowError as e:  # its remedy names data.skip_bad_rows, a recipe key eval does not read
        raise DataError(f"{e.reason}; fix the row") from None
    if not rows:
        raise DataError(f"--data {data_file}: no rows")
    tokenizer, own = _tokenizer(target)
    section = data_section(target, data_file, rows, keep_template=not own)
    resolve_chat_template(section, tokenizer)
    items, skipped = eval_items(rows, section, tokenizer)
    if not items:
        raise DataError(f"--data {data_file}: no row left to evaluate ({skipped[0]})")
    check_answers(items, metric, f"--metric {metric}", "--metric exact")  # before any model loads
    started = time.time()
    _choose_precision(target, quantization, say)
    adapters = {"tuned": target.path} if target.kind == "adapter" else {}
    model, _ = load_for_generation(target.model, adapters, allow_pickle=allow_pickle, device=device,
                                   model_path=target.model_path, base_option="--base" if base else "the recorded base",
                                   adapter_label=lambda name, path: str(path))
    check_new_tokens(model, max_new_tokens)
    settings = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "metric": metric}
    if any(item.pair is not None for item in items):
        recipe_objective = target.recipe.train.objective if target.recipe else "sft"
        settings["objective"] = recipe_objective if recipe_objective in PREFERENCE_OBJECTIVES else "dpo"
    results = {"tuned": _score_model(model, tokenizer, items, **settings)}
    if base_too and target.kind == "adapter":
        results["base"] = _score_model(model, tokenizer, items, adapter_off=True, **settings)
    elif base_too:
        del model
        base, _ = load_for_generation(target.base, {}, allow_pickle=allow_pickle, device=device)
        results["base"] = _score_model(base, tokenizer, items, **settings)
    report = _report(target, data_file, section, items, skipped, results, settings, time.time() - started)
    for line in skipped:
        say(f"skipped {line}")
    return report


def _choose_precision(target: Target, quantization: str | None, say) -> None:
    """--quantization in place of the recorded precision; without it, one line when the recorded one is quantized."""
    if quantization is None:
        if target.kind == "adapter" and target.model.quantization != "none":
            say(precision_note(target.model.quantization, target.model.double_quant, target.recorded_in))
        return
    try:
        ModelSection(name_or_path=target.model.name_or_path, quantization=quantization)
    except ValueError as e:  # pydantic names the allowed values
        raise UsageError(f"--quantization: {e.errors()[0]['msg']}") from None
    target.model = target.model.model_copy(update={"quantization": quantization})
    if target.base is not None:
        target.base = target.base.model_copy(update={"quantization": quantization})


def _tokenizer(target: Target):
    """(tokenizer, whether it is the artifact's own): training saves the tokenizer, its pad token and chat
    template with the adapter (and merge copies it), so prompts render as in training; else the base's."""
    if (target.path / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(target.path), True
    return load_tokenizer(target.model, target.model_path or resolve_model_path(target.model)), False


def _score_model(model, tokenizer, items: list[EvalItem], *, metric: str, batch_size: int, max_new_tokens: int,
                 adapter_off: bool = False, objective: str | None = None) -> dict:
    """Outputs, scores and the answer loss of one model (``adapter_off``: its adapter switched off); with
    preference pairs (``objective``), how often it gives the chosen answer the higher log-prob."""
    accelerator = Accelerator(cpu=model.device.type == "cpu")
    with model.disable_adapter() if adapter_off else nullcontext():
        outputs, scores = score_items(model, tokenizer, items, metric, max_new_tokens=max_new_tokens,
                                      batch_size=batch_size, adapter_on=not adapter_off)
        # Training's loss: the head over answer tokens only, a chunk of logits at a time, so a batch of long rows
        # never holds [batch, length, vocab] logits (20 GB in fp32 at 8 × 4,096 tokens and a 152k vocabulary).
        loss_fn = build_loss(model, chunked=True)
        # train.evaluate reads only the micro-batch size of the train section.
        loss = evaluate(model, tokenizer, [i.example for i in items], SimpleNamespace(micro_batch_size=batch_size),
                        accelerator, loss_fn)["eval_loss"]
        preference = _preference(model, tokenizer, items, objective, batch_size) if objective else {}
    model.eval()  # evaluate() hands the model back in train mode
    return {"score": round(sum(scores) / len(scores), 6) if scores else None, "loss": loss,
            "perplexity": round(math.exp(min(loss, 50)), 4), **preference, "outputs": outputs, "scores": scores,
            "loss_path": loss_fn.describe().removeprefix("loss: ")}


def _preference(model, tokenizer, items: list[EvalItem], objective: str, batch_size: int) -> dict:
    """The fraction of pairs whose chosen answer the model gives the higher log-prob, and the mean margin, in the
    log-probs ``objective`` compares (summed over the answer's tokens, or their per-token mean)."""
    pairs = [item.pair for item in items if item.pair is not None]
    loss = PreferenceLoss(model, TrainSection(objective=objective, max_steps=1))
    logps = compute_reference(loss, pairs, tokenizer, batch_size, adapter_on=True)  # the model as it is
    if NORMALISED[objective]:
        logps = [(c / num_targets(p.labels), r / num_targets(p.rejected.labels)) for (c, r), p in zip(logps, pairs)]
    return {"preference_accuracy": round(sum(c > r for c, r in logps) / len(logps), 6),
            "preference_margin": round(sum(c - r for c, r in logps) / len(logps), 6)}


def _report(target: Target, data_file: Path, section: DataSection, items, skipped, results, settings,
            seconds: float) -> dict:
    scored = [item for item in items if item.answer is not None]
    per_row = []
    for k, item in enumerate(scored):
        row = {"where": item.where, "answer": item.answer}
        for name, result in results.items():
            row[name] = {"output": result["outputs"][k], "score": result["scores"][k]}
        per_row.append(row)
    totals = {name: {key: r[key] for key in TOTALS if key in r} for name, r in results.items()}
    return {
        "target": str(target.path), "kind": target.kind, "data": str(data_file), "format": section.format,
        "settings": {**settings, "greedy": True, "quantization": target.model.quantization,
                     "loss": "token-weighted mean over answer tokens",
                     "loss_path": {name: r["loss_path"] for name, r in results.items()}},
        "rows": len(items) + len(skipped), "scored_rows": len(scored), "loss_rows": len(items),
        "skipped": skipped, "totals": totals, "per_row": per_row, "seconds": round(seconds, 2),
    }


# ----------------------------------------------------------------------------------------------------------
# Output


def check_report_output(path: Path, data_file: Path) -> Path:
    """Where eval.json goes (symlinks resolved), checked before any model loads: exit 2 where no file can be
    written (a directory, a path under a file, a read-only folder), exit 5 for the --data file itself and for an
    existing file that is not an earlier report (a model's config.json, an adapter's adapter_config.json, a
    recipe: moving it aside to put the report in its place would break what it belongs to)."""
    out = check_file_output("eval -o", path, "eval.json")
    check_inputs_apart("eval -o", out, {"--data rows": data_file if Path(data_file).is_file() else None})
    if out.exists() and not _is_report(out):
        raise SafetyError(f"eval -o {path}: the file exists and is not an eval report lorakit wrote; choose another "
                          "file (an earlier report is moved aside, anything else is left alone)")
    return out


def _is_report(path: Path) -> bool:
    """Whether ``path`` begins as write_report writes an eval.json (the head only: a report can be large)."""
    try:
        with path.open("rb") as f:
            head = f.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return False
    return head.startswith('{\n  "target": ') and '\n  "kind": ' in head


def write_report(report: dict, path: Path) -> Path | None:
    """eval.json (``path`` from check_report_output); an earlier one is moved aside to eval.json.replaced-TIMESTAMP,
    never overwritten. Returns where the earlier one went (or None)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = set_aside(path) if path.exists() else None
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return aside


def default_output(target_path: Path) -> Path:
    """RUN/eval.json for a run directory (or its adapter/merged folder); RUN/eval-step-NNNNNN.json for one of its
    checkpoints (not inside it: checkpoint rotation deletes whole folders); ./eval.json for anything else."""
    target_path = Path(target_path)
    for directory in (target_path, target_path.parent):
        if directory.parent.name == "checkpoints" and (directory.parent.parent / "recipe.yaml").is_file():
            return directory.parent.parent / f"eval-{directory.name}.json"
        if (directory / "recipe.yaml").is_file():
            return directory / "eval.json"
    return Path("eval.json")


def format_summary(report: dict) -> str:
    """The side-by-side table (base | tuned) and, with a base, a few rows where the two differ."""
    names = [n for n in ("base", "tuned") if n in report["totals"]]
    metric = report["settings"]["metric"]
    lines = [f"{report['scored_rows']} scored rows of {report['data']} ({metric}); loss over {report['loss_rows']}"]
    lines.append(f"{'':<12}" + "".join(f"{n:>12}" for n in names))
    for key in TOTALS:
        if key not in report["totals"][names[0]]:
            continue
        values = [report["totals"][n][key] for n in names]
        label = {"preference_accuracy": "pref acc", "preference_margin": "pref margin"}.get(key, key)
        lines.append(f"{label:<12}" + "".join(f"{'-' if v is None else format(v, '.4g'):>12}" for v in values))
    if "objective" in report["settings"]:
        lines.append(f"pref acc: the pairs whose chosen answer has the higher log-prob "
                     f"({'per-token mean' if NORMALISED[report['settings']['objective']] else 'summed'}, as "
                     f"{report['settings']['objective']} compares them); pref margin: chosen − rejected, averaged")
    if len(names) == 2:
        differ = [r for r in report["per_row"] if r["base"]["score"] != r["tuned"]["score"]]
        for row in differ[:EXAMPLES_SHOWN]:
            lines.append(f"\n{row['where']}  answer: {_short(row['answer'])}")
            for n in names:
                lines.append(f"  {n:>5} ({row[n]['score']:.2g}): {_short(row[n]['output'])}")
    return "\n".join(lines)


def _short(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
