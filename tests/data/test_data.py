"""Data pipeline invariants: formats and labels, length policy, bad rows, sources, cache, packing, data order."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lorakit.data import (
    ALPACA_PROMPT,
    IGNORE_INDEX,
    BadRowError,
    Example,
    PackedRows,
    Row,
    StepSampler,
    TokenStore,
    collate,
    first_fit,
    fit_length,
    load_datasets,
    named_chat_templates,
    num_targets,
    pack_examples,
    read_rows,
    resolve_chat_template,
    split_eval,
    tokenize_row,
    tokenize_rows,
)
from lorakit.errors import EXIT_DATA, EXIT_USAGE, DataError, RecipeError, UsageError
from lorakit.config.schema import DataSection, ModelSection
from run_helpers import CHAT, write_jsonl


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from lorakit.models.loading import load_tokenizer

    return load_tokenizer(ModelSection(name_or_path=str(tiny_model_dir)), str(tiny_model_dir))


@pytest.fixture
def fresh_tok(tiny_model_dir):
    """A tokenizer a test may change (chat template, added tokens)."""
    from lorakit.models.loading import load_tokenizer

    return load_tokenizer(ModelSection(name_or_path=str(tiny_model_dir)), str(tiny_model_dir))


def section(**kw) -> DataSection:
    return DataSection(**{"train": "t.jsonl", **kw})


def supervised_text(example: Example, tok) -> str:
    return tok.decode([t for t, lab in zip(example.input_ids, example.labels) if lab != IGNORE_INDEX])


def masked_text(example: Example, tok) -> str:
    return tok.decode([t for t, lab in zip(example.input_ids, example.labels) if lab == IGNORE_INDEX])



# ----------------------------------------------------------------------------------------------------------
# Formats and labels


def test_alpaca_without_input_supervises_only_output_and_eos(tok):
    ex = tokenize_row(Row("t:1", {"instruction": "Say hi", "output": "hi there"}), section(), tok)
    assert masked_text(ex, tok) == ALPACA_PROMPT.format(instruction="Say hi")
    assert supervised_text(ex, tok) == "hi there<|im_end|>"
    assert ex.input_ids[-1] == ex.labels[-1] == tok.eos_token_id
    assert ex.prompt_len == len(ex) - num_targets(ex.labels)


def test_alpaca_with_input_uses_the_input_template(tok):
    ex = tokenize_row(Row("t:1", {"instruction": "Translate", "input": "hello", "output": "bonjour"}), section(), tok)
    assert "### Input:\nhello\n\n### Response:\n" in masked_text(ex, tok)
    assert supervised_text(ex, tok) == "bonjour<|im_end|>"


def test_completion_and_field_mapping(tok):
    s = section(format="completion", fields={"prompt": "q", "completion": "a"})
    ex = tokenize_row(Row("t:1", {"q": "2+2=", "a": " 4"}), s, tok)
    assert masked_text(ex, tok) == "2+2=" and supervised_text(ex, tok) == " 4<|im_end|>"


def test_text_is_fully_supervised_with_one_eos(tok):
    ex = tokenize_row(Row("t:1", {"text": "The quick brown fox."}), section(format="text"), tok)
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tok.eos_token_id
    already = tokenize_row(Row("t:1", {"text": "The fox.<|im_end|>"}), section(format="text"), tok)
    assert already.input_ids.count(tok.eos_token_id) == 1


def test_train_on_inputs_supervises_the_prompt_too(tok):
    row = Row("t:1", {"instruction": "Say hi", "output": "hi"})
    assert tokenize_row(row, section(train_on_inputs=True), tok).labels == tokenize_row(row, section(), tok).input_ids
    chat = tokenize_row(Row("t:1", {"messages": CHAT}), section(format="chat", train_on_inputs=True), tok)
    assert chat.labels == chat.input_ids


def test_chat_keeps_system_and_supervises_every_assistant_turn_with_its_end(tok):
    ex = tokenize_row(Row("t:1", {"messages": CHAT}), section(format="chat"), tok)
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(CHAT, tokenize=False)
    assert "Be brief." in masked_text(ex, tok)
    assert supervised_text(ex, tok) == "Paris.<|im_end|>\nfour<|im_end|>\n"
    assert "<|im_start|>assistant\n" not in supervised_text(ex, tok)  # the generation prompt is not learned
    single = tokenize_row(Row("t:1", {"messages": CHAT[:3]}), section(format="chat"), tok)
    assert supervised_text(single, tok) == "Paris.<|im_end|>\n"
    assert single.prompt_len == len(single) - num_targets(single.labels)


@pytest.mark.parametrize("name", named_chat_templates())
def test_every_shipped_template_locates_the_assistant_turns(name, fresh_tok):
    s = section(format="chat", chat_template=name)
    resolve_chat_template(s, fresh_tok)
    ex = tokenize_row(Row("t:1", {"messages": CHAT}), s, fresh_tok)
    supervised = supervised_text(ex, fresh_tok)
    assert "Paris." in supervised and "four" in supervised
    assert "France" not in supervised and "Be brief." in fresh_tok.decode(ex.input_ids)


def test_named_template_replaces_the_tokenizers_and_is_kept_on_it(fresh_tok):
    s = section(format="chat", chat_template="llama3")
    template = resolve_chat_template(s, fresh_tok)
    assert fresh_tok.chat_template == template and "<|eot_id|>" in template
    ex = tokenize_row(Row("t:1", {"messages": CHAT}), s, fresh_tok)
    assert supervised_text(ex, fresh_tok) == "Paris.<|eot_id|>four<|eot_id|>"


def test_template_needed_when_the_tokenizer_has_none(fresh_tok):
    fresh_tok.chat_template = None
    with pytest.raises(UsageError, match="has no chat template; set data.chat_template to one of chatml"):
        resolve_chat_template(section(format="chat"), fresh_tok)
    assert resolve_chat_template(section(format="chat", chat_template="zephyr"), fresh_tok).startswith("{#-")
    with pytest.raises(UsageError, match="unknown template 'chatm'; did you mean chatml") as e:
        resolve_chat_template(section(format="chat", chat_template="chatm"), fresh_tok)
    assert e.value.exit_code == EXIT_USAGE


def test_template_file_and_non_prefix_template(tmp_path, fresh_tok):
    path = tmp_path / "odd.jinja"
    # Marks the last message: rendering the start of a conversation is not a prefix of the whole.
    path.write_text("{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}")
    s = section(format="chat", chat_template=str(path))
    resolve_chat_template(s, fresh_tok)
    with pytest.raises(UsageError, match="t.jsonl:4.*assistant turns cannot be located"):
        tokenize_row(Row("t.jsonl:4", {"messages": CHAT}), s, fresh_tok)


def test_template_rejecting_a_conversation_is_a_bad_row(fresh_tok):
    s = section(format="chat", chat_template="mistral")
    resolve_chat_template(s, fresh_tok)
    messages = [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]
    with pytest.raises(BadRowError, match="t.jsonl:9: the chat template rejects this conversation.*unknown role"):
        tokenize_row(Row("t.jsonl:9", {"messages": messages}), s, fresh_tok)


# ----------------------------------------------------------------------------------------------------------
# Length policy and accounting


def long_row(n_words: int = 40) -> Row:
    return Row("t:1", {"instruction": "word " * n_words, "output": "short answer"})


def test_drop_policy(tok):
    examples, stats = tokenize_rows([long_row()], section(max_seq_len=32, truncation="drop"), tok)
    assert examples == [] and stats.too_long == 1 and stats.first["too_long"] == "t:1"


def test_truncate_policy_cuts_the_end(tok):
    row = Row("t:1", {"instruction": "a", "output": "word " * 40})
    full = tokenize_row(row, section(), tok)
    limit = full.prompt_len + 10
    (cut,), stats = tokenize_rows([row], section(max_seq_len=limit, truncation="truncate"), tok)
    assert stats.truncated == 1 and cut.input_ids == full.input_ids[:limit] and cut.labels == full.labels[:limit]
    assert tok.eos_token_id not in cut.input_ids  # a cut response does not teach the model to stop there


def test_truncate_prompt_cuts_the_prompt_from_the_left_never_the_response(tok):
    full = tokenize_row(long_row(), section(), tok)
    cut, truncated = fit_length(full, section(max_seq_len=len(full) - 5))
    assert truncated and cut.input_ids == full.input_ids[5:] and cut.labels == full.labels[5:]
    assert num_targets(cut.labels) == num_targets(full.labels) and cut.prompt_len == full.prompt_len - 5
    assert fit_length(full, section(max_seq_len=num_targets(full.labels) - 1)) == (None, False)  # response alone too long


def test_truncate_prompt_keeps_a_leading_bos():
    ex = Example([1, 10, 11, 12, 13, 20, 21], [-100] * 5 + [20, 21], prompt_len=5)
    cut, _ = fit_length(ex, section(max_seq_len=5), bos_token_id=1)
    assert cut.input_ids == [1, 12, 13, 20, 21] and cut.prompt_len == 3


def test_text_rows_keep_their_start_under_truncate_prompt(tok):
    ex = tokenize_row(Row("t:1", {"text": "word " * 50}), section(format="text"), tok)
    cut, truncated = fit_length(ex, section(format="text", max_seq_len=8))
    assert truncated and cut.input_ids == ex.input_ids[:8]


def test_rows_left_without_supervision_are_counted_and_reported(tok):
    rows = [Row("t:1", {"messages": CHAT[:2]}), Row("t:2", {"messages": CHAT})]  # t:1 has no assistant turn
    examples, stats = tokenize_rows(rows, section(format="chat"), tok)
    assert len(examples) == 1 and stats.unsupervised == 1 and stats.kept == 1
    [warning] = stats.warnings()
    assert "1 row(s) had no supervised token" in warning and "first: t:1" in warning
    assert all(num_targets(e.labels) > 0 for e in examples)


def test_rows_with_an_empty_answer_are_reported(tok):
    """"output": "" (or an assistant turn with no text) trained silently on the end-of-turn alone, teaching the model
    to stop at once; such rows are counted and named (and still kept: the data is the user's)."""
    rows = [Row("t:1", {"instruction": "a", "output": "b"}), Row("t:2", {"instruction": "a", "output": ""}),
            Row("t:3", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]})]
    examples, stats = tokenize_rows(rows[:2], section(), tok)
    assert len(examples) == 2 and stats.empty_answers == 1
    assert any("1 kept row(s) have an empty answer (first: t:2)" in w for w in stats.warnings())
    _, chat = tokenize_rows(rows[2:], section(format="chat"), tok)
    assert chat.empty_answers == 1
    _, fine = tokenize_rows(rows[:1], section(), tok)
    assert fine.empty_answers == 0 and fine.warnings() == []


