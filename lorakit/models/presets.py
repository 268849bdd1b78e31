"""Model configs for `lorakit estimate-memory`: offline presets (`lorakit inspect` takes them too), local model dirs,
bare config.json files, hub ids.

Presets are the architecture keys of popular models' published config.json files (lorakit/models/presets/*.json), each
with a ``_source`` naming the hub repository and its parameter count, so estimates work without a network.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.errors import UsageError
from lorakit.paths import is_gguf, is_local

PRESET_DIR = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def read_preset(name: str) -> dict:
    return json.loads((PRESET_DIR / f"{name}.json").read_text())


def find_preset(name_or_hub_id: str) -> str | None:
    """The preset called ``name_or_hub_id`` (case-insensitive), or the one whose source is that hub repository."""
    wanted = name_or_hub_id.strip().lower()
    for name in preset_names():
        if name == wanted or read_preset(name)["_source"]["hub_id"].lower() == wanted:
            return name
    return None


def preset_config(model: str) -> tuple[object, str] | None:
    """(transformers config, "preset NAME (HUB ID)") when ``model`` names an offline preset or its hub id and is no
    path here (a local directory called like a preset is that directory); else None."""
    if Path(model).expanduser().exists():
        return None
    preset = find_preset(model)
    if preset is None:
        return None
    data = read_preset(preset)
    return config_from_dict(data, f"preset {preset}"), f"preset {preset} ({data['_source']['hub_id']})"


def config_from_dict(data: dict, where: str):
    """A transformers config from a config.json mapping; unknown architectures exit 2."""
    from transformers import AutoConfig

    data = {k: v for k, v in data.items() if not k.startswith("_")}
    model_type = data.pop("model_type", None)
    if not model_type:
        raise UsageError(f"{where}: config has no model_type; is it a Hugging Face config.json?")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as e:
        raise UsageError(f"{where}: transformers does not know model_type {model_type!r} ({e})") from None


def load_model_config(model: str) -> tuple[object, str]:
    """(transformers config, where it came from) for a preset, a config.json file, a model dir, a .gguf file
    or a hub id (fetched by transformers, which honours HF_HUB_OFFLINE)."""
    from lorakit.models.meta import load_model_config as load_config

    path = Path(model).expanduser()
    if path.is_file() and not is_gguf(path):
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"--model: {str(path)!r} is not a JSON config ({e})") from None
        if not isinstance(data, dict):
            raise UsageError(f"--model: {str(path)!r} is not a JSON object")
        return config_from_dict(data, str(path)), str(path)
    if path.exists():
        return load_config(str(path)), str(path)
    if (found := preset_config(model)) is not None:
        return found
    if is_local(model):
        raise UsageError(f"--model: {model!r} not found")
    return _hub_config(model), f"hub {model}"


def _hub_config(model: str):
    """The hub's config.json: from the local cache, else from the hub when it answers within 3 s."""
    from transformers import AutoConfig

    from lorakit.models.meta import load_model_config as load_config

    presets = f"offline presets: {', '.join(preset_names())}"
    try:
        return AutoConfig.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError):
        pass
    return load_config(model, remedy=presets)
