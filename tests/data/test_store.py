"""Data at scale: the memory-mapped token store, its cache under concurrent builders, batched and parallel
tokenization (the same result for any number of processes), content fingerprints, weighted mixtures, hub ids."""

import gc
import multiprocessing
import sys

import numpy as np
import pytest

from lorakit.config.schema import DataSection, ModelSection, TrainSource
from lorakit.data import Example, Row, StepSampler, TokenStore, load_datasets, tokenize_row, tokenize_rows
from lorakit.data import encode, pipeline
from lorakit.data.fingerprint import fingerprint, store_fingerprints
from lorakit.data.formats import IGNORE_INDEX
from lorakit.data.store import write_examples
from lorakit.errors import DataError, UsageError
from lorakit.paths import is_local
from run_helpers import CHAT, write_jsonl


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from lorakit.models.loading import load_tokenizer

    return load_tokenizer(ModelSection(name_or_path=str(tiny_model_dir)), str(tiny_model_dir))


def alpaca(n: int, tag: str = "") -> list[dict]:
    return [{"instruction": f"Count to {i}{tag}", "input": "" if i % 3 else f"start at {i % 7}",
             "output": " ".join(str(k) for k in range(i % 17 + 1))} for i in range(n)]


# ----------------------------------------------------------------------------------------------------------
# The store


def test_store_round_trip_is_memory_mapped(tmp_path):
    examples = [Example([1, 2, 3], [-100, 2, 3], 1), Example([4], [4], 0), Example([5, 6], [-100, -100], 2)]
    write_examples(tmp_path / "s", examples)
    store = TokenStore(tmp_path / "s")
    assert list(store) == examples and store == examples and store[-1] == examples[-1] and store[1:] == examples[1:]
    assert isinstance(store.columns["input_ids"], np.memmap) and isinstance(store.offsets, np.memmap)
    assert store.lengths.tolist() == [3, 1, 2]
    assert fingerprint(examples) == store_fingerprints(store, ["a"])[0]
    write_examples(tmp_path / "empty", [])
    assert len(TokenStore(tmp_path / "empty")) == 0


def test_fingerprint_keeps_its_definition():
    """Checkpoints written before the store recorded this exact digest: it must not change."""
    import hashlib
    from array import array

    examples = [Example([1, 2, 300000], [-100, 2, 300000], 1), Example([7], [7], 0)]
    digest = hashlib.sha256()
    for e in examples:
        digest.update(len(e).to_bytes(8, "little") + array("q", e.input_ids).tobytes() + array("q", e.labels).tobytes())
    assert fingerprint(examples) == digest.hexdigest()


def test_loaded_data_equals_row_by_row_tokenization(tmp_path, tok):
    rows = alpaca(40)
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    s = DataSection(train=path, max_seq_len=40)
    data = load_datasets(s, tok, seed=0)
    expected, stats = tokenize_rows([Row(f"{path}:{i + 1}", r) for i, r in enumerate(rows)], s, tok)
    assert isinstance(data.train, TokenStore) and data.train == expected
    assert data.train_stats.summary().startswith(stats.summary())
    assert data.fingerprint == fingerprint(expected)
    assert load_datasets(s, tok, seed=0).train_stats.cached  # the published entry is reused