def test_rows_without_supervised_eos_are_reported(tok):
    rows = [Row("t:1", {"instruction": "a", "output": "word " * 40})]
    _, stats = tokenize_rows(rows, section(max_seq_len=60, truncation="truncate"), tok)
    assert stats.no_eos == 1 and any("never supervise the EOS token '<|im_end|>'" in w for w in stats.warnings())


def test_a_large_share_of_truncated_rows_is_warned_with_the_longest_row(tok):
    long = Row("t:2", {"instruction": "word " * 40, "output": "ok"})
    rows = [Row("t:1", {"instruction": "a", "output": "b"}), long, *(Row(f"t:{i}", {"instruction": "c", "output": "d"})
                                                                     for i in range(3, 12))]
    full, short = tokenize_row(long, section(), tok), tokenize_row(rows[0], section(), tok)
    limit = len(short.input_ids) + 4
    _, stats = tokenize_rows(rows, section(max_seq_len=limit), tok)  # 1 of 11 cut: 9%, routine
    assert stats.truncated == 1 and not any("were cut" in w for w in stats.warnings())
    _, stats = tokenize_rows(rows[:5], section(max_seq_len=limit), tok)  # 1 of 5: 20%
    warning = next(w for w in stats.warnings() if "were cut" in w)
    assert f"1 of 5 kept rows (20%) were longer than data.max_seq_len {limit}" in warning
    assert "data.truncation: truncate_prompt; first: t:2" in warning
    assert f"the longest row has {len(full.input_ids)} tokens" in warning


