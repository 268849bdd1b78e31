"""Rules a recipe must meet to start work, which a recorded run's recipe need not: keys with no effect in context.

train, validate, inspect, estimate-memory, preview-data and init refuse them (parse_recipe, exit 2). A run
directory's recipe.yaml, and a checkpoint's, are records of what ran, possibly written by an older lorakit with
such a key (with every default spelled out): `lorakit eval RUN` and resume read them with
parse_recipe(..., recorded=True), which skips these rules. The resolved recipe a run writes (load.dump_recipe)
leaves out the keys that have no effect in it, so it can be trained again as it is.

Only the recipe decides here, never the machine: keys that matter on several GPUs alone (train.ddp_timeout,
the accelerate config's FSDP options) or with a GPU alone (train.liger, train.compile) stay accepted everywhere,
since one recipe runs on a laptop and on a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lorakit.config.schema import FORMAT_FIELDS, TrainSection
from lorakit.paths import is_hub_dataset, is_local


@dataclass(frozen=True)
class ContextKey:
    """A recipe key that takes effect only where ``applies(recipe)``; set by the user anywhere else it is refused
    with ``why`` (after 'KEY: '), and the resolved recipe leaves it out. Its default must be harmless there."""

    key: str
    applies: Callable
    why: str
    # Let its default through where given: every recipe `lorakit init` wrote before the key became one of these
    # spells it out (data.split: train).
    default_passes: bool = False


def _writes_checkpoints(recipe) -> bool:
    return recipe.train.save_every > 0 or recipe.train.save_each_epoch


def _has_prompts(recipe) -> bool:
    """Some rows have a prompt to supervise or mask (a text row is learned whole)."""
    data = recipe.data
    return data.format != "text" or any((source.format or data.format) != "text" for source in data.sources())


def _reads_a_hub_dataset(recipe) -> bool:
    data = recipe.data
    return any(is_hub_dataset(path) for path in [*data.train_paths(), *([data.eval] if data.eval else [])])


def _names_a_project(recipe) -> bool:
    # accelerate files every tracker but tensorboard (built here with its own folder, DIR/tensorboard) under it.
    return any(name != "tensorboard" for name in recipe.output.report_to)


CONTEXT_KEYS = (
    ContextKey("model.double_quant", lambda r: r.model.quantization in ("nf4", "fp4"),
               "only applies to a 4-bit base (model.quantization nf4/fp4); remove it"),
    ContextKey("model.upcast_unquantized", lambda r: r.model.quantization != "none",
               "only for a quantized base (model.quantization nf4, fp4 or int8); remove it"),
    ContextKey("data.padding_free", lambda r: not r.data.packing,
               "packed rows (data.packing: true) are always flattened without padding; remove it"),
    ContextKey("data.train_on_inputs", _has_prompts,
               "text rows have no prompt, every token is learned already; remove it"),
    ContextKey("data.split", _reads_a_hub_dataset,
               "chooses the split of a hub dataset id, and data.train and data.eval name none (a local file is read "
               "whole, a save_to_disk folder gives its train split); remove it", default_passes=True),
    ContextKey("data.subset", _reads_a_hub_dataset,
               "chooses the subset of a hub dataset id, and data.train and data.eval name none; remove it",
               default_passes=True),
    ContextKey("train.eval_metric", lambda r: r.train.eval_generate > 0,
               "has no effect without train.eval_generate: N; set train.eval_generate or remove it"),
    ContextKey("train.chunked_loss", lambda r: r.adapter.method not in ("prefix", "prompt"),
               "prompt and prefix tuning add virtual tokens inside the forward, so the model's own loss runs (the "
               "head cannot run apart); remove it"),
    ContextKey("train.keep_last", _writes_checkpoints,
               "the run writes no checkpoints to keep (train.save_every: 0, train.save_each_epoch: false); set "
               "train.save_every or remove it"),
    ContextKey("output.project", _names_a_project,
               "names the project of the experiment trackers in output.report_to, and there is none (tensorboard "
               "writes to DIR/tensorboard); add one or remove it"),
)


def _given(recipe, key: str, default_passes: bool = False) -> bool:
    section, leaf = key.split(".")
    part = getattr(recipe, section)
    given = leaf in part.model_fields_set
    return given and not (default_passes and getattr(part, leaf) == type(part).model_fields[leaf].default)


def inapplicable(recipe) -> list[ContextKey]:
    """The CONTEXT_KEYS that have no effect in ``recipe``, given or not."""
    return [c for c in CONTEXT_KEYS if not c.applies(recipe)]


def start_problems(recipe) -> list[str]:
    """Why ``recipe`` may not start work: each key the user set where it has no effect, one line with the fix."""
    problems = [f"{c.key}: {c.why}" for c in inapplicable(recipe) if _given(recipe, c.key, c.default_passes)]
    model = recipe.model
    # A revision picks a commit of a hub repository; transformers ignores it for a local directory.
    if model.revision is not None and is_local(model.name_or_path) and (
            model.tokenizer is None or is_local(model.tokenizer)):
        problems.append(f"model.revision: {model.revision!r} has no effect: model.name_or_path "
                        f"{model.name_or_path!r} is a local path, not a hub id; remove it")
    return problems + _unread_fields(recipe.data)


def _unread_fields(data) -> list[str]:
    """data.fields keys (and a data.train source's) that name no field of the formats they map: a key the
    rows never read, as when the mapping is written the wrong way round ({question: instruction})."""
    sources = data.sources()
    keyed = [("data.fields", data.fields, {data.format, *(s.format or data.format for s in sources)})]
    keyed += [(f"data.train[{i}].fields", s.fields, {s.format or data.format}) for i, s in enumerate(sources)
              if s.fields]
    problems = []
    for key, fields, formats in keyed:
        read = {name for fmt in formats for name in FORMAT_FIELDS[fmt]}
        for name in sorted(set(fields) - read):
            each = "; ".join(f"{fmt}: {', '.join(FORMAT_FIELDS[fmt])}" for fmt in sorted(formats))
            field = fields[name] if fields[name] in read else FORMAT_FIELDS[min(formats)][0]  # swapped round?
            problems.append(f"{key}: {name!r} is not a field of the format ({each}); keys are the format's "
                            f"field names, values your column names, e.g. {{{field}: {name}}}")
    return problems


# AdamW moves every trainable weight by about the learning rate each step, whatever the gradient's scale. Adapter
# runs use 1e-5 to 1e-2 (2e-4 by default, the QLoRA paper's 1e-4 to 2e-4; PEFT's prompt-tuning example 3e-2;
# TRL's DPO default 1e-6): a rate ten times beyond either end is a slip (a lost minus sign, 2e4 for 2e-4), not a
# choice. Warned, not refused: nothing proves such a run diverges (a random tiny model stays finite at 1e6).
USUAL_LEARNING_RATES = (1e-5, 1e-2)
FAR_ABOVE, FAR_BELOW = 1e-1, 1e-7
# Prompt and prefix tuning train a few virtual-token vectors, at rates far above: PEFT's own examples (AdamW) use 1
# (examples/conditional_generation/peft_prompt_tuning_seq2seq, T5-large), 3e-2 (causal_language_modeling/
# peft_prompt_tuning_clm and peft_prefix_tuning_clm) and 1e-2 (conditional_generation/peft_prefix_tuning_seq2seq,
# sequence_classification/prefix_tuning); Lester et al. 2021 prompt-tune at 0.3 (Adafactor). The warning moves with
# the top of the range (ten times it). IA3 and bottleneck adapters stay within the adapter range: PEFT's IA3
# examples 8e-3 (peft_ia3_seq2seq) and 1e-3 (sequence_classification/IA3), T-Few's (IA)³ 3e-3 (Liu et al. 2022),
# Houlsby et al. 2019's adapters 1e-4 to 1e-3.
METHOD_LEARNING_RATES = {"prompt": (1e-5, 1.0), "prefix": (1e-5, 3e-2)}
METHOD_NAMES = {"prompt": "prompt tuning", "prefix": "prefix tuning"}


def start_warnings(recipe) -> list[str]:
    """What ``recipe`` may start with but most likely does not mean: a learning rate far outside any usual range
    (LoRA+'s B rate too, train.learning_rate × adapter.loraplus_lr_ratio). One line each, with the fix."""
    lr, ratio = recipe.train.learning_rate, recipe.adapter.loraplus_lr_ratio
    method = recipe.adapter.method
    usual_rates = METHOD_LEARNING_RATES.get(method, USUAL_LEARNING_RATES)
    far_above = FAR_ABOVE * usual_rates[1] / USUAL_LEARNING_RATES[1]
    low, high = map(_rate, usual_rates)
    default = _rate(TrainSection.model_fields["learning_rate"].default)
    usual = f"the usual range for AdamW on {METHOD_NAMES.get(method, 'an adapter')} ({low} to {high}"
    why = ("AdamW moves every adapter weight by about the learning rate each step, so the run is likely to diverge "
           "(exit 6) or leave a broken adapter")
    warnings = []
    if lr > far_above:
        warnings.append(f"train.learning_rate: {_rate(lr)} is far above {usual}, {default} by default): {why}; lower "
                        f"it (--set train.learning_rate={default})")
    elif ratio is not None and lr * ratio > far_above:
        warnings.append(f"adapter.loraplus_lr_ratio: {ratio:g} × train.learning_rate {_rate(lr)} gives LoRA+'s B "
                        f"matrices {_rate(lr * ratio)}, far above {usual}): {why}; lower either")
    if lr < FAR_BELOW:
        warnings.append(f"train.learning_rate: {_rate(lr)} is far below {usual}, preference objectives down to "
                        f"1e-6): the adapter will barely move from where it starts; raise it (--set "
                        f"train.learning_rate={default})")
    return warnings + _eval_is_train(recipe.data)


def _eval_is_train(data) -> list[str]:
    """data.eval naming one of data.train's files: its loss would measure memorisation, not generalisation."""
    import os

    if not data.eval:
        return []
    for i, source in enumerate(data.train_paths()):
        try:
            same = os.path.samefile(os.path.expanduser(data.eval), os.path.expanduser(source))
        except OSError:  # not a local file (a hub id), or missing: the data checks name that
            continue
        if same:
            at = "data.train" if isinstance(data.train, str) else f"data.train[{i}]"
            return [f"data.eval: {data.eval} is {at}'s file: eval loss would measure how well the model recalls rows "
                    "it trains on, not how it does on new ones; give held-out rows, or data.eval_split: 0.1 in place of "
                    "data.eval"]
    return []


def _rate(value: float) -> str:
    """A learning rate as people write it: 2e-4, 0.01, 100."""
    if value and (abs(value) < 1e-3 or abs(value) >= 1e4):
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    return f"{value:g}"