@pytest.mark.parametrize("fmt", ["alpaca", "chat"])
def test_any_number_of_processes_and_chunks_gives_the_same_store(tmp_path, tok, monkeypatch, fmt):
    rows = alpaca(23) if fmt == "alpaca" else [{"messages": CHAT[: 3 + (i % 3)]} for i in range(23)]
    rows[5] = {"nothing": "here"}  # bad rows, skipped and counted wherever they fall
    rows[9] = '{"cut": '  # invalid JSON: parsed (and found bad) by the process that tokenizes it
    rows[12] = "  "  # a blank line: not a row
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    s = DataSection(train=path, format=fmt, max_seq_len=30, skip_bad_rows=True, cache=False, num_proc=1)
    one = load_datasets(s, tok, seed=0)
    monkeypatch.setattr(encode, "CHUNK_ROWS", 4)
    monkeypatch.setattr(encode, "MIN_PARALLEL_ROWS", 0)
    monkeypatch.setattr(pipeline, "WINDOW_ROWS", 7)  # rows read 7 at a time, as they are tokenized
    two = load_datasets(s.model_copy(update={"num_proc": 2}), tok, seed=0)
    assert two.train == one.train and two.fingerprint == one.fingerprint
    assert two.train_stats.to_json() == one.train_stats.to_json() and one.train_stats.bad == 2
    assert one.train_stats.rows == 22
    strict = s.model_copy(update={"num_proc": 2, "skip_bad_rows": False})
    with pytest.raises(DataError, match=r"d.jsonl:6: missing field") as e:  # the first bad row, from a worker
        load_datasets(strict, tok, seed=0)
    assert e.value.exit_code == 3
    rows[5] = rows[4]
    write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d.jsonl:10: invalid JSON \(Expecting value"):
        load_datasets(strict, tok, seed=0)


def test_lines_parsed_by_workers_read_as_lines_parsed_at_once(tmp_path):
    """sources.JsonLine (a .jsonl line parsed where it is tokenized) gives the rows and errors of eager reading."""
    from lorakit.data.sources import BadRowError, iter_rows

    lines = ['{"a": 1}', "", '  {"b": [1, 2]}', "[1]", '{"bad": ', "\u00a0", '{"c": "\u00e9"}', "7"]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n")

    def read(lazy):
        out = []
        for item in iter_rows(str(path), skip_bad_rows=True, lazy=lazy):
            try:
                out.append(item if isinstance(item, str) else (item.where, item.data))
            except BadRowError as e:
                out.append(e.reason)
        return out

    assert read(lazy=True) == read(lazy=False)
    assert read(lazy=False)[:2] == [(f"{path}:1", {"a": 1}), (f"{path}:3", {"b": [1, 2]})]


def _build_in_child(args):
    path, model_dir, cache_dir = args
    import os

    os.environ["LORAKIT_CACHE"] = cache_dir
    from lorakit.models.loading import load_tokenizer

    tokenizer = load_tokenizer(ModelSection(name_or_path=model_dir), model_dir)
    data = load_datasets(DataSection(train=path, num_proc=1), tokenizer, seed=0)
    return data.fingerprint, len(data.train)


def test_two_builders_at_once_share_one_entry(tmp_path, tiny_model_dir, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca(300))
    cache_dir = str(tmp_path / "cache")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_build_in_child, [(path, str(tiny_model_dir), cache_dir)] * 2)
    assert results[0] == results[1]
    entries = [p for p in (tmp_path / "cache" / "data").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()
    assert not [p for p in (tmp_path / "cache" / "data").iterdir() if ".tmp-" in p.name]  # no temporary left


def test_a_damaged_entry_is_rebuilt(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca(10))
    s = DataSection(train=path)
    first = load_datasets(s, tok, seed=0)
    ids = first.train.folder / "input_ids.bin"
    expected = list(first.train)
    del first
    gc.collect()  # its memory maps closed before the file is cut
    ids.write_bytes(ids.read_bytes()[:8])  # truncated by a crash or a full disk
    again = load_datasets(s, tok, seed=0)
    assert not again.train_stats.cached and list(again.train) == expected


def _run_over_a_read_only_cache(cache, args, damage=lambda entry: None):
    """``lorakit ARGS`` once to fill ``cache``, then again with it read-only (after ``damage(entry)``)."""
    import subprocess

    from run_helpers import subprocess_env

    env = subprocess_env(LORAKIT_CACHE=str(cache))
    command = [sys.executable, "-m", "lorakit", *map(str, args)]
    assert subprocess.run([*command[:3], "preview-data", args[1]], env=env, capture_output=True).returncode == 0
    [entry] = [p for p in (cache / "data").iterdir() if not p.name.startswith(".")]
    damage(entry)
    for path in cache.rglob("*"):
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        return subprocess.run(_unprivileged(command), env=env, capture_output=True, text=True)
    finally:
        for path in cache.rglob("*"):
            path.chmod(path.stat().st_mode | 0o200)


def _unprivileged(command: list[str]) -> list[str]:
    """``command`` kept out of folders it may not write, also when the tests run as root."""
    import os
    import shutil

    if os.geteuid() != 0:
        return command
    if not shutil.which("setpriv"):  # root writes anywhere: drop the capabilities that let it
        pytest.skip("root without setpriv cannot be kept out of a read-only folder")
    caps = "-dac_override,-dac_read_search,-fowner"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *command]