def test_summary_counts_every_row_and_shows_the_length_distribution(tmp_path, tok):
    rows = [{"instruction": "hi", "output": "yo"}] * 3 + [{"instruction": "word " * 60, "output": "x"}]
    s = section(train=write_jsonl(tmp_path / "a.jsonl", rows), max_seq_len=48, truncation="drop")
    stats = load_datasets(s, tok, seed=0).train_stats
    assert (stats.rows, stats.kept, stats.too_long) == (4, 3, 1)
    assert "kept 3 (0 truncated), dropped 1 longer than data.max_seq_len 48" in stats.summary()
    assert "tokens/example min" in stats.summary() and "p90" in stats.summary()


def test_empty_or_fully_dropped_data_is_exit_3(tmp_path, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl is empty") as e:
        load_datasets(section(train=str(empty)), tok, seed=0)
    assert e.value.exit_code == EXIT_DATA
    long = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "word " * 60, "output": "x"}])
    with pytest.raises(DataError, match="no usable rows.*dropped 1 longer than data.max_seq_len 16"):
        load_datasets(section(train=long, max_seq_len=16, truncation="drop"), tok, seed=0)


def test_chat_rows_without_an_assistant_message_say_so(tmp_path, tok):
    """Roles named bot or Assistant left every row unsupervised, and the error named no cause; it also held the
    summary's warning line inside its parenthesis, then a second remedy."""
    rows = [{"messages": [{"role": "User", "content": "hi"}, {"role": "bot", "content": "yo"}]}] * 2
    data = write_jsonl(tmp_path / "roles.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_datasets(section(train=data, format="chat", cache=False), tok, seed=0)
    assert str(e.value) == (
        f"data.train: {data} has no usable rows (rows 2: kept 0 (0 truncated), dropped 2 with no supervised tokens); "
        f"2 row(s) had no supervised token and were left out (first: {data}:1: no message has role 'assistant' "
        "(roles: User, bot); only assistant turns are learned); check data.format, data.chat_template and "
        "data.max_seq_len")
    load_datasets(section(train=data, format="chat", cache=False, train_on_inputs=True), tok, seed=0)  # all learned


# ----------------------------------------------------------------------------------------------------------
# Bad rows: direct and through the real CLI


BAD_ROWS = {
    "invalid_json": ('{"instruction": "a", "output": ', "bad.jsonl:2: invalid JSON"),
    "not_object": ('["a", "b"]', "bad.jsonl:2: expected a JSON object, got an array"),  # JSON's words: was 'list'
    "null": ("null", "bad.jsonl:2: expected a JSON object, got null"),  # was 'got NoneType'
    "number": ("3", "bad.jsonl:2: expected a JSON object, got a number"),  # was 'got int'
    "missing_field": ('{"instruction": "a"}', "bad.jsonl:2: missing field 'output' for data.format alpaca"),
    "wrong_type": ('{"instruction": "a", "output": 7}', "bad.jsonl:2: field 'output' must be a string, got int"),
}
GOOD = '{"instruction": "a", "output": "b"}'


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_is_exit_3_naming_file_line_and_field_or_skipped(case, tmp_path, tok):
    line, expected = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, line, GOOD])
    with pytest.raises(DataError, match=expected) as e:
        load_datasets(section(train=path), tok, seed=0)
    assert e.value.exit_code == EXIT_DATA and "data.skip_bad_rows: true" in str(e.value)
    stats = load_datasets(section(train=path, skip_bad_rows=True), tok, seed=0).train_stats
    assert (stats.rows, stats.kept, stats.bad) == (3, 2, 1)
    assert f"skipped 1 malformed row(s); first: {tmp_path}/{expected}" in stats.warnings()[0]


def test_bad_chat_messages(tok):
    for messages, expected in (
        ([], "'messages' is an empty list"),
        (["hi"], r"'messages'\[0\] must be an object with string 'role' and 'content', got 'hi'"),
        ([{"role": "user"}], r"'messages'\[0\] \(user\) has no 'content'; give its text as a string"),
        ([{"content": "hi"}], r"'messages'\[0\] has no string 'role' \(got None\)"),
        ([{"role": "user", "content": None}], r"'messages'\[0\] \(user\) has 'content': null; give its text"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
         r"'messages'\[0\] content part 0 is \{\"type\": \"image_url\".*not a text part; lorakit trains on text"),
    ):
        with pytest.raises(BadRowError, match=f"t.jsonl:3: field {expected}"):
            tokenize_row(Row("t.jsonl:3", {"messages": messages}), section(format="chat"), tok)
    with pytest.raises(BadRowError, match="field 'messages' must be a list, got str"):
        tokenize_row(Row("t.jsonl:3", {"messages": "hi"}), section(format="chat"), tok)


