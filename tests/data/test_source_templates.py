"""data.train[I].chat_template: each source's chat/preference rows render with its own template, exactly as that
source trained alone with the template as data.chat_template; the tokenizer (saved with the adapter) keeps
data.chat_template; mistakes are exit 2 naming the source's key; the cache and preview-data follow each source."""

import json

import numpy as np
import pytest

from lorakit.config.load import parse_recipe
from lorakit.config.schema import DataSection, ModelSection, TrainSource
from lorakit.data import chat, encode, load_datasets
from lorakit.data.chat import bundled_template
from lorakit.data.formats import IGNORE_INDEX
from lorakit.errors import EXIT_USAGE, RecipeError, UsageError
from lorakit.tools.preview import preview_rows
from run_helpers import CHAT, write_jsonl


@pytest.fixture
def load_tok(tiny_model_dir):
    """Fresh tokenizers (data.chat_template is set on the one a load is given)."""
    from lorakit.models.loading import load_tokenizer

    return lambda: load_tokenizer(ModelSection(name_or_path=str(tiny_model_dir)), str(tiny_model_dir))


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


def chats(tmp_path, name: str, n: int) -> str:
    return write_jsonl(tmp_path / f"{name}.jsonl", [{"messages": CHAT[: 3 + 2 * (i % 2)]} for i in range(n)])


def supervised(example, tok) -> str:
    return tok.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def test_each_source_renders_with_its_own_template_as_if_trained_alone(tmp_path, load_tok, monkeypatch):
    paths = [chats(tmp_path, name, 5) for name in ("a", "b", "c")]
    mixture = DataSection(train=[TrainSource(path=paths[0], chat_template="chatml"),
                                 TrainSource(path=paths[1], chat_template="llama3"), paths[2]],
                          format="chat", chat_template="mistral", max_seq_len=200, cache=False, num_proc=1)
    calls = []
    monkeypatch.setattr(chat, "_per_turn_spans", lambda *a: calls.append(a))  # bundled: one rendering each
    tok = load_tok()
    one = load_datasets(mixture, tok, seed=0)
    assert not calls
    assert tok.chat_template == bundled_template("mistral")  # data.chat_template: what the adapter keeps
    for i, template in enumerate(["chatml", "llama3", "mistral"]):
        alone = load_datasets(DataSection(train=paths[i], format="chat", chat_template=template, max_seq_len=200,
                                          cache=False), load_tok(), seed=0)
        mine = [one.train[k] for k in np.flatnonzero(one.sources == i)]
        assert mine == list(alone.train), template
    assert supervised(one.train[0], tok) == "Paris.<|im_end|>\n"
    assert supervised(one.train[5], tok) == "Paris.<|eot_id|>"
    # Forked workers, chunks of two rows: the same store.
    monkeypatch.setattr(encode, "CHUNK_ROWS", 2)
    monkeypatch.setattr(encode, "MIN_PARALLEL_ROWS", 0)
    two = load_datasets(mixture.model_copy(update={"num_proc": 2}), tok, seed=0)
    assert list(two.train) == list(one.train) and two.fingerprint == one.fingerprint
    assert tok.chat_template == bundled_template("mistral")


def test_without_data_chat_template_the_tokenizer_keeps_its_own(tmp_path, load_tok):
    tok = load_tok()
    own = tok.chat_template
    s = DataSection(train=[chats(tmp_path, "a", 2), TrainSource(path=chats(tmp_path, "b", 2), chat_template="llama3")],
                    format="chat")
    data = load_datasets(s, tok, seed=0)
    assert tok.chat_template == own
    assert [supervised(data.train[k], tok) for k in (0, 2)] == ["Paris.<|im_end|>\n", "Paris.<|eot_id|>"]


def recipe(data: dict) -> dict:
    return {"model": {"name_or_path": "m"}, "train": {"max_steps": 1}, "data": data}


@pytest.mark.parametrize("data, message", [
    ({"train": ["a.jsonl", {"path": "b.jsonl", "chat_template": "chatml"}]},  # data.format alpaca
     "data.train[1].chat_template: b.jsonl has format alpaca, which renders no chat template; remove it"),
    ({"train": [{"path": "b.jsonl", "format": "text", "chat_template": "chatml"}], "format": "chat"},
     "data.train[0].chat_template: b.jsonl has format text"),
    ({"train": ["a.jsonl", {"path": "b.jsonl", "format": "completion"}], "chat_template": "llama3"},
     "data.chat_template: no data.train source is chat or preference (data.format is alpaca), so no row renders "
     "with it; remove it or set data.format: chat"),
])
def test_a_template_no_row_renders_with_is_refused(data, message):
    with pytest.raises(RecipeError) as e:
        parse_recipe(recipe(data))
    assert message in str(e.value) and e.value.exit_code == EXIT_USAGE


