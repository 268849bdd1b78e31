"""What TARGET is (a run directory, an adapter or a merged model) and whether its architecture can be exported.

Everything here reads only small JSON files, so a refusal comes before any work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import UsageError

# Hugging Face model_type → the GGUF architecture llama.cpp runs it as. Mistral is a Llama to llama.cpp (its
# sliding window is ignored there as in llama.cpp's own converter); SmolLM is model_type llama.
GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
SUPPORTED = "Llama, Mistral, Qwen2, SmolLM (model_type llama, mistral, qwen2)"


@dataclass
class Target:
    path: Path  # what the user named
    kind: str  # "model" (a Hugging Face model directory) or "adapter"
    model_dir: Path  # the model directory, or the adapter's base
    adapter_dir: Path | None  # the adapter directory (kind "adapter")
    config: dict  # the model's (or the adapter's base's) config.json
    arch: str  # GGUF architecture name


def display_name(target: str | Path) -> str:
    """The name a served model or adapter gets: the run's for RUN, RUN/adapter and RUN/merged."""
    path = Path(target).resolve()
    return path.parent.name if path.name in ("adapter", "merged") else path.name


def _is_model(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _is_adapter(path: Path) -> bool:
    from lorakit.adapters.files import is_adapter_dir

    return is_adapter_dir(path)


def plain_lora_only(path: Path, config: dict) -> str:
    """Why a GGUF LoRA file cannot hold this adapter ('' when it is plain LoRA), with what to do instead."""
    from lorakit.adapters.files import method_name, serving_remedy
    from lorakit.config.methods import saved_method

    if config.get("peft_type") == "LORA" and not config.get("use_dora"):
        return ""
    method = saved_method(config.get("peft_type"))
    name = method_name(config)
    article = "an" if name[:1].lower() in "aeiou" else "a"
    why = f"{path}: {article} {name} adapter; llama.cpp's LoRA files hold plain LoRA only"
    if method is not None and not method.mergeable:
        return f"{why}, and {method.not_mergeable}, so no GGUF can hold it; {serving_remedy(path)}"
    return f"{why}. Export the merged model instead: lorakit export {path} --format gguf -o FILE.gguf"


def resolve_target(target: str | Path, *, want: str = "model", base: str | None = None,
                   allow_pickle: bool = False) -> Target:
    """A run directory (its merged/ model if present, else its adapter/), an adapter or a model directory.

    ``want="adapter"``: the adapter itself is the output (gguf-lora, the vLLM check); a run gives its adapter/.
    """
    path = Path(target)
    if not path.exists():
        raise UsageError(f"TARGET {path}: not found; give a run directory, an adapter or a model directory")
    if path.is_dir() and not _is_model(path) and not _is_adapter(path):
        merged, adapter = path / "merged", path / "adapter"
        if want == "model" and _is_model(merged):
            path = merged
        elif _is_adapter(adapter):
            path = adapter
    if path.is_dir() and _is_adapter(path):
        from lorakit.adapters.files import (check_recorded_base, find_adapter_dir, read_adapter, read_config,
                                            resolve_base)
        from lorakit.merge.merge import read_mergeable_adapter

        if want == "adapter":
            path = find_adapter_dir(path, "TARGET")  # a damaged or incomplete folder: exit 4 naming the file
            if why := plain_lora_only(path, read_config(path)):
                raise UsageError(why)
        # Merging it refuses adapters with no weight delta (prompt tuning, bottleneck, ...) here, before any work.
        adapter = read_mergeable_adapter(path, allow_pickle) if want == "model" else read_adapter(path, allow_pickle)
        base_dir = resolve_base(adapter, base)
        check_recorded_base(adapter.record, base_dir, "--base")
        return Target(Path(target), "adapter", base_dir, path, _config(base_dir), _arch(base_dir))
    if path.is_dir() and (path / "checkpoints").is_dir() and not _is_model(path):
        from lorakit.adapters.files import find_adapter_dir

        find_adapter_dir(path, "TARGET")  # a run that has not written its adapter yet: exit 4 naming its checkpoint
    if want == "adapter":
        raise UsageError(f"TARGET {path}: not an adapter (no adapter_config.json); give RUN/adapter or a run directory")
    if not _is_model(path):
        raise UsageError(f"TARGET {path}: neither a run directory, an adapter (adapter_config.json) nor a model "
                         "directory (config.json and *.safetensors)")
    if base is not None:
        raise UsageError(f"--base {base}: TARGET {path} is a whole model, which needs no base; drop --base")
    return Target(Path(target), "model", path, None, _config(path), _arch(path))


def _config(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{model_dir}/config.json: cannot be read ({e})") from None


def _arch(model_dir: Path) -> str:
    config = _config(model_dir)
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCHS:
        raise UsageError(f"{model_dir}/config.json: model_type {model_type!r} cannot be exported to GGUF by lorakit; "
                         f"supported: {SUPPORTED}")
    if config.get("quantization_config"):
        raise UsageError(f"{model_dir}: a pre-quantized checkpoint; GGUF export needs full-precision weights")
    return GGUF_ARCHS[model_type]
