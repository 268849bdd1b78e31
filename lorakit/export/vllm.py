"""`--check vllm`: would vLLM's LoRA loader accept this adapter as saved? The rules are lorakit.adapters.vllm's
(which `lorakit train`'s warning reads too), checked here against the saved files; vLLM itself is not needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from lorakit.adapters.vllm import serving_rank, vllm_problems
from lorakit.errors import CheckpointError
from lorakit.export.target import display_name
from lorakit.paths import is_gguf

def run_vllm_check(target: Path, max_lora_rank: int | None, *, base: str | None, say: Callable[[str], None]) -> None:
    """Print the verdict and the `vllm serve` command; exit 4 (adapter) when vLLM would refuse it."""
    from lorakit.adapters.files import check_recorded_base, find_adapter_dir, read_config, read_record, require_weights

    path = find_adapter_dir(target, "TARGET")
    require_weights(path, "TARGET")
    config = read_config(path)
    record = read_record(path)
    if base is not None:
        check_recorded_base(record, base, "--base")
    problems = vllm_problems(config, _lora_modules(path), max_lora_rank)
    dtypes = _saved_dtypes(path)
    if dtypes - {"F16", "BF16", "F32"}:
        problems.append(f"adapter weights stored as {', '.join(sorted(dtypes))}; vLLM loads float weights only")
    base_model = base or _served_base(record) or config.get("base_model_name_or_path") or "BASE"
    if problems:
        raise CheckpointError(f"{path}: vLLM's LoRA loader would refuse this adapter: " + "; ".join(problems))
    rank = max([config.get("r", 8), *(config.get("rank_pattern") or {}).values()])
    name = display_name(path)
    say(f"{path}: vLLM can serve this adapter (LoRA rank {rank} on {', '.join(sorted(_lora_modules(path)))}; "
        f"weights {', '.join(sorted(dtypes))}, cast to the model's dtype by vLLM)")
    say(f"vllm serve {base_model} --enable-lora --lora-modules {name}={path.resolve()} "
        f"--max-lora-rank {max_lora_rank or serving_rank(rank)}")


def _served_base(record: dict) -> str | None:
    """The base for `vllm serve`: a local model directory by the absolute path the run resolved (the command then
    works from any directory, as the adapter's absolute path does; the recipe may have named it relative to
    where training ran), anything else (a hub id, a .gguf file) as the recipe named it."""
    name, resolved = record.get("base_model"), record.get("base_model_path")
    if name and resolved and not is_gguf(name) and Path(resolved).is_absolute() and Path(resolved).is_dir():
        return resolved  # a hub id is recorded as itself, a .gguf base as the folder lorakit converted it into
    return name


def _header(path: Path) -> dict:
    from lorakit.models.checks import read_safetensors_header

    file = path / "adapter_model.safetensors"
    return read_safetensors_header(file)[0] if file.is_file() else {}


def _saved_dtypes(path: Path) -> set[str]:
    return {v["dtype"] for v in _header(path).values()}


def _lora_modules(path: Path) -> set[str]:
    """Short names of the modules the saved adapter holds LoRA weights for (what vLLM's loader checks)."""
    keys = [k for k in _header(path) if ".lora_" in k]
    return {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys}
