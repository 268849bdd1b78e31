"""data.format preference: rows to prompt + chosen / prompt + rejected sequences, truncated together, cached, and
collated as 2n sequences (padded or flattened); bad rows exit 3 naming file:line; the recipe keys per objective."""

import json

import pytest
import torch

from lorakit.config.load import parse_recipe
from lorakit.data import IGNORE_INDEX, collate, load_datasets, tokenize_rows
from lorakit.data.formats import answer_of
from lorakit.data.sources import BadRowError, Row
from lorakit.data.pipeline import fit_length
from lorakit.data.shards import idle_batch
from lorakit.errors import DataError, RecipeError
from lorakit.models.loading import load_tokenizer
from run_helpers import write_pairs


def recipe(data, objective="dpo", train=None, **section):
    return parse_recipe({"model": {"name_or_path": "m"},
                         "data": {"train": str(data), "format": "preference", **section},
                         "train": {"max_steps": 1, "objective": objective, **(train or {})}})


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(parse_recipe({"model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": "d"},
                                        "train": {"max_steps": 1}}).model, str(tiny_model_dir))


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


def answer(tokenizer, example):
    return decode(tokenizer, [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


# ----------------------------------------------------------------------------------------------------------
# Recipe keys


@pytest.mark.parametrize("objective, defaults", [
    ("dpo", {"beta": 0.1, "label_smoothing": 0.0, "reference": "base"}),
    ("ipo", {"beta": 0.1, "reference": "base"}),
    ("simpo", {"beta": 2.0, "simpo_gamma": 0.5}),
    ("orpo", {"orpo_lambda": 0.1}),
])
def test_each_objective_gets_its_defaults(tmp_path, objective, defaults):
    train = recipe(tmp_path / "d.jsonl", objective).train
    assert {k: getattr(train, k) for k in defaults} == defaults
    unused = {"beta", "label_smoothing", "simpo_gamma", "orpo_lambda", "reference"} - set(defaults)
    assert all(getattr(train, k) is None for k in unused)


@pytest.mark.parametrize("objective, key, value, message", [
    ("orpo", "beta", 0.2, "train.beta is for dpo/ipo/simpo: not used by train.objective orpo"),
    ("ipo", "label_smoothing", 0.1, "train.label_smoothing is for dpo"),
    ("dpo", "simpo_gamma", 1.0, "train.simpo_gamma is for simpo"),
    ("simpo", "reference", "precomputed", "train.reference is for dpo/ipo"),
    ("dpo", "orpo_lambda", 0.5, "train.orpo_lambda is for orpo"),
])
def test_a_key_the_objective_does_not_use_is_refused(tmp_path, objective, key, value, message):
    with pytest.raises(RecipeError, match=message) as e:
        recipe(tmp_path / "d.jsonl", objective, {key: value})
    assert e.value.exit_code == 2


@pytest.mark.parametrize("objective, formats", [("dpo", ("preference", "chat")), ("sft", ("chat", "preference"))])
def test_a_source_of_the_other_kind_is_refused(tmp_path, objective, formats):
    """A chat source beside pairs under dpo stopped with exit 1 (KeyError: 'rejected') while caching the data."""
    sources = [{"path": "a.jsonl", "format": formats[0]}, {"path": "b.jsonl", "format": formats[1]}]
    with pytest.raises(RecipeError, match=f"data.train\\[1\\].format: b.jsonl has format {formats[1]}, but train."
                                          f"objective {objective} needs .* from every source") as e:
        parse_recipe({"model": {"name_or_path": "m"}, "data": {"train": sources, "format": formats[0]},
                      "train": {"max_steps": 1, "objective": objective}})
    assert e.value.exit_code == 2


def test_eval_generate_is_refused_naming_lorakit_eval(tmp_path):
    with pytest.raises(RecipeError, match="train.eval_generate: not available with preference data .* set it to 0 "
                                          "\\(after training, `lorakit eval RUN --data PAIRS` scores answers\\)"):
        recipe(tmp_path / "d.jsonl", train={"eval_generate": 2}, eval_split=0.2)


def test_objective_and_format_must_match(tmp_path):
    with pytest.raises(RecipeError, match="set data.format: preference"):
        parse_recipe({"model": {"name_or_path": "m"}, "data": {"train": "d"},
                      "train": {"max_steps": 1, "objective": "dpo"}})
    with pytest.raises(RecipeError, match="need a preference objective"):
        recipe(tmp_path / "d.jsonl", "sft")
    with pytest.raises(RecipeError, match="data.packing"):
        recipe(tmp_path / "d.jsonl", packing=True)
    with pytest.raises(RecipeError, match="data.train_on_inputs"):
        recipe(tmp_path / "d.jsonl", train_on_inputs=True)


# ----------------------------------------------------------------------------------------------------------
# Rows to pairs


def test_a_plain_prompt_is_rendered_once_with_the_chat_template(tmp_path, tokenizer):
    data = write_pairs(tmp_path / "d.jsonl", 3)
    (pair,), _ = tokenize_rows([json.loads(data.read_text().splitlines()[2])], recipe(data).data, tokenizer)
    rejected = pair.rejected
    prompt = "<|im_start|>user\nCount to 3<|im_end|>\n<|im_start|>assistant\n"
    assert decode(tokenizer, pair.input_ids[: pair.prompt_len]) == prompt
    assert pair.input_ids[: pair.prompt_len] == rejected.input_ids[: rejected.prompt_len]  # the same prompt tokens
    assert answer(tokenizer, pair) == "0 1 2<|im_end|>\n"  # only the answer, its end-of-turn included
    assert answer(tokenizer, rejected).startswith("the quick brown fox") and answer(tokenizer, rejected).endswith(
        "<|im_end|>\n")


def test_chat_messages_and_assistant_message_answers(tmp_path, tokenizer):
    data = write_pairs(tmp_path / "d.jsonl", 2, chat=True)
    pairs, stats = tokenize_rows([json.loads(line) for line in data.read_text().splitlines()], recipe(data).data,
                                 tokenizer)
    assert stats.kept == 2
    assert decode(tokenizer, pairs[1].input_ids[: pairs[1].prompt_len]).startswith("<|im_start|>system\nAnswer")
    assert answer(tokenizer, pairs[1]) == "0 1<|im_end|>\n"


def test_without_a_chat_template_a_plain_prompt_is_a_completion(tmp_path, tokenizer):
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    data = write_pairs(tmp_path / "d.jsonl", 2)
    section = recipe(data).data
    (pair, _), _ = tokenize_rows([json.loads(line) for line in data.read_text().splitlines()], section, plain)
    assert decode(plain, pair.input_ids[: pair.prompt_len]) == "Count to 1"
    assert answer(plain, pair) == "0<|im_end|>"
    chat = write_pairs(tmp_path / "c.jsonl", 1, chat=True)
    with pytest.raises(Exception, match="has no chat template") as e:
        tokenize_rows([json.loads(chat.read_text())], recipe(chat).data, plain)
    assert e.value.exit_code == 2
    # an answer as assistant messages needs the template too: it was a bad row, "must be a string, got list" (exit 3)
    row = {"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}
    with pytest.raises(Exception, match="row 1 gives 'rejected' \\(chat messages\\) and the tokenizer has no chat "
                                        "template; set data.chat_template") as e:
        tokenize_rows([row], section, plain)
    assert e.value.exit_code == 2


def test_trl_conversational_rows_are_the_same_pairs_as_messages(tmp_path, tokenizer):
    """TRL's conversational preference forms: the prompt as a list of messages, and no prompt at all, chosen and
    rejected whole conversations opening with the same turns (TRL's extract_prompt takes them as the prompt). Both
    were bad rows (exit 3: "field 'prompt' must be a string, got list", "missing field 'prompt'")."""
    user, assistant = ({"role": r, "content": c} for r, c in (("user", "Count to 3"), ("assistant", "hello")))
    system, hi = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}
    said = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    prompt = [system, hi, assistant, user]  # multi-turn, with a system message
    rows = [{"messages": prompt, "chosen": said("0 1 2"), "rejected": said("fox")},
            {"prompt": prompt, "chosen": said("0 1 2"), "rejected": said("fox")},
            {"chosen": prompt + said("0 1 2"), "rejected": prompt + said("fox")},
            # an assistant turn both share after the prompt is part of both answers, not of the prompt
            {"messages": prompt, "chosen": said("ok") + said("0 1 2"), "rejected": said("ok") +
             said("fox")},
            {"chosen": prompt + said("ok") + said("0 1 2"), "rejected": prompt + said("ok") +
             said("fox")}]
    pairs, stats = tokenize_rows(rows, recipe(tmp_path / "d.jsonl").data, tokenizer)
    assert stats.kept == 5
    for got, want in ((pairs[1], pairs[0]), (pairs[2], pairs[0]), (pairs[4], pairs[3])):
        assert (got.input_ids, got.labels, got.prompt_len) == (want.input_ids, want.labels, want.prompt_len)
        assert (got.rejected.input_ids, got.rejected.labels) == (want.rejected.input_ids, want.rejected.labels)
    assert decode(tokenizer, pairs[2].input_ids[: pairs[2].prompt_len]).startswith("<|im_start|>system\nBe brief")
    assert answer(tokenizer, pairs[2]) == "0 1 2<|im_end|>\n"
    assert answer(tokenizer, pairs[4].rejected) == "ok<|im_end|>\n<|im_start|>assistant\nfox<|im_end|>\n"
    # what `lorakit eval` scores a pair against: the chosen answer (it was exit 3 on the implicit form)
    assert [answer_of(Row("d", r), recipe(tmp_path / "d.jsonl").data) for r in rows[:3]] == ["0 1 2"] * 3
    renamed = recipe(tmp_path / "d.jsonl", fields={"prompt": "question", "chosen": "good", "rejected": "bad"}).data
    (pair,), _ = tokenize_rows([{"question": prompt, "good": said("0 1 2"), "bad": said("fox")}], renamed,
                               tokenizer)
    assert (pair.input_ids, pair.rejected.input_ids) == (pairs[0].input_ids, pairs[0].rejected.input_ids)


def test_a_batch_of_pairs_is_tokenized_as_each_row_alone(tmp_path, tokenizer):
    """tokenize_batch encodes prompts and answers in two batched calls: the same examples as row by row, and a
    bad row in the middle stays an error at its place."""
    from lorakit.data.formats import tokenize_batch, tokenize_pair

    plain = [json.loads(line) for line in write_pairs(tmp_path / "p.jsonl", 3).read_text().splitlines()]
    chat = [json.loads(line) for line in write_pairs(tmp_path / "c.jsonl", 2, chat=True).read_text().splitlines()]
    rows = [Row(f"d.jsonl:{i + 1}", r) for i, r in enumerate([plain[0], chat[0], {"prompt": "p"}, plain[2], chat[1]])]
    section = recipe(tmp_path / "d.jsonl").data
    batch = tokenize_batch(rows, section, tokenizer)
    assert isinstance(batch[2], BadRowError) and "d.jsonl:3" in str(batch[2])
    for row, got in zip(rows, batch):
        if row.where != "d.jsonl:3":
            alone = tokenize_pair(row, section, tokenizer)
            assert (got.input_ids, got.labels, got.prompt_len) == (alone.input_ids, alone.labels, alone.prompt_len)
            assert (got.rejected.input_ids, got.rejected.labels) == (alone.rejected.input_ids, alone.rejected.labels)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"}, "assistant messages only"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt' for data.format preference; 'chosen' and 'rejected' "
                                       "are texts \\(TRL's implicit prompt is taken from conversations only"),
    # present but null: it said "missing field 'chosen' ... the row has prompt, chosen, rejected"
    ({"prompt": "p", "chosen": None, "rejected": "b"}, "field 'chosen' is null; data.format preference needs a string"),
    # the answer inside the prompt: it was trained as a second assistant turn after it, silently
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a",
      "rejected": "b"}, "field 'messages' ends with an assistant turn; the prompt ends before the answer"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}],
      "rejected": "b"}, "needs the turns before the answer moved to 'messages', or no 'prompt' and 'messages'"),
    # no prompt, and conversations that share none: it said "missing field 'prompt'"
    ({"chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
     "fields 'chosen' and 'rejected' hold conversations that open differently, so they share no prompt"),
])
def test_a_bad_row_names_its_file_and_line(tmp_path, tokenizer, row, message):
    path = tmp_path / "bad.jsonl"
    data = recipe(path).data
    with pytest.raises(BadRowError, match=message) as e:
        tokenize_rows([Row(f"{path}:7", row)], data, tokenizer)
    assert f"{path}:7" in str(e.value) and e.value.exit_code == 3