def test_openai_content_parts_are_their_text(tok):
    """Content as OpenAI's API writes it, a list of text parts, was a bad row ('must be an object with string 'role'
    and 'content''); it is the parts' text joined with newlines (what vLLM renders for a string template), in
    training, in the answer eval scores and in generate's prompt files."""
    from lorakit.data.formats import answer_of

    parts = lambda *texts: [{"type": "text", "text": t} for t in texts]  # noqa: E731
    as_parts = [{"role": "user", "content": parts("What is", "2 + 2?")}, {"role": "assistant", "content": parts("4")}]
    as_text = [{"role": "user", "content": "What is\n2 + 2?"}, {"role": "assistant", "content": "4"}]
    rows = [Row("t.jsonl:1", {"messages": as_parts}), Row("t.jsonl:2", {"messages": as_text})]
    with_parts, with_text = (tokenize_row(row, section(format="chat"), tok) for row in rows)
    assert (with_parts.input_ids, with_parts.labels) == (with_text.input_ids, with_text.labels)
    assert answer_of(rows[0], section(format="chat")) == "4"
    pair = {"messages": as_parts[:1], "chosen": [as_parts[1]], "rejected": [{"role": "assistant", "content": parts("5")}]}
    same = {"messages": as_text[:1], "chosen": "4", "rejected": "5"}
    got, expected = (tokenize_row(Row("p", row), section(format="preference"), tok) for row in (pair, same))
    assert (got.input_ids, got.rejected.input_ids) == (expected.input_ids, expected.rejected.input_ids)


def test_openai_content_parts_in_generate_prompts(tmp_path):
    from lorakit.tools.generate import read_requests

    path = tmp_path / "prompts.jsonl"
    write_jsonl(path, [{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}])
    (request,) = read_requests(path, "a", {"a"})
    assert request.messages == [{"role": "user", "content": "hi"}]


def test_json_array_rows_are_located_by_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  "oops"\n]\n')
    with pytest.raises(BadRowError, match="rows.json:3: expected a JSON object, got a string"):
        read_rows(str(path))
    assert [r.where for r in read_rows(str(path), skip_bad_rows=True).rows] == [f"{path}:2"]
    path.write_text('{"a": 1}\n{"a": 2}\n')
    with pytest.raises(DataError, match="rows.json:2: invalid JSON.*name it .jsonl"):
        read_rows(str(path))


@pytest.mark.parametrize("skip", [False, True])
def test_a_json_array_named_jsonl_says_to_name_it_json(tmp_path, skip):
    """It said 'bad.jsonl:1: invalid JSON (Expecting value at column 1)', or with data.skip_bad_rows skipped every
    line as a fragment of the array."""
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": "d"}\n]\n')
    with pytest.raises(DataError, match="rows.jsonl: holds a JSON array, not one JSON object per line; name it .json"):
        list(read_rows(str(path), skip_bad_rows=skip).rows)


def cli_recipe(tmp_path: Path, model_dir, **data) -> str:
    recipe = {"model": {"name_or_path": str(model_dir)}, "data": data, "train": {"max_steps": 1}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_through_the_cli(case, tmp_path, tiny_model_dir):
    from lorakit.cli.main import app

    line, expected = BAD_ROWS[case]
    recipe = cli_recipe(tmp_path, tiny_model_dir, train=write_jsonl(tmp_path / "bad.jsonl", [GOOD, line]))
    result = CliRunner().invoke(app, ["preview-data", recipe, "-n", "1"])
    assert result.exit_code == EXIT_DATA, result.output
    assert expected in " ".join(result.output.split())
    skipped = CliRunner().invoke(app, ["preview-data", recipe, "-n", "1", "--set", "data.skip_bad_rows=true"])
    assert skipped.exit_code == 0 and "skipped 1 malformed" in skipped.output


def test_missing_file_and_unreachable_hub_id_are_exit_3(tmp_path, tok):
    with pytest.raises(DataError, match="file 'nope.jsonl' not found"):
        load_datasets(section(train="nope.jsonl"), tok, seed=0)
    with pytest.raises(DataError, match="cannot load hub dataset 'lorakit-tests/no-such-dataset'"):
        read_rows("lorakit-tests/no-such-dataset")  # offline in tests: datasets cannot reach the hub


def _as_another_user(check) -> None:
    """Run ``check()`` where file permissions apply: as is for a plain user; for root (who reads any file) in a
    forked child that has dropped to nobody (uid 65534). Its assertion fails the test."""
    import os
    import traceback

    if os.geteuid() != 0:
        check()
        return
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's teardown
        os.close(read)
        try:
            os.setgid(65534)
            os.setuid(65534)
            check()
            report = b""
        except BaseException:
            report = traceback.format_exc().encode()
        os.write(write, report or b"ok")
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        report = f.read().decode()
    os.waitpid(pid, 0)
    assert report == "ok", report


def test_an_unreadable_data_file_is_exit_3_naming_it(tok):
    """A data file this user may not read (chmod 000, another user's) was 'unexpected failure: PermissionError'
    (exit 1) when its content was hashed for the cache key; the eval file, a save_to_disk folder and a file in a
    folder closed to this user likewise."""
    import os
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="lorakit-test-"))  # not under pytest's folder, which only its owner enters
    try:
        os.chmod(root, 0o755)
        good, closed, locked = root / "good.jsonl", root / "closed.jsonl", root / "locked"
        locked.mkdir()
        for path in (good, closed, locked / "rows.jsonl"):
            write_jsonl(path, [{"instruction": "a", "output": "b"}])
        os.chmod(good, 0o644)
        os.chmod(closed, 0)
        os.chmod(locked, 0)

        def check():
            for data in (section(train=str(closed)), section(train=str(good), eval=str(closed))):
                with pytest.raises(DataError, match=rf"^data: cannot read '{closed}' \(Permission denied\); give this "
                                   rf"user read permission \(chmod a\+r {closed}, and a\+x on the folders above"):
                    load_datasets(data, tok, seed=0)
            with pytest.raises(DataError, match=r"cannot read .*\(chmod -R a\+rX "):
                read_rows(str(locked))
            with pytest.raises(DataError, match="locked/rows.jsonl"):
                load_datasets(section(train=str(locked / "rows.jsonl")), tok, seed=0)

        _as_another_user(check)
    finally:
        os.chmod(locked, 0o755)
        shutil.rmtree(root)


