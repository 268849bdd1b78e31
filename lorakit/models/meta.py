"""Models built on the meta device: shapes and parameter counts without reading or allocating weights."""

from __future__ import annotations

from pathlib import Path

import torch

from lorakit.errors import UsageError, first_line
from lorakit.paths import is_gguf, is_local, require_hub


def load_model_config(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None,
                      remedy: str | None = None):
    """The transformers config of a local dir, a .gguf file (its metadata only) or a hub id (at ``revision``).
    ``remedy`` ends the message of a hub id that cannot be read (require_hub's default otherwise)."""
    from transformers import AutoConfig

    name = str(name_or_path)
    path = Path(name).expanduser()
    hub_id = not is_local(name)
    if not hub_id and not path.exists():  # not a hub id: say so, not the hub's "Repo id must be"
        raise UsageError(f"model.name_or_path: {name!r} not found")
    if hub_id:
        require_hub("model.name_or_path", name, revision, remedy=remedy)
    return read_model_config(name, trust_remote_code, revision, remedy)


def read_model_config(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None,
                      remedy: str | None = None):
    """load_model_config of what resolve_model_path returned (a model dir, or a hub id it found within reach),
    without asking again whether the hub id is within reach: a training run asked once, in resolve_model_path."""
    from transformers import AutoConfig

    name = str(name_or_path)
    path = Path(name).expanduser()
    hub_id = not is_local(name)
    try:
        if is_gguf(path):
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        tail = f"; {remedy}" if remedy and hub_id else ""
        raise UsageError(f"model.name_or_path: cannot read a model config from {name!r}: {first_line(e)}{tail}") \
            from None


def build_meta_model(config_or_path, trust_remote_code: bool = False):
    """The causal LM of a config (or of a model dir/.gguf/hub id) on the meta device: shapes only, no memory."""
    from transformers import AutoModelForCausalLM, PretrainedConfig

    config = config_or_path
    if not isinstance(config, PretrainedConfig):
        config = load_model_config(str(config_or_path), trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
