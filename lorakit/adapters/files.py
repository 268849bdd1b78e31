"""Adapter directories on disk: finding one, reading its config, record and tensors, and its recorded base.

An adapter directory is PEFT's (adapter_config.json + adapter_model.safetensors) plus, when lorakit trained
it, lorakit.json (base model, quantization, dtype, method). Shared by `lorakit merge` and `lorakit generate`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.adapters.bottleneck import CONFIG_NAME as BOTTLENECK_CONFIG, is_bottleneck_dir
from lorakit.atomic import write_file
from lorakit.config.load import parse_recipe, read_yaml
from lorakit.config.methods import REGISTRY
from lorakit.config.schema import ModelSection
from lorakit.console import warner
from lorakit.errors import CheckpointError, SafetyError, UsageError
from lorakit.models.checks import folder_problem, weights_fingerprint
from lorakit.models.loading import model_dir_on_disk, resolve_model_path
from lorakit.paths import is_local, require_hub
from lorakit.text import NotJsonObject, read_json_object

PEFT_PREFIX = "base_model.model."
RECORD_FILE = "lorakit.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's, the pickle one read only when allowed


def stable_config(adapter_dir: Path) -> None:
    """Write PEFT's set-valued config fields (target_modules, exclude_modules, IA³'s feedforward_modules) sorted. PEFT saves a set in the
    iteration order of the process's string hashes, so two identical runs would write different bytes."""
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text())
    fields = [k for k in ("target_modules", "exclude_modules", "feedforward_modules") if isinstance(config.get(k), list)]
    if not fields:
        return
    for key in fields:
        config[key] = sorted(config[key])
    write_file(path, json.dumps(config, indent=2, sort_keys=True))


def find_adapter_dir(path: str | Path, what: str) -> Path:
    """The adapter directory at ``path``, or RUN/adapter when a run directory is given."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{what}: adapter directory {str(path)!r} not found")
    if not is_adapter_dir(path) and is_adapter_dir(path / "adapter"):
        path = path / "adapter"
    if not is_adapter_dir(path):
        raise CheckpointError(f"{what}: {path} has no adapter_config.json; {_not_an_adapter(path)}")
    if problem := folder_problem(path, ("adapter_config.json", RECORD_FILE)):
        raise CheckpointError(f"{what}: {problem}; the adapter is damaged: copy or train it again")
    if not isinstance(read_config(path).get("peft_type"), str):  # every PEFT config names its type
        raise CheckpointError(f"{what}: {path}/adapter_config.json has no peft_type, so it is no PEFT adapter config; "
                              "the adapter is damaged: copy or train it again")
    return path


def require_weights(path: Path, what: str) -> None:
    """Exit 4 when the adapter at ``path`` (found by find_adapter_dir) has no weights file: PEFT's load would
    report a hub lookup of the folder's name, and the vLLM check would find no module to object to. (merge and
    export read the tensors, which says the same; a bottleneck adapter's loader names its own file.)"""
    if not is_bottleneck_dir(path) and not any((path / name).is_file() for name in WEIGHT_FILES):
        raise CheckpointError(f"{what}: {path}: no {WEIGHT_FILES[0]}; is the adapter directory complete?")


def _not_an_adapter(path: Path) -> str:
    """What to give instead of ``path``: a run that has not written its adapter yet has checkpoints that hold one."""
    folders = (path / "checkpoints").glob("step-*") if (path / "checkpoints").is_dir() else ()
    # (RUN/checkpoints/step-NNNNNN, named by lorakit.checkpoint, a layer above this one)
    saved = sorted((ckpt for ckpt in folders if ckpt.name[5:].isdigit() and is_adapter_dir(ckpt / "adapter")),
                   key=lambda ckpt: int(ckpt.name[5:]))
    if saved:
        return (f"it is a run that has not written {path / 'adapter'} (not finished, or interrupted); give its "
                f"newest checkpoint, {saved[-1]}, or finish the run (lorakit train RECIPE --resume)")
    if (path / "config.json").is_file():
        return "it is a whole model, not an adapter; give an adapter directory (RUN/adapter)"
    if (merged := merged_only_run(path)) is not None:
        return (f"the run saved its merged model only ({merged}, output.save: merged), which loads without an "
                "adapter: use it as a model (lorakit generate, eval and export take it)")
    return "give an adapter directory (RUN/adapter)"


def target_dir(path: Path) -> Path:
    """The directory `lorakit eval` and `generate` take as TARGET (exit 4 when there is none): a run, an adapter or
    a model; a run that saved only its merged model (output.save: merged) is that model, RUN/merged."""
    if not path.is_dir():
        what = "a file" if path.exists() else "not found"
        raise CheckpointError(f"{path}: {what}; give a run directory, an adapter directory or a merged model")
    return merged_only_run(path) or path