# ----------------------------------------------------------------------------------------------------------
# Sources, mixing, eval split


def test_csv_parquet_and_save_to_disk_sources(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"instruction": ["a", "b"], "output": ["x", "y"]})
    ds.to_csv(str(tmp_path / "d.csv"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    for source in ("d.csv", "d.parquet", "saved"):
        rows = read_rows(str(tmp_path / source)).rows
        assert [r.data for r in rows] == [{"instruction": "a", "output": "x"}, {"instruction": "b", "output": "y"}]
    assert read_rows(str(tmp_path / "d.csv")).rows[1].where.endswith("d.csv:3")


def test_csv_cells_are_read_as_the_text_they_are(tmp_path, tok):
    """A CSV answer "3" was read by pandas as a number (the row refused: 'must be a string, got int'), and "NA",
    "None" or "null" as a missing value (refused, or an optional input silently emptied); a row with a cell too many
    was shifted a column (pandas took its first cell as the index) and trained on; rows after a blank line or a
    quoted line break were named by the wrong line; a file with a header alone said 'Instruction "train" corresponds
    to no data!'."""
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\nAdd 1 and 2,,3\n\nSay it,NA,None\n"two\nlines",null,007\n')
    rows = read_rows(str(path)).rows
    assert [r.data for r in rows] == [{"instruction": "Add 1 and 2", "input": "", "output": "3"},
                                      {"instruction": "Say it", "input": "NA", "output": "None"},
                                      {"instruction": "two\nlines", "input": "null", "output": "007"}]
    assert [r.where.rsplit(":", 1)[1] for r in rows] == ["2", "4", "5"]
    examples, _ = tokenize_rows(rows, section(format="alpaca"), tok)
    assert supervised_text(examples[0], tok) == "3" + tok.eos_token

    path.write_text("instruction,input,output\nSay hi,,hi\nSay, bye,,bye\n")
    with pytest.raises(DataError, match=r"d.csv:3: 4 cells where the header has 3 \(instruction, input, output\); "
                       r"quote a cell holding a comma"):
        read_rows(str(path))
    path.write_text("instruction,input,output\nSay hi,hi\n")
    with pytest.raises(DataError, match=r"d.csv:2: 2 cells where the header has 3 .*give every column a cell"):
        read_rows(str(path))
    path.write_text("instruction,input,output\n")
    with pytest.raises(DataError, match=r"d.csv is empty: it holds no rows"):
        load_datasets(section(train=str(path), format="alpaca"), tok, seed=0)


def test_data_suffixes_are_read_in_any_case(tmp_path, tiny_model_dir):
    """train.JSONL, data.Parquet, x.CSV read as their lower-case names do (before: refused as neither a data file
    nor a hub id, and a missing train.JSONL was looked up on the hub), in train and in eval."""
    import datasets

    from run_helpers import cli, recipe_dict, write_recipe

    rows = [{"instruction": f"Say {w}", "output": w} for w in ("yes", "no", "maybe", "never")]
    ds = datasets.Dataset.from_list(rows)
    write_jsonl(tmp_path / "train.JSONL", rows)
    ds.to_parquet(str(tmp_path / "data.Parquet"))
    ds.to_csv(str(tmp_path / "x.CSV"), index=False)
    (tmp_path / "rows.Json").write_text(json.dumps(rows))
    for name in ("train.JSONL", "data.Parquet", "x.CSV", "rows.Json"):
        assert [r.data for r in read_rows(str(tmp_path / name)).rows] == rows, name
    assert read_rows(str(tmp_path / "x.CSV")).rows[1].where.endswith("x.CSV:3")
    with pytest.raises(DataError, match="file 'nope.JSONL' not found"):
        read_rows("nope.JSONL")

    recipe = recipe_dict(tiny_model_dir, tmp_path / "train.JSONL", tmp_path / "run", max_steps=1)
    recipe["data"]["train"] = [str(tmp_path / "train.JSONL"), str(tmp_path / "data.Parquet")]
    result = cli("train", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 0, result.output
    result = cli("eval", tmp_path / "run", "--data", tmp_path / "x.CSV", "--max-new-tokens", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["scored_rows"] == 4


def test_a_glob_pattern_names_the_files_it_matches(tmp_path, tok):
    """data.train: data/*.jsonl said "file 'data/*.jsonl' not found at ..." although the files are there."""
    for name in ("a.jsonl", "b.jsonl"):
        write_jsonl(tmp_path / name, [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match=rf"^data: '{tmp_path}/\*.jsonl' is a pattern; lorakit reads the files it is "
                       rf"given, not patterns: list them in data.train \(it takes a list\); it matches "
                       rf"{tmp_path}/a.jsonl, {tmp_path}/b.jsonl$"):
        load_datasets(section(train=str(tmp_path / "*.jsonl")), tok, seed=0)
    with pytest.raises(DataError, match=r"'.*/\*.csv' is a pattern; .*; it matches no file$"):
        read_rows(str(tmp_path / "*.csv"))


def test_an_empty_json_file_and_a_trailing_comma_say_so(tmp_path, tok):
    """An empty .json file said 'invalid JSON (Expecting value at column 1)' where an empty .jsonl says it is empty;
    a comma after an array's last item said only 'Expecting value'."""
    path = tmp_path / "rows.json"
    path.write_text("\n")
    with pytest.raises(DataError, match=r"rows.json is empty: it holds no rows"):
        load_datasets(section(train=str(path)), tok, seed=0)
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n]\n')
    with pytest.raises(DataError, match=r"rows.json:3: invalid JSON \(Expecting value at column 1\); JSON allows no "
                       "comma after the last item: remove it$"):
        read_rows(str(path))


def test_a_folder_of_data_files_names_them(tmp_path):
    """A folder of .jsonl files given as data.train said only datasets' 'neither a `Dataset` directory nor a
    `DatasetDict` directory'."""
    folder = tmp_path / "mine"
    folder.mkdir()
    with pytest.raises(DataError, match=r"'.*mine' is a directory but not a datasets.save_to_disk folder, and holds "
                       r"no .jsonl/.json/.csv/.parquet file; name the data file itself$"):
        read_rows(str(folder))
    for name in ("b.jsonl", "a.csv", "notes.txt"):
        (folder / name).write_text("x\n")
    with pytest.raises(DataError, match=rf"name its data files instead: {folder}/a.csv, {folder}/b.jsonl "
                       r"\(data.train takes a list\)$"):
        read_rows(str(folder))


@pytest.mark.parametrize("content, message", [
    (b"instruction,output\n\xff,b\n", r"bad.csv is not UTF-8 text \(byte 0xff on line 2\)"),
    ("instruction,output\na,b\n".encode("utf-16"), "bad.csv is UTF-16"),
    (b'instruction,output\n"a,b\n', r"bad.csv:2: not valid CSV \(unexpected end of data\); a quoted cell ends with"),
    (b'instruction,output\n"a"b,c\n', r"bad.csv:2: not valid CSV \(',' expected after '\"'\)"),
])
def test_unreadable_csv_names_why(tmp_path, content, message):
    (tmp_path / "bad.csv").write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_rows(str(tmp_path / "bad.csv"))


def test_several_train_files_are_mixed(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "from a"}] * 3)
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "b", "output": "from b"}] * 5)
    data = load_datasets(section(train=[a, b]), tok, seed=0)
    assert data.train_stats.rows == 8 and len(data.train) == 8
    sampler = StepSampler(len(data.train), micro_batch_size=2, grad_accum=1, seed=0)
    seen = [supervised_text(data.train[i], tok) for s in range(4) for mb in sampler.micro_batches(s) for i in mb]
    assert sorted(seen) == sorted(["from a<|im_end|>"] * 3 + ["from b<|im_end|>"] * 5)
    assert seen[:3] != ["from a<|im_end|>"] * 3  # shuffled, not file order