_TWO_BUILDERS = """
import sys, threading
from lorakit.data import cache

met = threading.Barrier(2, timeout=10)  # each build waits for the other: only builders at once pass it
def build(folder):
    try:
        met.wait()
    except threading.BrokenBarrierError:
        print("in turn")
    return {"splits": {}}
threads = [threading.Thread(target=cache.open_or_build, args=(sys.argv[1], build)) for _ in range(2)]
for t in threads: t.start()
for t in threads: t.join()
print("done")
"""


def test_runs_over_a_read_only_cache_tokenize_at_once_not_in_turn(tmp_path):
    """A cache folder made read-only with its lock files still writable (chmod on the folder alone): each run held
    the entry's lock while it tokenized privately, so runs over a damaged or missing entry took turns."""
    import subprocess

    from run_helpers import subprocess_env

    key, data = "k" * 32, tmp_path / "cache" / "data"
    (data / key).mkdir(parents=True)  # damaged: no meta.json
    (data / f".{key}.lock").touch()
    (data / f".{key}.lock").chmod(0o666)
    data.chmod(0o555)
    try:
        result = subprocess.run(_unprivileged([sys.executable, "-c", _TWO_BUILDERS, key]), capture_output=True,
                                text=True, env=subprocess_env(LORAKIT_CACHE=str(tmp_path / "cache")), timeout=120)
    finally:
        data.chmod(0o755)
    assert result.stdout.split() == ["done"], result.stderr
    assert sorted(p.name for p in data.iterdir()) == [f".{key}.lock", key]  # nothing set aside or written beside it


def test_a_read_only_cache_with_a_damaged_entry_tokenizes_privately(tmp_path, tiny_model_dir):
    """A cache shared read-only whose entry is damaged: setting it aside failed with PermissionError (exit 1)."""
    from run_helpers import recipe_dict, write_recipe

    data = write_jsonl(tmp_path / "a.jsonl", alpaca(10))
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model_dir, data, tmp_path / "run"))
    result = _run_over_a_read_only_cache(tmp_path / "cache", ["preview-data", recipe, "-n", "1"],
                                         lambda entry: (entry / "train" / "input_ids.bin").unlink())
    assert result.returncode == 0, result.stderr
    assert "train data: rows 10: kept 10" in result.stdout and "(tokenized data from the cache)" not in result.stdout


def test_precomputed_reference_log_probs_over_a_read_only_cache(tmp_path, tiny_model_dir):
    """Storing them beside the entry raised SafetensorError (exit 1): they are computed and not kept."""
    from run_helpers import pref_recipe, write_pairs, write_recipe

    recipe = pref_recipe(tiny_model_dir, write_pairs(tmp_path / "d.jsonl", 10), tmp_path / "run", max_steps=1,
                         reference="precomputed")
    result = _run_over_a_read_only_cache(tmp_path / "cache", ["train", write_recipe(tmp_path / "r.yaml", recipe)])
    assert result.returncode == 0, result.stderr
    assert "reference log-probs: computed for 8 train and 2 eval pairs" in result.stdout


def test_an_entry_whose_meta_lacks_the_fingerprints_is_rebuilt(tmp_path, tok):
    """A meta.json with its splits but not the fingerprints (edited, or written by another lorakit of the same
    version number) was read as a hit: KeyError 'fingerprint', exit 1."""
    s = DataSection(train=write_jsonl(tmp_path / "a.jsonl", alpaca(10)))
    first = load_datasets(s, tok, seed=0)
    meta = first.train.folder.parent / "meta.json"
    meta.write_text('{"splits": {"train": {}}}')
    again = load_datasets(s, tok, seed=0)
    assert not again.train_stats.cached and again.fingerprint == first.fingerprint


# ----------------------------------------------------------------------------------------------------------
# Chat: one rendering per conversation


