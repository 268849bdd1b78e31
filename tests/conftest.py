"""Shared fixtures: tiny random models built offline, once per session."""

import os

import pytest

# No test may reach the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Llama (hidden 64, GQA) with a real fast tokenizer and ChatML template."""
    from lorakit.testing import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path_factory.getbasetemp() / "lorakit-cache"))


@pytest.fixture
def cached_hub_model(tiny_model_dir, tmp_path, monkeypatch):
    """'org/tiny' in a Hugging Face cache of its own: the tiny model's config.json at main (2 layers) and, as
    revision 'v3', the same with 3 layers and an 8-token vocabulary; the hub itself out of reach (the suite runs
    with HF_HUB_OFFLINE=1)."""
    import json

    from huggingface_hub import constants

    repo = tmp_path / "hf-cache" / "models--org--tiny"
    config = json.loads((tiny_model_dir / "config.json").read_text())
    for ref, commit, changes in (("main", "a" * 40, {}), ("v3", "b" * 40, {"num_hidden_layers": 3, "vocab_size": 8})):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text(json.dumps({**config, **changes}))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return "org/tiny"