def test_eval_split_is_seeded_and_disjoint():
    rows = [Row(f"t:{i}", {"i": i}) for i in range(50)]
    train, held = split_eval(rows, 0.2, seed=1)
    assert len(held) == 10 and {r.where for r in train} | {r.where for r in held} == {r.where for r in rows}
    assert not {r.where for r in train} & {r.where for r in held}
    assert split_eval(rows, 0.2, seed=1) == (train, held) and split_eval(rows, 0.2, seed=2)[1] != held


def test_eval_file_and_split_through_load_datasets(tmp_path, tok):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    data = load_datasets(section(train=train, eval_split=0.3), tok, seed=3)
    assert (len(data.train), len(data.eval)) == (7, 3)
    assert load_datasets(section(train=train, eval_split=0.3), tok, seed=3).eval == data.eval
    data = load_datasets(section(train=train, eval=write_jsonl(tmp_path / "ev.jsonl", rows[:2])), tok, seed=0)
    assert (len(data.train), len(data.eval)) == (10, 2)


def test_recipe_rejects_conflicting_data_keys():
    with pytest.raises(RecipeError, match="data.eval / data.eval_split"):
        from lorakit.config.load import parse_recipe

        parse_recipe({"model": {"name_or_path": "m"}, "train": {"max_steps": 1},
                      "data": {"train": "t.jsonl", "eval": "e.jsonl", "eval_split": 0.1}})
    with pytest.raises(RecipeError, match="data.packing / data.group_by_length"):
        parse_recipe({"model": {"name_or_path": "m"}, "train": {"max_steps": 1},
                      "data": {"train": "t.jsonl", "packing": True, "group_by_length": True}})


# ----------------------------------------------------------------------------------------------------------
# Cache


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


def test_cache_hit_miss_and_invalidation(tmp_path, cache_root, tiny_model_dir):
    from lorakit.models.loading import load_tokenizer

    load_tok = lambda: load_tokenizer(ModelSection(name_or_path=str(tiny_model_dir)), str(tiny_model_dir))  # noqa
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, [{"messages": CHAT}, {"messages": CHAT[:3]}])
    s = section(train=str(path), format="chat")
    first = load_datasets(s, load_tok(), seed=0)
    again = load_datasets(s, load_tok(), seed=0)  # a freshly loaded, identical tokenizer
    assert not first.train_stats.cached and again.train_stats.cached
    assert again.train == first.train and again.train_stats.summary().startswith(first.train_stats.summary())
    assert {p.suffix for p in cache_root.rglob("*") if p.is_file()} == {".bin", ".json", ".lock"}  # no pickle
    assert load_datasets(section(train=str(path), format="chat", packing=True), load_tok(), 0).train_stats.cached

    def rebuilt(s, tokenizer) -> bool:
        return not load_datasets(s, tokenizer, seed=0).train_stats.cached

    assert rebuilt(section(train=str(path), format="chat", max_seq_len=1000), load_tok())  # data section
    changed_template = load_tok()
    changed_template.chat_template = changed_template.chat_template.replace("\n", "\n\n", 1)
    assert rebuilt(s, changed_template)  # chat template text
    assert rebuilt(section(train=str(path), format="chat", chat_template="zephyr"), load_tok())
    more_tokens = load_tok()
    more_tokens.add_tokens(["Paris"])
    assert rebuilt(s, more_tokens)  # tokenizer
    write_jsonl(path, [{"messages": CHAT}])
    assert rebuilt(s, load_tok())  # file content
    assert load_datasets(s, load_tok(), seed=0).train_stats.cached  # and the new entry is reused
    assert rebuilt(section(train=str(path), format="chat", cache=False), load_tok())


