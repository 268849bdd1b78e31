"""A hub id that is neither cached nor reachable is refused in seconds, naming the key: huggingface_hub alone
retries an unreachable hub for about a minute before failing."""

from __future__ import annotations

import time

import pytest

from lorakit.config.schema import ModelSection
from lorakit.errors import UsageError
from lorakit.models.loading import load_tokenizer, resolve_model_path
from lorakit.models.meta import load_model_config


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def test_offline_hub_id_is_refused_at_once_naming_the_key(empty_hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match=r"^model.name_or_path: 'org/name' is a hub id .*HF_HUB_OFFLINE is set"):
        resolve_model_path(ModelSection(name_or_path="org/name"))
    with pytest.raises(UsageError, match=r"^model.name_or_path: 'org/name' .*HF_HUB_OFFLINE"):
        load_model_config("org/name")  # inspect, estimate-memory with a recipe


def test_unreachable_hub_is_one_line_in_seconds(empty_hf_cache, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens, refused at once
    start = time.monotonic()
    with pytest.raises(UsageError, match=r"^model.name_or_path: 'org/name' .*the hub \(127.0.0.1\) is unreachable"):
        resolve_model_path(ModelSection(name_or_path="org/name"))
    section = ModelSection(name_or_path=str(tiny_model_dir), tokenizer="org/tok")
    with pytest.raises(UsageError, match=r"^model.tokenizer: 'org/tok' .*unreachable"):
        load_tokenizer(section, str(tiny_model_dir))
    assert time.monotonic() - start < 10


def test_a_tokenizer_error_names_the_key_the_source_came_from(tiny_model_dir, tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a model dir without a tokenizer: model.tokenizer was not set
    with pytest.raises(UsageError, match=r"^model.name_or_path: cannot load a tokenizer"):
        load_tokenizer(ModelSection(name_or_path=str(tmp_path)), str(tmp_path))
