"""A hub id that is neither cached nor reachable is refused in seconds, naming the key: huggingface_hub alone
retries an unreachable hub for about a minute before failing."""

from __future__ import annotations

import json
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


def test_a_missing_folder_under_an_existing_one_is_named_as_a_path(empty_hf_cache, monkeypatch, tmp_path):
    """'runs/tiny-model' reads as a hub id (one '/', not on disk), but beside a runs/ folder the user most likely
    meant a directory that is not there (yet): the message says so rather than only 'a hub id not cached'."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(UsageError, match=r"^model.name_or_path: 'runs/tiny-model' is no local path \(runs/ holds no "
                                         r"tiny-model\) and, read as a hub id, is not in the Hugging Face cache"):
        resolve_model_path(ModelSection(name_or_path="runs/tiny-model"))
    with pytest.raises(UsageError, match=r"^model.name_or_path: 'org/name' is a hub id "):  # no org/ folder here
        resolve_model_path(ModelSection(name_or_path="org/name"))


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


@pytest.fixture
def http_server():
    """A local HTTP server answering every request (HEAD, GET, a proxy's absolute-URL request) with 404; its
    ``requests`` list holds each request's method."""
    import http.server
    import threading

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802  (http.server's naming)
            server.requests.append(self.command)
            self.send_response(404)
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    server.requests = []
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.fixture
def online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    # the suite runs offline (conftest), and huggingface_hub's session reads that once, at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_a_hub_that_answers_through_the_proxy_the_hub_would_use_is_reachable(empty_hf_cache, monkeypatch,
                                                                          http_server, online):
    """The probe goes through huggingface_hub's HTTP session, so where only a proxy reaches the hub (no direct
    connection: here the endpoint's host does not even resolve), the hub is not declared unreachable."""
    from huggingface_hub.utils import close_session

    from lorakit.paths import endpoint_answers, hub_unreachable

    monkeypatch.setenv("HF_ENDPOINT", http_server.url)
    assert hub_unreachable("org/name") is None  # any HTTP answer, even 404, is a reachable host
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.invalid")
    assert "unreachable" in hub_unreachable("org/name", timeout=1.0)
    for proxy in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(proxy, http_server.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    close_session()  # the session reads the proxy variables when it is made: as a process started with them
    endpoint_answers.cache_clear()  # and the answer is kept per process
    try:
        assert hub_unreachable("org/name", timeout=1.0) is None
    finally:
        close_session()  # later tests get a session made without this test's proxy


def test_two_resolutions_of_an_uncached_hub_id_probe_the_hub_once(empty_hf_cache, monkeypatch, http_server, online):
    """A run resolves its model, tokenizer and base one after another: the hub is asked once per process."""
    monkeypatch.setenv("HF_ENDPOINT", http_server.url)
    assert resolve_model_path(ModelSection(name_or_path="org/name")) == "org/name"
    assert resolve_model_path(ModelSection(name_or_path="org/other")) == "org/other"
    assert http_server.requests == ["HEAD"]


def test_a_hub_base_is_checked_once_and_fetched_at_the_recorded_revision(cached_hub_model, monkeypatch, tmp_path):
    """merge/export's base named by a hub id: the hub was asked about it under the flag's name and then again as
    model.name_or_path before the snapshot was taken."""
    import lorakit.paths
    from lorakit.adapters.files import Adapter, resolve_base

    asked = []
    probe = lorakit.paths.hub_unreachable
    monkeypatch.setattr(lorakit.paths, "hub_unreachable", lambda *a, **k: asked.append(a) or probe(*a, **k))
    adapter = Adapter(tmp_path, {}, {"base_model": cached_hub_model, "revision": "v3"}, {})
    assert resolve_base(adapter, None).name == "b" * 40
    assert len(asked) == 1


def test_a_runs_checks_read_the_hub_models_config_at_model_revision(cached_hub_model, tiny_model_dir, tmp_path):
    """The checks before the weights load (the tokenizer's ids against the vocabulary, ...) read the config at the
    default branch whatever model.revision said; revision 'v3' has an 8-token vocabulary."""
    from run_helpers import recipe_dict

    from lorakit.config.load import parse_recipe
    from lorakit.training.run import check_base_fits

    tokenizer = load_tokenizer(ModelSection(name_or_path=str(tiny_model_dir)), str(tiny_model_dir))
    data = recipe_dict(cached_hub_model, tmp_path / "train.jsonl", tmp_path / "run")
    check_base_fits(parse_recipe(data), cached_hub_model, tokenizer)
    data["model"]["revision"] = "v3"
    with pytest.raises(UsageError, match=r"^model.name_or_path: the tokenizer has .* the model's vocabulary is 8:"):
        check_base_fits(parse_recipe(data), cached_hub_model, tokenizer)


def test_a_training_run_on_a_hub_id_and_its_eval_ask_the_hub_once(tiny_model_dir, tmp_path, monkeypatch):
    """A run resolved the hub id (resolve_model_path), then its checks before the weights load read the config
    through load_model_config, which asked again; eval checked the base its adapter records, then resolved it
    again to load it. Offline, the whole tiny model in a Hugging Face cache."""
    import shutil

    import lorakit.paths
    from huggingface_hub import constants
    from run_helpers import cli, recipe_dict, write_data, write_recipe

    repo = tmp_path / "hf-cache" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    shutil.copytree(tiny_model_dir, repo / "snapshots" / ("a" * 40))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    asked = []
    probe = lorakit.paths.hub_unreachable
    monkeypatch.setattr(lorakit.paths, "hub_unreachable", lambda *a, **k: asked.append(a) or probe(*a, **k))
    data = write_data(tmp_path / "d.jsonl", 8)
    recipe = recipe_dict("org/tiny", data, tmp_path / "run", max_steps=1)
    result = cli("train", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 0, result.output
    assert asked == [("org/tiny", None, "config.json")]
    from lorakit.models.checks import weights_fingerprint  # read from the hub id's snapshot, a copy of the model

    record = json.loads((tmp_path / "run" / "adapter" / "lorakit.json").read_text())
    assert record["base_fingerprint"] == weights_fingerprint(tiny_model_dir)
    asked.clear()
    result = cli("eval", tmp_path / "run", "--data", data, "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    assert asked == [("org/tiny", None, "config.json")]