def copy_of_the_tokenizing_code(to: Path) -> Path:
    """The files cache.code_fingerprint reads, copied under ``to`` (a package root elsewhere, as in a wheel)."""
    import shutil

    from lorakit.data.cache import PACKAGE_ROOT, TOKENIZING_CODE

    for name in TOKENIZING_CODE:
        (to / name).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (PACKAGE_ROOT / name).is_dir() else shutil.copy
        copy(PACKAGE_ROOT / name, to / name)
    return to


def test_the_key_follows_the_code_that_tokenizes(tmp_path, tok):
    """Every dev commit is lorakit 0.1.0: the version alone kept entries built under rules changed since."""
    from lorakit.data.cache import cache_key, code_fingerprint, this_code

    root = copy_of_the_tokenizing_code(tmp_path / "lorakit")
    assert code_fingerprint(root) == this_code()  # the same source anywhere (a checkout, site-packages)
    key = lambda code: cache_key(section(), tok, [None], 0, ["h"], code)  # noqa: E731
    assert key(code_fingerprint(root)) == key(None)
    with (root / "data" / "formats.py").open("a") as f:
        f.write("\n# a changed rule\n")
    changed = code_fingerprint(root)
    (root / "data" / "chat_templates" / "new.jinja").write_text("{{ messages }}")
    assert len({this_code(), changed, code_fingerprint(root)}) == 3  # a code file; a bundled template
    assert key(changed) != key(None)


def test_an_entry_built_by_other_tokenizing_code_is_rebuilt(tmp_path, cache_root, tok):
    """A preference row ending in an assistant turn, refused now, still trained from an entry built before."""
    from lorakit.data.cache import cache_key, code_fingerprint
    from lorakit.data.sources import content_hash

    path = tmp_path / "chat.jsonl"
    write_jsonl(path, [{"messages": CHAT}])
    s = section(train=str(path), format="chat")
    first = load_datasets(s, tok, seed=0)
    root = copy_of_the_tokenizing_code(tmp_path / "old")
    (root / "data" / "formats.py").write_text("# the rules of an older commit\n")
    old = cache_key(s, tok, [tok.chat_template], 0, [content_hash(str(path))], code_fingerprint(root))
    (cache_root / first.cache_key).rename(cache_root / old)  # what the older commit left in the cache
    again = load_datasets(s, tok, seed=0)
    assert not again.train_stats.cached and again.cache_key != old and list(again.train) == list(first.train)


def test_the_code_fingerprint_covers_every_module_tokenizing_runs_through():
    """A module added to the tokenizing path is fingerprinted, or named here with why it does not shape an entry."""
    from lorakit.data.cache import TOKENIZING_CODE
    from test_architecture import imports_of

    shaping_nothing = {
        "lorakit": "the version, keyed itself", "lorakit.data.cache": "its layout is CACHE_FORMAT",
        "lorakit.config.methods": "the data section's values are keyed (cache._keyed)",
        "lorakit.config.schema": "ditto", "lorakit.config.schema_base": "ditto", "lorakit.config.schema_train": "ditto",
        "lorakit.data.batching": "packing and data order act on an entry after it is built",
        "lorakit.cpus": "data.num_proc: the result does not depend on it", "lorakit.console": "output only",
        "lorakit.errors": "exception classes", "lorakit.atomic": "publishes the entry whole",
    }
    reached, todo = set(), ["lorakit.data.pipeline"]
    while todo:
        if (name := todo.pop()) not in reached:
            reached.add(name)
            todo += imports_of(name)
    fingerprinted = {"lorakit." + name.removesuffix(".py").replace("/", ".") for name in TOKENIZING_CODE}
    assert reached - set(shaping_nothing) == fingerprinted - {"lorakit.data.chat_templates"}


# ----------------------------------------------------------------------------------------------------------
# Packing, collation, data order


def test_first_fit_packs_every_item_once_within_capacity():
    sizes = [7, 5, 3, 3, 2, 9, 1, 4, 10, 6]
    bins = first_fit(sizes, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in b) <= 10 for b in bins)
    assert bins[0] == [0, 2] and bins[1] == [1, 3, 4]  # each item in the first bin with room


def test_packed_rows_keep_every_example_and_collate_to_a_padding_free_row():
    examples = [Example(list(range(100 * k, 100 * k + n)), [-100] * 2 + list(range(100 * k + 2, 100 * k + n)))
                for k, n in enumerate([5, 9, 3, 7, 4])]
    packed = pack_examples(examples, 12, seed=0)
    assert all(len(r) <= 12 and sum(r.seq_lens) == len(r) for r in packed)
    assert sorted(t for r in packed for t in r.input_ids) == sorted(t for e in examples for t in e.input_ids)
    assert pack_examples(examples, 12, seed=0) == packed
    assert isinstance(packed, PackedRows) and packed.lengths.tolist() == [len(r) for r in packed]
    batch = collate(packed[:2], tokenizer=None)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: see collate()
    starts = [0]
    for n in [n for r in packed[:2] for n in r.seq_lens]:
        starts.append(starts[-1] + n)
    positions, labels = batch["position_ids"][0].tolist(), batch["labels"][0].tolist()
    assert [i for i, p in enumerate(positions) if p == 0] == starts[:-1]
    assert all(labels[i] == IGNORE_INDEX for i in starts[:-1])  # no example is the target of the one before
    everything = collate(packed, tokenizer=None)
    assert int((everything["labels"][:, 1:] != IGNORE_INDEX).sum()) == sum(num_targets(e.labels) for e in examples)