def is_model_dir(path: Path) -> bool:
    """Whether ``path`` holds a whole model (a merged one, or any): config.json and no adapter_config.json."""
    return (path / "config.json").is_file() and not (path / "adapter_config.json").is_file()


def merged_only_run(path: str | Path) -> Path | None:
    """RUN/merged of a run directory that saved its merged model and no adapter (output.save: merged), else None:
    commands that take a run (eval, generate) then use the merged model."""
    path = Path(path)
    if is_adapter_dir(path) or is_adapter_dir(path / "adapter"):
        return None
    return path / "merged" if (path / "merged" / "config.json").is_file() else None


def is_adapter_dir(path: Path) -> bool:
    """Whether ``path`` holds a saved adapter's config (PEFT's adapter_config.json or lorakit's bottleneck one)."""
    return (path / "adapter_config.json").is_file() or is_bottleneck_dir(path)


def config_file(path: Path) -> Path:
    """The adapter's config file: PEFT's adapter_config.json, or a bottleneck adapter's bottleneck_config.json."""
    return path / (BOTTLENECK_CONFIG if is_bottleneck_dir(path) else "adapter_config.json")


def read_config(path: Path) -> dict:
    """adapter_config.json; a bottleneck adapter (lorakit's own method) reads as {"peft_type": "BOTTLENECK"} with
    the base_model_name_or_path its bottleneck_config.json records. A file that is no JSON object is exit 4."""
    bottleneck, file = is_bottleneck_dir(path), config_file(path)
    try:
        config = read_json_object(file)
    except NotJsonObject as e:
        raise CheckpointError(f"{e}; the adapter is damaged: copy or train it again") from None
    if bottleneck:
        return {"peft_type": "BOTTLENECK", "base_model_name_or_path": config.get("base_model_name_or_path")}
    return config


@dataclass
class Adapter:
    path: Path
    config: dict  # adapter_config.json
    record: dict  # lorakit.json written by `lorakit train`, or {}
    tensors: dict[str, torch.Tensor]  # keys without PEFT's "base_model.model." prefix

    @property
    def method(self) -> str:
        return method_name(self.config)


def serving_remedy(path: Path) -> str:
    """What to do with an adapter no merged model or GGUF can hold: generate with it next to its base."""
    return f"load it next to the base instead: `lorakit generate --model BASE --adapter {path}`"


def method_name(config: dict) -> str:
    """The adapter.method a saved adapter config belongs to (lora+rslora, dora, ia3, prefix, ...), or its peft_type
    when lorakit does not train that type."""
    if config.get("peft_type") == "LORA":
        name = "dora" if config.get("use_dora") else "lora"
        return name + ("+rslora" if config.get("use_rslora") else "")
    names = [name for name, m in REGISTRY.items() if m.peft_type == config.get("peft_type")]
    return names[0] if names else str(config.get("peft_type"))


def read_adapter(path: Path, allow_pickle: bool = False) -> Adapter:
    return Adapter(path, read_config(path), read_record(path), load_adapter_tensors(path, allow_pickle))


def read_record(path: Path) -> dict:
    """lorakit.json of the adapter at ``path`` (checked by find_adapter_dir), or {} for one lorakit did not train."""
    record_file = path / RECORD_FILE
    return json.loads(record_file.read_text()) if record_file.is_file() else {}


def load_adapter_tensors(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (path / "adapter_model.safetensors").is_file():
        raw = load_file(path / "adapter_model.safetensors")
    elif (path / "adapter_model.bin").is_file():
        if not allow_pickle:
            raise SafetyError(f"{path}/adapter_model.bin is a pickle file, which can run code when loaded; "
                              "pass --allow-pickle if you trust its source")
        raw = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"{path}: no adapter_model.safetensors; is the adapter directory complete?")
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in raw.items()}
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: adapter tensor {key} holds NaN or inf; the adapter is broken")
    return tensors


def resolve_base(adapter: Adapter, base: str | None) -> Path:
    """The local base directory: ``base``, else the adapter's recorded base (lorakit.json, then adapter_config)."""
    if base is not None:
        if not base.strip():  # not "no --base": an empty value would silently take the recorded base
            raise UsageError("--base: the value is empty; name the base model (a directory or hub id), or drop --base "
                             "for the one the adapter records")
        return _local_model_dir(base, "--base", None)
    name, recorded = recorded_base(adapter.record, adapter.config.get("base_model_name_or_path"))
    if name is None:
        raise UsageError(f"{adapter.path}: the recorded base ({', '.join(recorded) or 'none'}) is not on this "
                         "machine; pass --base PATH")
    return _local_model_dir(name, f"{adapter.path}: recorded base", adapter.record.get("revision"))