CONVERSATIONS = [
    CHAT,
    CHAT[1:3],
    [{"role": "user", "content": "  padded  "}, {"role": "assistant", "content": "  spaced answer \n"}],
    [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "ok"},
     {"role": "assistant", "content": "done"}],
    [{"role": "system", "content": "sys"}, {"role": "assistant", "content": "after system"}],
    [{"role": "user", "content": f"question {i}"} if i % 2 == 0 else {"role": "assistant", "content": f"answer {i}"}
     for i in range(16)],
    [{"role": "user", "content": "no answer"}],
]


@pytest.mark.parametrize("name", ["chatml", "gemma", "llama3", "mistral", "phi3", "zephyr"])
def test_one_rendering_finds_the_same_turns_as_rendering_per_turn(tiny_model_dir, name):
    """Every bundled template: spans from its {% generation %} blocks equal the per-turn definition, and the
    template stored on the tokenizer (tags removed) renders the same text."""
    from lorakit.data import chat
    from lorakit.models.loading import load_tokenizer

    tokenizer = load_tokenizer(ModelSection(name_or_path=str(tiny_model_dir)), str(tiny_model_dir))
    chat.resolve_chat_template(DataSection(train="t.jsonl", format="chat", chat_template=name), tokenizer)
    tagged = chat._tracked_templates()[tokenizer.chat_template]
    assert "{% generation %}" in tagged and "{% generation %}" not in tokenizer.chat_template
    special = tokenizer.special_tokens_map
    for messages in CONVERSATIONS:
        assert chat._tracked_spans(tagged, messages, "t:1", special) == chat._per_turn_spans(
            tokenizer.chat_template, messages, "t:1", special)


@pytest.mark.parametrize("name", ["chatml", "llama3", "mistral"])
def test_per_turn_spans_are_those_of_one_apply_chat_template_call_per_prefix(tiny_model_dir, name):
    """A template lorakit does not ship is rendered per assistant turn, in two batched calls: the spans are the
    definition's, each end from apply_chat_template(messages[:i + 1]) and each start from
    apply_chat_template(messages[:i], add_generation_prompt=True); JSON nulls are dropped as it drops them."""
    from lorakit.data import chat
    from lorakit.models.loading import load_tokenizer

    tokenizer = load_tokenizer(ModelSection(name_or_path=str(tiny_model_dir)), str(tiny_model_dir))
    tokenizer.chat_template = "{# not bundled #}" + chat.bundled_template(name)
    nulls = [{"role": "user", "content": "hi", "name": None}, {"role": "assistant", "content": "yo", "tool_calls": None}]
    for messages in [*CONVERSATIONS[:-1], nulls]:
        full, spans = chat.chat_spans(tokenizer, messages, "t:1")
        render = lambda m, gen=False: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)  # noqa
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        assert full == render(messages)
        assert spans == [(len(render(messages[:i], True)) if i else 0, len(render(messages[: i + 1]))) for i in turns]


def test_bundled_templates_render_each_conversation_once(tiny_model_dir, monkeypatch):
    from lorakit.data import chat, formats
    from lorakit.models.loading import load_tokenizer

    tokenizer = load_tokenizer(ModelSection(name_or_path=str(tiny_model_dir)), str(tiny_model_dir))
    s = DataSection(train="t.jsonl", format="chat", chat_template="chatml")
    chat.resolve_chat_template(s, tokenizer)
    calls = []
    monkeypatch.setattr(chat, "_per_turn_spans", lambda *a, **k: calls.append(a))  # the per-turn path
    rows = [Row(f"t:{n}", {"messages": CONVERSATIONS[5][:n]}) for n in (2, 8, 16)]
    examples = formats.tokenize_batch(rows, s, tokenizer)
    assert not calls and all(isinstance(e, Example) for e in examples)
    supervised = [sum(label != IGNORE_INDEX for label in e.labels) for e in examples]
    assert supervised[0] < supervised[1] < supervised[2]


# ----------------------------------------------------------------------------------------------------------
# Mixtures