def test_pairs_are_truncated_together_prompt_first(tmp_path, tokenizer):
    rows = [{"prompt": "Count to ten: " + "one two three " * 6, "chosen": "0 1", "rejected": "the quick brown fox " * 3}]
    base = tokenize_rows(rows, recipe(tmp_path / "d", max_seq_len=512).data, tokenizer)[0][0]
    longest = max(len(base), len(base.rejected))
    # Just enough trimming of the prompt: both sequences lose the same prompt tokens, answers intact.
    section = recipe(tmp_path / "d", max_seq_len=longest - 5).data
    pair, how = fit_length(base, section)
    assert how == "prompt" and max(len(pair), len(pair.rejected)) == longest - 5
    assert pair.input_ids[: pair.prompt_len] == pair.rejected.input_ids[: pair.rejected.prompt_len]
    assert answer(tokenizer, pair) == answer(tokenizer, base) and answer(tokenizer, pair.rejected) == answer(
        tokenizer, base.rejected)
    # Longer than the prompt can give: truncate_prompt drops, truncate cuts the answers' ends too; counted.
    short = recipe(tmp_path / "d", max_seq_len=len(base.rejected) - base.prompt_len - 2).data
    assert fit_length(base, short) == (None, False)
    cut = recipe(tmp_path / "d", max_seq_len=len(base.rejected) - base.prompt_len - 2, truncation="truncate").data
    pair, how = fit_length(base, cut)
    assert how == "answers" and len(pair.rejected) == cut.max_seq_len
    # ... keeping the prompt's newest tokens, up to half of max_seq_len: the whole prompt was cut away before, and
    # the pair was trained with no question at all
    kept = min(base.prompt_len, cut.max_seq_len // 2)
    assert 0 < pair.prompt_len == pair.rejected.prompt_len == kept
    assert pair.input_ids[:kept] == base.input_ids[base.prompt_len - kept : base.prompt_len]
    assert pair.rejected.input_ids[:kept] == pair.input_ids[:kept]
    _, stats = tokenize_rows(rows * 2, cut, tokenizer)
    assert stats.truncated == 2 and stats.answers_cut == 2 and "2 truncated, 2 of them in the answers" in stats.summary()
    _, stats = tokenize_rows(rows, short, tokenizer)
    assert stats.too_long == 1


def test_pairs_survive_the_cache(tmp_path, tokenizer):
    data = write_pairs(tmp_path / "d.jsonl", 6)
    section = recipe(data, eval_split=0.3).data
    first = load_datasets(section, tokenizer, 0)
    again = load_datasets(section, tokenizer, 0)
    assert again.train_stats.cached and not first.train_stats.cached
    assert [(e.input_ids, e.labels, e.rejected.input_ids, e.rejected.labels, e.prompt_len) for e in again.train] == \
        [(e.input_ids, e.labels, e.rejected.input_ids, e.rejected.labels, e.prompt_len) for e in first.train]
    assert again.fingerprint == first.fingerprint and again.cache_key == first.cache_key
    assert list(first.train_stats.lengths) == [e.longest for e in first.train]  # an array (the store's index)


def test_pairs_with_the_same_chosen_and_rejected_answer_are_counted_or_refused(tmp_path, tokenizer):
    """Such a pair teaches no preference (zero gradient of DPO's loss): one warning naming the first rows, and exit 3
    naming the file when every pair is one (before: trained on silently)."""
    rows = [json.loads(line) for line in write_pairs(tmp_path / "pairs.jsonl", 6).read_text().splitlines()]
    same = [1, 3, 4, 5]
    for i in same:  # the chosen answer given as a string or as the assistant message it renders as
        rows[i]["rejected"] = rows[i]["chosen"] if i % 2 else [{"role": "assistant", "content": rows[i]["chosen"]}]
    data = tmp_path / "some.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for cached in (False, True):
        stats = load_datasets(recipe(data).data, tokenizer, 0).train_stats
        assert stats.cached == cached and stats.identical == 4
        [warning] = [w for w in stats.warnings() if "same chosen and rejected" in w]
        assert warning.startswith(f"4 preference pair(s) have the same chosen and rejected answer and teach no "
                                  f"preference (zero gradient of the preference loss): {data}:2, {data}:4, {data}:5, ...")
    every = tmp_path / "every.jsonl"
    every.write_text("".join(json.dumps({**r, "rejected": r["chosen"]}) + "\n" for r in rows))
    with pytest.raises(DataError) as e:
        load_datasets(recipe(every).data, tokenizer, 0)
    assert e.value.exit_code == 3 and str(e.value) == (
        f"data.train: {every}: every preference pair (6) has the same chosen and rejected answer (first: {every}:1), "
        "so none teaches a preference; give rejected answers that differ from the chosen ones")


@pytest.mark.parametrize("damage", ["store.json", "folder"])
def test_a_cached_pair_store_without_its_rejected_half_is_rebuilt(tmp_path, tokenizer, damage):
    """Opened as plain examples, the preference loss would pair each chosen sequence with another row's: the
    damaged entry is a miss and is tokenized again."""
    import gc
    import shutil

    section = recipe(write_pairs(tmp_path / "d.jsonl", 6)).data
    first = load_datasets(section, tokenizer, 0)
    expected = [(e.input_ids, e.rejected.input_ids) for e in first.train]
    rejected = first.train.folder / "rejected"
    del first
    gc.collect()  # its memory maps closed before the files go
    if damage == "store.json":
        (rejected / "store.json").unlink()
    else:
        shutil.rmtree(rejected)
    again = load_datasets(section, tokenizer, 0)
    assert not again.train_stats.cached
    assert [(e.input_ids, e.rejected.input_ids) for e in again.train] == expected


@pytest.mark.parametrize("padding_free", [False, True])
def test_a_micro_batch_holds_the_chosen_then_the_rejected(tmp_path, tokenizer, padding_free):
    data = write_pairs(tmp_path / "d.jsonl", 3)
    pairs = list(load_datasets(recipe(data).data, tokenizer, 0).train)  # examples of their own: set ref_logps below
    batch = collate(pairs, tokenizer, padding_free)
    sequences = [pairs[0], pairs[1], pairs[2], pairs[0].rejected, pairs[1].rejected, pairs[2].rejected]
    if padding_free:
        assert batch["input_ids"].shape == (1, sum(len(s) for s in sequences))
        assert int((batch["position_ids"] == 0).sum()) == 6
        assert batch["input_ids"][0].tolist() == [t for s in sequences for t in s.input_ids]
    else:
        assert batch["input_ids"].shape[0] == 6
        assert [row[: len(s)].tolist() for row, s in zip(batch["input_ids"], sequences)] == [
            s.input_ids for s in sequences]
    assert "ref_logps" not in batch
    for p, logps in zip(pairs, [(-1.0, -2.0), (-3.0, -4.0), (-5.0, -6.0)]):
        p.ref_logps = logps
    assert collate(pairs, tokenizer, padding_free)["ref_logps"].tolist() == [-1, -3, -5, -2, -4, -6]
    idle = idle_batch(pairs[0])
    assert set(idle.labels) == set(idle.rejected.labels) == {IGNORE_INDEX}
    assert torch.equal(collate([idle], tokenizer)["input_ids"], collate([pairs[0]], tokenizer)["input_ids"])


def test_preview_shows_a_pair(tmp_path, tokenizer):
    from lorakit.tools.preview import preview_rows, render_plain

    data = write_pairs(tmp_path / "d.jsonl", 2)
    [row] = preview_rows(recipe(data).data, tokenizer, 1)
    text = render_plain(1, row, tokenizer)
    assert row.status == "kept" and row.warnings == []
    assert "chosen: <|im_start|>user\nCount to 1<|im_end|>\n<|im_start|>assistant\n[[0<|im_end|>\n]]" in text
    assert "\nrejected: <|im_start|>user\nCount to 1<|im_end|>\n<|im_start|>assistant\n[[the quick" in text
    chosen, rejected = row.example, row.example.rejected
    supervised = [sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in (chosen, rejected)]
    assert f"{len(chosen)} + {len(rejected)} tokens, {supervised[0]} + {supervised[1]} supervised" in text


def test_the_preview_event_gives_each_sequence_of_a_pair(tmp_path, tiny_model_dir, tokenizer):
    """--json-logs' preview event had 'tokens' (and 'supervised') of both sequences summed, where the row header
    gives each: chosen + rejected."""
    from typer.testing import CliRunner

    from lorakit.cli.main import app
    from lorakit.tools.preview import header, preview_rows
    from run_helpers import pref_recipe, write_pairs, write_recipe

    data = write_pairs(tmp_path / "d.jsonl", 2)
    path = write_recipe(tmp_path / "r.yaml", pref_recipe(tiny_model_dir, data, tmp_path / "run"))
    result = CliRunner().invoke(app, ["--json-logs", "preview-data", str(path), "-n", "1", "--no-stats"])
    [event] = [e for e in map(json.loads, result.output.splitlines()) if e["event"] == "preview"]
    [row] = preview_rows(recipe(data).data, tokenizer, 1)
    assert (event["tokens"], event["rejected_tokens"]) == (len(row.example), len(row.example.rejected))
    assert (f"{event['tokens']} + {event['rejected_tokens']} tokens, {event['supervised']} + "
            f"{event['rejected_supervised']} supervised") in header(1, row)
    assert "".join(t for t, _ in event["rejected_spans"]) == decode(tokenizer, row.example.rejected.input_ids)


def test_the_summary_gives_each_pairs_longer_sequence_the_bound_of_max_seq_len(tmp_path, tokenizer):
    """It gave both sequences summed: 'max 128' under data.max_seq_len 64 with nothing truncated read as a
    broken truncation."""
    data = write_pairs(tmp_path / "d.jsonl", 6)
    first = load_datasets(recipe(data).data, tokenizer, 0)
    longest = max(max(len(e), len(e.rejected)) for e in first.train)
    section = recipe(data, max_seq_len=longest).data
    for stats in (load_datasets(section, tokenizer, 0).train_stats,
                  tokenize_rows([json.loads(line) for line in data.read_text().splitlines()], section, tokenizer)[1]):
        assert stats.truncated == 0 and f"max {longest};" in stats.summary()