def test_templates_that_some_rows_render_with_are_accepted():
    parse_recipe(recipe({"train": ["a.jsonl", {"path": "b.jsonl", "format": "chat", "chat_template": "zephyr"}],
                         "chat_template": "llama3"}))  # the tokenizer saved with the adapter gets llama3
    parse_recipe(recipe({"train": [{"path": "a.jsonl", "format": "text"}], "eval": "e.jsonl", "format": "chat",
                         "chat_template": "llama3"}))  # data.eval's rows are chat


def test_a_bad_source_template_is_exit_2_naming_its_key(tmp_path, load_tok):
    path = chats(tmp_path, "a", 1)
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")
    for template, message in [
        ("chatm", "data.train[1].chat_template: unknown template 'chatm'; did you mean chatml?"),
        ("nowhere.jinja", "data.train[1].chat_template: template file 'nowhere.jinja' not found"),
        (str(broken), f"data.train[1].chat_template: {broken}: Jinja syntax error on line 1"),
    ]:
        s = DataSection(train=[path, TrainSource(path=path, chat_template=template)], format="chat")
        with pytest.raises(UsageError) as e:
            load_datasets(s, load_tok(), seed=0)
        assert str(e.value).startswith(message) and e.value.exit_code == EXIT_USAGE


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_row_a_source_template_cannot_split_names_that_sources_key(tmp_path, load_tok, monkeypatch, num_proc):
    """Found while tokenizing (in a forked worker with num_proc 2): the key is the source's, not data.chat_template."""
    path = chats(tmp_path, "a", 4)
    odd = tmp_path / "odd.jinja"  # the last message is written differently: no turn can be split off
    odd.write_text("{% for m in messages %}{{ m['content'] }}{% if loop.last %}.{% endif %}{% endfor %}")
    monkeypatch.setattr(encode, "CHUNK_ROWS", 2)
    monkeypatch.setattr(encode, "MIN_PARALLEL_ROWS", 0)
    s = DataSection(train=[path, TrainSource(path=path, chat_template=str(odd))], format="chat", num_proc=num_proc,
                    cache=False)
    with pytest.raises(UsageError) as e:
        load_datasets(s, load_tok(), seed=0)
    assert str(e.value).startswith(f"data.train[1].chat_template: the template renders the start of the "
                                   f"conversation at {path}:1 differently") and e.value.exit_code == EXIT_USAGE
    with pytest.raises(UsageError, match=r"^data.chat_template: the template renders the start"):
        load_datasets(DataSection(train=path, format="chat", chat_template=str(odd), cache=False), load_tok(), seed=0)


def test_a_changed_source_template_rebuilds_the_cache(tmp_path, load_tok):
    path = chats(tmp_path, "a", 2)
    mine = tmp_path / "mine.jinja"
    mine.write_text(bundled_template("chatml"))
    s = DataSection(train=[path, TrainSource(path=path, chat_template=str(mine))], format="chat")
    first = load_datasets(s, load_tok(), seed=0)
    assert not first.train_stats.cached and load_datasets(s, load_tok(), seed=0).train_stats.cached
    mine.write_text(bundled_template("chatml").replace("\\n", "\\n\\n", 1))  # same recipe, another template text
    again = load_datasets(s, load_tok(), seed=0)
    assert not again.train_stats.cached and list(again.train)[2:] != list(first.train)[2:]
    assert list(again.train)[:2] == list(first.train)[:2]  # the other source, as before


def test_preview_tokenizes_each_source_with_its_own_section(tmp_path, load_tok):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi", "output": "hi there"}])
    conversations = write_jsonl(tmp_path / "c.jsonl", [{"conv": CHAT[:3]}])
    s = DataSection(train=[alpaca, TrainSource(path=conversations, format="chat", fields={"messages": "conv"},
                                               chat_template="llama3")])
    tok = load_tok()
    own = tok.chat_template
    rows = preview_rows(s, tok, 5)
    assert [r.status for r in rows] == ["kept", "kept"]
    assert supervised(rows[0].example, tok) == "hi there<|im_end|>"
    assert supervised(rows[1].example, tok) == "Paris.<|eot_id|>"
    assert tok.chat_template == own
    assert json.dumps([r.where for r in rows]) == json.dumps([f"{alpaca}:1", f"{conversations}:1"])