def recorded_base(record: dict, *more: str | None) -> tuple[str | None, list[str]]:
    """(the first base an adapter records that can load here, or None; every base it records): lorakit.json's
    resolved path, then the name the recipe gave (a project moved as a whole keeps a relative name valid), then
    ``more`` (adapter_config's base_model_name_or_path); a recorded local path that has moved is skipped, a hub id
    is taken as it is."""
    recorded = [name for name in (record.get("base_model_path"), record.get("base_model"), *more) if name]
    usable = (name for name in recorded if not is_local(name) or Path(name).expanduser().exists())
    return next(usable, None), recorded


def recorded_quantization(path: Path) -> tuple[str, bool, Path] | None:
    """(model.quantization, model.double_quant, the file that records them) of the base the adapter at ``path`` was
    trained on: its lorakit.json, else the recipe.yaml beside it (a checkpoint's adapter has no lorakit.json); None
    for an adapter lorakit did not train."""
    record = read_record(path)
    if "quantization" in record:
        model = {"quantization": record["quantization"], "double_quant": record.get("double_quant", True)}
        source = path / RECORD_FILE
    elif (path.parent / "recipe.yaml").is_file():
        source = path.parent / "recipe.yaml"
        model = parse_recipe(read_yaml(source), str(source), recorded=True).model.model_dump()
    else:
        return None
    try:
        section = ModelSection(name_or_path=str(path), quantization=model["quantization"],
                               double_quant=model["double_quant"])
    except ValueError:
        raise CheckpointError(f"{source}: quantization {model['quantization']!r} is none of none, nf4, fp4, int8; "
                              "the adapter is damaged: copy or train it again") from None
    return section.quantization, section.double_quant, source


def check_recorded_base(record: dict, base_dir: str | Path, option: str) -> None:
    """Refuse (exit 4) a local base whose architecture differs from the one the adapter's lorakit.json
    ``record`` names, and warn when its weights are another checkpoint's (_check_weights); ``option``: the flag
    that chose the base, for the messages."""
    base_dir = Path(base_dir)
    _check_architecture(record, base_dir, option)
    _check_weights(record, base_dir, option)


def _check_weights(record: dict, base_dir: Path, option: str) -> None:
    """A warning, not a refusal, when the base's weights_fingerprint is not the one recorded at training: another
    fine-tune of the same architecture passes the architecture check and silently gives other outputs, but the
    same model saved in another dtype, quantized or converted differs as well and is a legitimate base."""
    recorded = record.get("base_fingerprint")
    folder = model_dir_on_disk(str(base_dir))  # a hub id given to generate: the snapshot transformers loads
    if not isinstance(recorded, str) or folder is None or not (folder / "config.json").is_file():
        return
    found = weights_fingerprint(folder)
    if found is not None and found != recorded:
        warner(True)(
            f"{option} {base_dir}: its weights are not those the adapter was trained on (fingerprint "
            f"{found}, lorakit.json records {recorded}). Another checkpoint of this architecture (another "
            "fine-tune) gives other outputs; the same model saved in another dtype or quantized also differs and "
            "is fine")


def _check_architecture(record: dict, base_dir: Path, option: str) -> None:
    recorded = record.get("base_model_path")
    if not recorded or not (base_dir / "config.json").is_file() or not (Path(recorded) / "config.json").is_file():
        return
    if Path(recorded).resolve() == base_dir.resolve():
        return
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    a, b = (json.loads((Path(d) / "config.json").read_text()) for d in (recorded, base_dir))
    diff = [f"{k}: {a.get(k)} vs {b.get(k)}" for k in keys if a.get(k) != b.get(k)]
    if diff:
        raise CheckpointError(f"{option} {base_dir} is not the model the adapter was trained on ({recorded}): "
                              f"{'; '.join(diff)}")


def _local_model_dir(name: str, what: str, revision: str | None) -> Path:
    if is_local(name) and not Path(name).expanduser().exists():
        raise UsageError(f"{what} {name}: not found")
    if not is_local(name):  # named by the flag or record that chose it, before the hub's minute of retries
        require_hub(what, name, revision, remedy="give --base a local model directory")
        return _hub_snapshot(name, revision)
    return Path(resolve_model_path(ModelSection(name_or_path=name)))  # a model directory (a .gguf converted to one)


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated: one line with the way out
        raise UsageError(f"base model {repo_id!r} is not a local directory and could not be fetched "
                         f"({type(e).__name__}); pass --base PATH") from None