def test_pack_examples_returns_the_same_view_over_a_list_and_a_store(tmp_path):
    from lorakit.data.store import write_examples

    examples = [Example(list(range(n)), [-100] + list(range(1, n))) for n in [5, 9, 3, 7, 4, 8]]
    write_examples(tmp_path / "store", examples)
    from_list = pack_examples(examples, 12, seed=3)
    from_store = pack_examples(TokenStore(tmp_path / "store"), 12, seed=3)
    assert type(from_list) is type(from_store) is PackedRows
    assert from_list == from_store and from_list.lengths.tolist() == from_store.lengths.tolist()


def test_unpacked_collate_pads_to_the_longest_of_the_micro_batch(tok):
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], tok)
    assert batch["input_ids"].shape == (2, 3)
    assert batch["labels"][1].tolist() == [8, -100, -100] and batch["attention_mask"][1].tolist() == [1, 0, 0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_unpacked(attn, tiny_model_dir, tok):
    import torch
    from peft import LoraConfig, get_peft_model

    from lorakit.models.loading import load_base_model

    rows = [Row(f"t:{i}", {"prompt": f"Question {i}: what is the capital of France? " * (i % 3 + 1),
                            "completion": " Paris" * (i + 1)}) for i in range(6)]
    examples, _ = tokenize_rows(rows, section(format="completion", max_seq_len=64), tok)
    packed = pack_examples(examples, 64, seed=0)
    assert any(len(r.seq_lens) > 1 for r in packed)
    model = load_base_model(ModelSection(name_or_path=str(tiny_model_dir), attn_implementation=attn),
                            str(tiny_model_dir))
    torch.manual_seed(0)  # random A and B, so every LoRA weight gets a gradient
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                             lora_dropout=0.0))
    n_items = sum(num_targets(e.labels) for e in examples)

    def loss_and_grads(batches):
        model.zero_grad()
        total = 0.0
        for batch in batches:
            loss = model(**batch, num_items_in_batch=n_items).loss
            loss.backward()
            total += loss.item()
        return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    unpacked_loss, unpacked_grads = loss_and_grads([collate([e], tok) for e in examples])
    packed_batch = collate(packed, tok)
    assert int((packed_batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == n_items  # train.supervised_targets
    packed_loss, packed_grads = loss_and_grads([packed_batch])
    assert abs(packed_loss - unpacked_loss) < 1e-5
    for name, grad in unpacked_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=0)
    # The training loop's chunked loss (head applied outside the model) sees the same packed batch.
    from lorakit.training.loss import build_loss

    chunked = build_loss(model, chunked=True)
    with torch.no_grad():
        assert chunked.kind == "chunked" and abs(chunked(model, packed_batch, n_items).item() - unpacked_loss) < 1e-5
    # Control: with a 2D attention mask transformers stops isolating the examples, and the test sees it.
    leaky = model(**packed_batch, attention_mask=torch.ones_like(packed_batch["input_ids"]),
                  num_items_in_batch=n_items).loss.item()
    assert abs(leaky - unpacked_loss) > 1e-3


def test_step_sampler_groups_by_length_deterministically():
    lengths = [(i * 37) % 101 + 1 for i in range(200)]
    plain = StepSampler(200, micro_batch_size=4, grad_accum=2, seed=5)
    grouped = StepSampler(200, micro_batch_size=4, grad_accum=2, seed=5, lengths=lengths)
    for sampler in (plain, grouped):
        epoch = [i for s in range(sampler.steps_per_epoch) for mb in sampler.micro_batches(s) for i in mb]
        assert sorted(epoch) == list(range(200))

    def padding(sampler):
        mbs = [mb for s in range(sampler.steps_per_epoch) for mb in sampler.micro_batches(s)]
        return sum(max(lengths[i] for i in mb) * len(mb) - sum(lengths[i] for i in mb) for mb in mbs)

    assert padding(grouped) < padding(plain) / 4
    again = StepSampler(200, micro_batch_size=4, grad_accum=2, seed=5, lengths=lengths)
    assert [again.micro_batches(s) for s in range(5)] == [grouped.micro_batches(s) for s in range(5)]
    steps = [max(lengths[i] for mb in grouped.micro_batches(s) for i in mb) for s in range(grouped.steps_per_epoch)]
    assert steps != sorted(steps, reverse=True)  # steps are shuffled, not longest-first


def test_a_csv_that_fails_to_parse_prints_only_lorakits_line(tmp_path, tiny_model_dir):
    """datasets drew its "Generating train split" bar and logged the parse error itself before lorakit's line; a
    real process, so the bar (tqdm) and the log handler write to the real stderr."""
    import subprocess
    import sys

    from run_helpers import recipe_dict, subprocess_env, write_recipe

    (tmp_path / "bad.csv").write_text("instruction,input,output\nx,,y\n1,2,3,4\n")
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model_dir, tmp_path / "bad.csv", tmp_path / "run"))
    result = subprocess.run([sys.executable, "-m", "lorakit", "preview-data", str(recipe)], capture_output=True,
                            text=True, timeout=120, env=subprocess_env(HF_DATASETS_CACHE=str(tmp_path / "cache")))
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'bad.csv'}:3: 4 cells where the header has 3 (instruction, input, output); quote a cell "
        'holding a comma ("a, b")'], result.stderr
    import datasets
    from datasets.utils import logging as datasets_logging

    from lorakit.console import datasets_held_back

    before = (datasets.utils.are_progress_bars_disabled(), datasets_logging.get_verbosity())
    with pytest.raises(RuntimeError), datasets_held_back():
        assert datasets.utils.are_progress_bars_disabled()
        raise RuntimeError
    assert (datasets.utils.are_progress_bars_disabled(), datasets_logging.get_verbosity()) == before