def test_sources_are_counted_and_fingerprinted_apart(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca(6))
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "plain text " * k} for k in range(1, 5)] + [{"text": "x " * 999}])
    s = DataSection(train=[a, TrainSource(path=b, format="text", weight=2)], max_seq_len=400, truncation="drop")
    data = load_datasets(s, tok, seed=0)
    counts = data.train_stats.to_json()["per_source"]
    assert counts[a] == {"rows": 6, "kept": 6, "truncated": 0, "dropped": 0, "bad": 0}
    assert counts[b] == {"rows": 5, "kept": 4, "truncated": 0, "dropped": 1, "bad": 0}
    assert f"  {b}: rows 5, kept 4" in data.train_stats.summary()
    assert data.sources.tolist() == [0] * 6 + [1] * 4 and set(data.source_fingerprints) == {a, b}
    assert data.train[6].labels == data.train[6].input_ids  # source b is tokenized as text
    cached = load_datasets(s, tok, seed=0)
    assert cached.train_stats.cached and cached.train_stats.to_json()["per_source"] == counts
    write_jsonl(tmp_path / "b.jsonl", [{"text": "plain text " * k} for k in range(1, 5)] + [{"text": "edited"}])
    edited = load_datasets(s, tok, seed=0)
    assert edited.source_fingerprints[a] == data.source_fingerprints[a]
    assert edited.source_fingerprints[b] != data.source_fingerprints[b]


def test_weighted_epochs_draw_round_rows_times_weight_and_resume_exactly():
    sources = np.array([0] * 10 + [1] * 4, dtype=np.int16)
    sampler = StepSampler(14, micro_batch_size=2, grad_accum=1, seed=3, sources=sources, weights=[0.5, 2.5])
    assert sampler.num_examples == 5 + 10 and sampler.steps_per_epoch == 8
    epoch = sampler.epoch_order(0).tolist()
    assert sum(i < 10 for i in epoch) == 5 and len(set(i for i in epoch if i < 10)) == 5
    assert sorted(epoch.count(i) for i in range(10, 14)) == [2, 2, 3, 3]  # every row twice, then 2 rows again
    again = StepSampler(14, micro_batch_size=2, grad_accum=1, seed=3, sources=sources, weights=[0.5, 2.5])
    assert [again.micro_batches(s) for s in range(20)] == [sampler.micro_batches(s) for s in range(20)]
    assert sampler.epoch_order(1).tolist() != epoch
    plain = StepSampler(14, micro_batch_size=2, grad_accum=1, seed=3)
    ones = StepSampler(14, micro_batch_size=2, grad_accum=1, seed=3, sources=sources, weights=[1, 1])
    assert [ones.micro_batches(s) for s in range(9)] == [plain.micro_batches(s) for s in range(9)]


@pytest.mark.parametrize("weight, message", [
    (0.001, r"data.train\[1\].weight: 0.001 × the 40 rows of .*a.jsonl rounds to no row an epoch, .* at least 0.025"),
    (1e9, r"data.train\[1\].weight: 1e\+09 × the 40 rows of .*a.jsonl makes an epoch of 40,000,000,010 rows"),
])
def test_a_weight_that_draws_no_row_or_an_epoch_too_long_is_refused(tmp_path, tok, weight, message):
    """Exit 2 before the model loads, naming the key and source: before, 0.001 × 40 rows divided by zero (exit 1)
    and 1e9 filled the machine's memory with the epoch's order."""
    a, b = write_jsonl(tmp_path / "a.jsonl", alpaca(40)), write_jsonl(tmp_path / "b.jsonl", alpaca(10, "b"))
    with pytest.raises(UsageError, match=message):
        load_datasets(DataSection(train=[b, TrainSource(path=a, weight=weight)]), tok, seed=0)


