"""The tokens that end an answer: the tokenizer's EOS and every end-of-turn token of its chat template.

A chat template may close a turn with a token that is not the tokenizer's EOS (Llama 3 ends turns with
``<|eot_id|>``, its EOS is ``<|end_of_text|>``). A model tuned on that template ends its answers with the
end-of-turn token, so whatever serves it (transformers' generate, vLLM, TGI, llama.cpp, Ollama) must stop on
both or it runs on into a turn it invents. Every artifact lorakit writes lists them all.
"""

from __future__ import annotations

import json
from pathlib import Path

GENERATION_CONFIG = "generation_config.json"
_PROBE = "lorakit0stop0probe"  # an answer no template alters: the text after it is how the template ends a turn


def end_of_turn_ids(tokenizer) -> list[int]:
    """Special tokens the chat template writes right after an assistant answer ([] without a template)."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    from jinja2.exceptions import TemplateError

    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    for messages in (turns, [{"role": "system", "content": "sys"}, *turns]):  # some templates need a system turn
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            break
        except (TemplateError, ValueError, TypeError):
            continue
    else:
        return []
    if not isinstance(text, str) or _PROBE not in text:
        return []
    suffix = text[text.rindex(_PROBE) + len(_PROBE):]
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    return list(dict.fromkeys(i for i in ids if i in special))


def stop_token_ids(tokenizer, *also: int | list[int] | None) -> list[int]:
    """EOS first (transformers pads with eos_token_id[0]), then every end-of-turn token, then ``also``."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids += end_of_turn_ids(tokenizer)
    for extra in also:
        ids += [extra] if isinstance(extra, int) else list(extra or [])
    return list(dict.fromkeys(ids))


def eos_ids(value) -> list[int]:
    """A config's eos_token_id (None, an int or a list) as a list."""
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def write_generation_config(out: Path, tokenizer, base) -> list[int]:
    """``out``/generation_config.json: ``base``'s (a GenerationConfig, a model directory or None) with every stop
    token as ``eos_token_id``, a list when there are several. Returns the ids."""
    from transformers import GenerationConfig

    if isinstance(base, GenerationConfig):
        config = GenerationConfig.from_dict(base.to_dict())
    elif base is not None and (Path(base) / GENERATION_CONFIG).is_file():
        config = GenerationConfig.from_pretrained(base)
    else:
        config = GenerationConfig()
    ids = stop_token_ids(tokenizer, eos_ids(config.eos_token_id))
    config.eos_token_id = ids[0] if len(ids) == 1 else ids or None
    if config.pad_token_id is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(out)
    return ids


def read_generation_eos(folder: Path) -> list[int]:
    """The eos_token_id list of ``folder``/generation_config.json ([] when there is none)."""
    path = Path(folder) / GENERATION_CONFIG
    return eos_ids(json.loads(path.read_text()).get("eos_token_id")) if path.is_file() else []
