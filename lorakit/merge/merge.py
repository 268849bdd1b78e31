"""`lorakit merge`: fold an adapter into its base model, one tensor at a time, and check the result.

Each base tensor is read on its own from the base's weight files, updated with the adapter's delta (LoRA,
rsLoRA, DoRA, IA3; for QLoRA adapters optionally on the NF4 round-tripped weight the adapter was trained
against) and streamed straight into the output safetensors shard, so host memory stays near one input shard
plus the adapter whatever the model size. Everything lands in a temporary directory next to OUT that is
renamed into place only when complete (and, with verification, checked against PEFT's adapter model).
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lorakit.adapters.card import write_card
from lorakit.adapters.files import (Adapter, check_recorded_base, find_adapter_dir, read_adapter, read_config,
                                   resolve_base, serving_remedy)
from lorakit.adapters.inits import RESIDUAL_ADAPTER
from lorakit.atomic import fsync_files
from lorakit.config.methods import UNSUPPORTED_LORA_OPTIONS, saved_method
from lorakit.data.stop_tokens import GENERATION_CONFIG, write_generation_config
from lorakit.errors import CheckpointError, UsageError
from lorakit.merge.plan import MergePlan, OutTensor, meta_model, plan_merge
from lorakit.merge.plan import round_trip_weight
from lorakit.merge.verify import check_verification, verify_merge
from lorakit.merge.weights_io import (
    SafetensorsStreamWriter, StoredTensor, TensorReader, list_tensors, nbytes, shard_names, write_index,
)
from lorakit.models.loading import check_weights_safe, resolve_device
from lorakit.publish import (
    check_inputs_apart, check_replaceable, check_writable, publish_output, read_marker, resolve_output,
)
from lorakit.runlock import OutputLock

OUTPUT_DTYPES = ("bfloat16", "float16", "float32")
BASE_PRECISIONS = ("original", "dequantized")
VERIFY_MAX_PARAMS = 2_000_000_000  # --verify is on by default below this size (it loads the model twice)
PROVENANCE_FILE = "lorakit_merge.json"



@dataclass
class MergeReport:
    output_dir: str
    base: str
    method: str
    base_precision: str
    dtype: str
    merged_modules: int
    files: list[str] = field(default_factory=list)
    untied_embeddings: bool = False
    peak_rss_bytes: int = 0  # process peak when the last shard was written (before verification)
    max_abs_diff: float | None = None
    kl: float | None = None


# ----------------------------------------------------------------------------------------------------------
# The adapter


def read_mergeable_adapter(adapter_dir: str | Path, allow_pickle: bool = False) -> Adapter:
    """The adapter at ``adapter_dir``, refused (exit 2, with the alternative) when it has no weight delta to merge."""
    path = find_adapter_dir(adapter_dir, "merge")
    config = read_config(path)
    peft_type = config.get("peft_type")
    method = saved_method(peft_type)
    if method is not None and not method.mergeable:
        raise UsageError(_not_mergeable(path, method.not_mergeable))
    if method is None and _prompt_learning(peft_type):
        raise UsageError(_not_mergeable(path, f"a {peft_type} adapter learns virtual tokens (or key/value prefixes) "
                                              "fed to the model, not weights"))
    if method is None:
        raise UsageError(f"{path}: peft_type {peft_type} is not mergeable by lorakit (it merges LoRA, DoRA, rsLoRA "
                         f"and IA3); serve it with `lorakit generate --adapter {path}` or use PEFT's merge_and_unload")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(("pissa", "olora", "corda", "lora_ga")):
        raise UsageError(f"{path}: an unconverted {init} adapter (a checkpoint's {RESIDUAL_ADAPTER}/, one written "
                         "before checkpoints carried the converted adapter, or saved without PEFT's "
                         "path_initial_model_for_weight_conversion): its B·A belongs on a residual base only PEFT "
                         "rebuilds at load, not on the base weights; merge the run's DIR/adapter or a checkpoint "
                         "(CHECKPOINT/adapter), which lorakit saves converted")
    options = [k for k in UNSUPPORTED_LORA_OPTIONS if config.get(k)]
    if options:
        raise UsageError(f"{path}/adapter_config.json: {', '.join(options)} is set; that LoRA variant is not a "
                         "plain weight update, so lorakit cannot merge it; serve it with "
                         f"`lorakit generate --adapter {path}`")
    return read_adapter(path, allow_pickle)


def _prompt_learning(peft_type) -> bool:
    """Whether PEFT files ``peft_type`` under prompt learning (P-tuning, prefix and prompt tuning, CPT, ...)."""
    from peft.config import PromptLearningConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    config_class = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) if isinstance(peft_type, str) else None
    return config_class is not None and issubclass(config_class, PromptLearningConfig)


def _not_mergeable(path: Path, why: str) -> str:
    return f"{path}: {why}, so there is no weight update to merge into the base; {serving_remedy(path)}"


# ----------------------------------------------------------------------------------------------------------
# The base model


def list_base_tensors(base_dir: Path, allow_pickle: bool) -> list[StoredTensor]:
    check_weights_safe(str(base_dir), allow_pickle)
    tensors = list_tensors(base_dir)
    if not tensors:
        raise UsageError(f"--base {base_dir}: no *.safetensors weight files found")
    return tensors


# ----------------------------------------------------------------------------------------------------------
# What the adapter does to each base module


# ----------------------------------------------------------------------------------------------------------
# The plan: every output tensor, where it comes from, and what happens to it


# ----------------------------------------------------------------------------------------------------------
# Computing and writing


def merged_tensor(t: OutTensor, reader: TensorReader, record: dict, device: str) -> torch.Tensor:
    tensor = t.replacement.clone() if t.replacement is not None else reader.get(t.source)
    changed = t.replacement is not None
    if t.round_trip:
        tensor, changed = round_trip_weight(tensor, record), True
    if t.update is not None:
        weight = t.name.endswith(".weight")
        tensor = t.update.apply_weight(tensor, device) if weight else t.update.apply_bias(tensor, device)
        changed = True
    result = tensor.to("cpu", t.dtype) if tensor.is_floating_point() else tensor
    # A float32 sum is inf or NaN when any element is (or the weight is absurdly large): one cheap pass.
    if (changed or result.dtype != t.source.dtype) and result.is_floating_point() and not torch.isfinite(
            result.sum(dtype=torch.float32)):
        hint = f"; {t.dtype} cannot hold it, try --dtype bfloat16" if t.dtype == torch.float16 else ""
        raise CheckpointError(f"merged weight {t.name} is not finite (NaN or inf){hint}; nothing was written")
    return result


def write_shards(plan: MergePlan, out_dir: Path, record: dict, device: str, log: Callable[[str], None]) -> list[str]:
    names = shard_names(len(plan.shards))
    with TensorReader() as reader:
        for name, shard in zip(names, plan.shards):
            with SafetensorsStreamWriter(out_dir / name, [(t.name, t.dtype, t.shape) for t in shard]) as writer:
                for t in shard:
                    writer.write(t.name, merged_tensor(t, reader, record, device))
            log(f"wrote {name}")
    if len(names) > 1:
        weight_map = {t.name: name for name, shard in zip(names, plan.shards) for t in shard}
        write_index(out_dir, weight_map, sum(t.nbytes for t in plan.tensors), sum(t.source.numel for t in plan.tensors))
    return names


def write_metadata(adapter: Adapter, base_dir: Path, config, plan: MergePlan, dtype, out_dir: Path) -> None:
    """config.json (dtype, untied embeddings), generation config and tokenizer next to the weights."""
    from transformers import AutoTokenizer

    if dtype is not None:
        config.dtype = dtype
    if plan.vocab_size:
        config.get_text_config().vocab_size = plan.vocab_size
    if plan.untie:
        config.tie_word_embeddings = False
        text = config.get_text_config()
        if text is not config:
            text.tie_word_embeddings = False
    config.save_pretrained(out_dir)
    # The run saves its tokenizer (pad token, chat template) with the adapter; it wins over the base's.
    source = adapter.path if (adapter.path / "tokenizer_config.json").is_file() else base_dir
    if (source / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(source)
        tokenizer.save_pretrained(out_dir)
        # The base's sampling defaults, stopping on the template's end-of-turn tokens too (the adapter's own
        # generation_config.json, written by the run, already lists them).
        generation = adapter.path if (adapter.path / GENERATION_CONFIG).is_file() else base_dir
        write_generation_config(out_dir, tokenizer, generation)
    elif (base_dir / GENERATION_CONFIG).is_file():
        shutil.copy2(base_dir / GENERATION_CONFIG, out_dir / GENERATION_CONFIG)


# ----------------------------------------------------------------------------------------------------------
# Verification: the merged model against PEFT's adapter model on the same base weights


# ----------------------------------------------------------------------------------------------------------
# The output directory: written under a temporary name next to OUT, published whole (lorakit.publish)


def _temporary_output(out: Path) -> Path:
    """The temporary directory next to OUT to write into. Called under OUT's lock: any other temporary of OUT
    was left by a killed merge."""
    for stale in out.parent.glob(f".{out.name}.lorakit-tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.lorakit-tmp-{os.getpid()}"
    tmp.mkdir()
    return tmp


def _merge_inputs(adapter: Adapter, base_dir: Path, inside_run: bool) -> dict[str, Path | None]:
    """What OUT must keep apart from: the adapter, the base and, unless training writes RUN/merged itself,
    the run directory the adapter belongs to."""
    run = adapter.path.parent
    is_run = read_marker(run) is not None or (run / "recipe.yaml").is_file() or (run / "checkpoints").is_dir()
    return {"adapter": adapter.path, "base model": base_dir, "run": run if is_run and not inside_run else None}


# ----------------------------------------------------------------------------------------------------------
# Entry point


_SIZE = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+)\s*(?:([kmgt])(i?)b?)?\s*$", re.IGNORECASE)


def shard_bytes(size: str | int) -> int:
    """--max-shard-size in bytes: 5GB = 5·10⁹, 5GiB = 5·2³⁰ (transformers' units), in any case, a bare number in
    bytes. transformers itself reads "5gb" or "5Gb" as gigabits (shards of 625 MB): a size here is always bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.match(str(size))
        if not match:
            raise UsageError(f"--max-shard-size {size!r}: expected a size such as 5GB or 500MB")
        number, unit, binary = match.groups()
        power = "kmgt".index(unit.lower()) + 1 if unit else 0
        value = int(float(number) * (1024 if binary else 1000) ** power)
    if value <= 0:
        raise UsageError(f"--max-shard-size {size}: must be more than 0, such as 5GB or 500MB")
    return value


def merge_adapter(
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    base: str | None = None,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    base_precision: str | None = None,
    verify: bool | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
    inside_run: bool = False,
) -> MergeReport:
    """Merge the adapter in ``adapter_dir`` into its base and write a plain Hugging Face model to ``output_dir``.

    ``dtype``: output dtype (default: the base's own). ``base_precision``: for QLoRA adapters, merge into the
    ``original`` weights or the ``dequantized`` NF4 round-trip the adapter saw (default: dequantized when the
    adapter's lorakit.json records a quantized base). ``verify``: compare logits with the adapter model
    (default: on below VERIFY_MAX_PARAMS parameters). ``log``: progress lines (default: lorakit's console).
    ``inside_run``: training writes RUN/merged, so the adapter's run directory is the output's home, not an input.
    OUT is checked (lorakit.publish) and locked (lorakit.runlock) before the base is read.
    """

    from lorakit.console import console

    log = log or console(True)
    device = resolve_device(device, "cpu")
    out_dtype = _parse_choice("--dtype", dtype, OUTPUT_DTYPES)
    out_dtype = getattr(torch, out_dtype) if out_dtype else None
    max_bytes = shard_bytes(max_shard_size)
    out = resolve_output("--output", output_dir)
    adapter = read_mergeable_adapter(adapter_dir, allow_pickle)
    base_dir = resolve_base(adapter, base)
    check_inputs_apart("--output", out, _merge_inputs(adapter, base_dir, inside_run))
    check_writable("--output", out)
    with OutputLock(out, log, "--output"):
        check_replaceable("--output", out, overwrite, "merged model")
        return _merge_locked(adapter, base_dir, out, out_dtype, max_bytes, base_precision, verify, device, log,
                             allow_pickle)


def _merge_locked(adapter, base_dir, out, out_dtype, max_bytes, base_precision, verify, device, log,
                  allow_pickle) -> MergeReport:
    check_recorded_base(adapter.record, base_dir, "--base")
    precision, why = _choose_base_precision(adapter, base_precision)
    base_tensors = list_base_tensors(base_dir, allow_pickle)
    config, model = meta_model(base_dir)
    if getattr(config, "quantization_config", None):
        raise UsageError(f"--base {base_dir}: a pre-quantized checkpoint; merge needs the full-precision base weights")
    plan = plan_merge(adapter, base_tensors, model, out_dtype, precision == "dequantized", max_bytes)
    n_params = sum(t.source.numel for t in plan.tensors)
    verify = n_params < VERIFY_MAX_PARAMS if verify is None else verify
    log(f"merging {adapter.method} adapter {adapter.path} into {base_dir} "
        f"({plan.merged_modules} modules, {n_params / 1e6:,.1f}M parameters)")
    log(f"base precision: {precision}: {why}")
    if plan.untie:
        log("the adapter changes tied input/output embeddings: writing them untied (tie_word_embeddings: false)")

    tmp = _temporary_output(out)
    try:
        files = write_shards(plan, tmp, adapter.record, device, log)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        write_metadata(adapter, base_dir, config, plan, out_dtype, tmp)
        report = MergeReport(
            output_dir=str(out), base=str(base_dir), method=adapter.method, base_precision=precision,
            dtype=str(out_dtype or "as base").removeprefix("torch."), merged_modules=plan.merged_modules,
            files=files, untied_embeddings=plan.untie, peak_rss_bytes=peak,
        )
        if verify:
            report.max_abs_diff, report.kl = verify_merge(adapter, base_dir, tmp, plan, device)
            log(check_verification(report.max_abs_diff, report.kl, out_dtype or _main_dtype(base_tensors)))
        _write_provenance(report, adapter, tmp)
        write_card(tmp, adapter.path, merged=True, merge_record=json.loads((tmp / PROVENANCE_FILE).read_text()))
        fsync_files(tmp)
        if (aside := publish_output(tmp, out, "merged model")) is not None:
            log(f"--overwrite: the earlier {out} was moved to {aside}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _parse_choice(option: str, value: str | None, choices: tuple[str, ...]) -> str | None:
    if value is not None and value not in choices:
        raise UsageError(f"{option} {value!r}: must be one of {', '.join(choices)}")
    return value


def _choose_base_precision(adapter: Adapter, choice: str | None) -> tuple[str, str]:
    """original or dequantized, and why: the default keeps the merged model closest to what was trained."""
    choice = _parse_choice("--base-precision", choice, BASE_PRECISIONS)
    quant = adapter.record.get("quantization", "none") if adapter.record else "not recorded"
    if choice == "dequantized" and quant not in ("nf4", "fp4", "int8"):
        raise UsageError(f"--base-precision dequantized: {adapter.path} was not trained on a quantized base "
                         f"(lorakit.json quantization: {quant}); use original")
    if choice is not None:
        return choice, "--base-precision"
    if quant in ("nf4", "fp4", "int8"):
        return "dequantized", f"the adapter was trained on a {quant} base (--base-precision original to change)"
    return "original", f"the adapter was trained on an unquantized base (lorakit.json quantization: {quant})"


def _main_dtype(base_tensors: list[StoredTensor]) -> torch.dtype:
    floats = [t.dtype for t in base_tensors if t.dtype.is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


def _write_provenance(report: MergeReport, adapter: Adapter, out_dir: Path) -> None:
    from dataclasses import asdict

    from lorakit import __version__

    data = {"adapter": str(adapter.path.resolve()), "adapter_record": adapter.record, "lorakit_version": __version__,
            **{k: v for k, v in asdict(report).items() if k != "output_dir"}}
    (out_dir / PROVENANCE_FILE).write_text(json.dumps(data, indent=2) + "\n")