@pytest.mark.parametrize("eval_split", [None, 0.2])
def test_an_empty_file_in_a_list_of_sources_is_exit_3(tmp_path, tok, eval_split):
    """Alone, an empty file was exit 3; in a list it contributed nothing, silently (a wrong path that exists). A
    source whose only row data.eval_split holds out is not empty."""
    a, one = write_jsonl(tmp_path / "a.jsonl", alpaca(10)), write_jsonl(tmp_path / "one.jsonl", alpaca(1, "one"))
    (tmp_path / "empty.jsonl").write_text("\n")
    empty = TrainSource(path=str(tmp_path / "empty.jsonl"), weight=2)
    with pytest.raises(DataError, match=r"data.train\[2\]: .*empty.jsonl is empty: it holds no rows; fill it or remove"):
        load_datasets(DataSection(train=[a, one, empty], eval_split=eval_split), tok, seed=0)
    if eval_split:  # a seed that holds out one.jsonl's row: no error
        held = [load_datasets(DataSection(train=[a, one], eval_split=0.5), tok, seed=seed) for seed in range(8)]
        assert any(d.eval_stats.source_counts()[one]["rows"] == 1 for d in held)


def test_weights_with_packing_are_refused():
    with pytest.raises(ValueError, match="data.packing / data.train"):
        DataSection(train=[TrainSource(path="a.jsonl", weight=2)], packing=True)


# ----------------------------------------------------------------------------------------------------------
# Hub ids


def test_one_part_names_are_hub_ids_and_paths_are_local(tmp_path):
    assert not is_local("imdb") and not is_local("stanfordnlp/imdb")
    assert is_local("./imdb") and is_local("/data/x") and is_local("~/x")
    (tmp_path / "imdb").mkdir()
    assert is_local(str(tmp_path / "imdb"))


def test_a_hub_id_offline_is_one_clear_exit_3(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lorakit.data import read_rows

    with pytest.raises(DataError, match=r"cannot load hub dataset 'imdb' \(split 'test', subset 'plain'\)") as e:
        read_rows("imdb", split="test", subset="plain")
    assert e.value.exit_code == 3 and "data.split and data.subset" in str(e.value)


def test_a_hub_id_goes_to_load_dataset_with_split_and_subset(tmp_path, tok, monkeypatch):
    import datasets

    calls = []

    def hub(path, name=None, split=None, **kwargs):  # the hub boundary: what datasets would download
        calls.append((path, name, split))
        return datasets.Dataset.from_list(alpaca(3))

    monkeypatch.setattr(datasets, "load_dataset", hub)
    data = load_datasets(DataSection(train="imdb", split="validation", subset="plain"), tok, seed=0)
    assert calls == [("imdb", "plain", "validation")] and len(data.train) == 3 and not data.train_stats.cached
    assert tokenize_row(Row("x", alpaca(3)[1]), DataSection(train="imdb"), tok) == data.train[1]


def test_the_backend_called_directly_gives_the_tokenizers_ids(tok):
    """formats.token_ids and _ids_and_starts call the Rust backend directly (no per-text dicts, no offsets unless
    asked): the same ids and offsets as the tokenizer's own call, special tokens in the text included, and the
    tokenizer's own call whenever the backend has truncation or padding set."""
    from lorakit.data import formats

    texts = ["Count to 3", "", f"hi{tok.eos_token} there {tok.bos_token or ''}x", "über naïve  spaces\n\nend"]
    for special in (True, False):
        assert formats.token_ids(tok, texts, special) == tok(texts, add_special_tokens=special)["input_ids"]
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    expected = [(ids, [a for a, _ in offsets]) for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"])]
    assert formats._ids_and_starts(tok, texts) == expected
    assert formats._backend(tok) is not None
    backend = tok.backend_tokenizer
    backend.enable_truncation(max_length=3)
    try:
        assert formats._backend(tok) is None
        assert formats.token_ids(tok, texts, True) == tok(texts, add_special_tokens=True)["input_ids"]
    finally:
        backend.no_truncation()


def test_a_step_larger_than_the_data_is_named():
    assert StepSampler(64, micro_batch_size=8, grad_accum=8, seed=0).oversized() is None  # exactly one epoch a step
    text = StepSampler(64, micro_batch_size=1000, grad_accum=1, seed=0).oversized()
    assert text.startswith("train: a step takes micro_batch_size 1000 × grad_accum 1 × 1 process(es) = 1,000 examples, "
                           "more than the 64 an epoch of the train data holds")
    sampler = StepSampler(64, micro_batch_size=1000, grad_accum=1, seed=0)
    assert [len(m) for m in sampler.micro_batches(0)] == [64] and sampler.epochs_done(1) == 1.0  # what the text says
