"""`lorakit eval`: prompts rendered as training renders them, batched greedy == one-by-one `lorakit generate`,
the answer loss equals plain PEFT's, base-too == the adapter switched off, merged == adapter, exit codes."""

import json
from pathlib import Path

import pytest
from run_helpers import cli, recipe_dict, write_recipe
from transformers import AutoTokenizer

from lorakit.config.schema import DataSection, ModelSection
from lorakit.data.formats import tokenize_row
from lorakit.data.sources import Row, read_rows
from lorakit.testing import adapter_loss_gain, write_memorisation_data
from lorakit.tools.generate import Request, generate_one, load_for_generation
from lorakit.training.scoring import eval_items, generate_greedy, rouge_l, score

CHAT_ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "And of Italy?"},
                  {"role": "assistant", "content": "Rome"}]},
    {"messages": [{"role": "user", "content": "Colour of the sky?"}, {"role": "assistant", "content": "blue"}]},
    {"messages": [{"role": "user", "content": "Opposite of hot, in one word please?"},
                  {"role": "assistant", "content": "cold"}, {"role": "user", "content": "thanks"}]},
]


EVAL_METHODS = {
    "dora": {"method": "dora"},
    "ia3": {"method": "ia3", "r": None, "lora_dropout": None, "target_modules": ["k_proj", "v_proj", "down_proj"],
            "feedforward_modules": ["down_proj"]},
    "prompt": {"method": "prompt", "num_virtual_tokens": 4, "r": None, "lora_dropout": None, "target_modules": None},
    "prefix": {"method": "prefix", "num_virtual_tokens": 4, "r": None, "lora_dropout": None, "target_modules": None},
    "bottleneck": {"method": "bottleneck", "lora_dropout": None, "target_modules": None},
}


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """A 4-step alpaca run on the tiny model (adapter, tokenizer, recipe.yaml)."""
    root = tmp_path_factory.mktemp("eval-run")
    data = write_memorisation_data(root / "train.jsonl")
    recipe = recipe_dict(tiny_model_dir, data, root / "run", adapter={"lora_dropout": 0.0}, max_steps=4,
                         learning_rate=1e-2)
    result = cli("train", write_recipe(root / "recipe.yaml", recipe))
    assert result.exit_code == 0, result.output
    return root / "run"


def test_metrics():
    assert score("  Paris\n", "paris", "exact") == 1.0
    assert score("Paris, France", "Paris", "exact") == 0.0
    assert score("It is  PARIS, France", "paris", "contains") == 1.0
    assert score("built in 1873.", r"18\d\d", "regex") == 1.0
    precision, recall = 5 / 6, 1.0  # LCS "the cat on the mat": 5 of the output's 6 words, all 5 of the answer's
    assert score("the cat sat on the mat", "the cat on the mat", "rouge-l") == pytest.approx(
        2 * precision * recall / (precision + recall))
    assert rouge_l([], []) == 1.0 and rouge_l(["a"], ["b"]) == 0.0


def test_prompt_is_what_training_renders(tiny_model_dir, tmp_path):
    """Every format: the prompt is the training example's tokens before its last response, and for chat the
    generation-prompt rendering of the turns before the last assistant turn (later user turns dropped)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    alpaca = read_rows(str(write_memorisation_data(tmp_path / "a.jsonl"))).rows
    section = DataSection(train="x")
    items, skipped = eval_items(alpaca, section, tokenizer)
    assert not skipped and [i.answer for i in items][:2] == ["Paris", "Rome"]
    for item, row in zip(items, alpaca):
        trained = tokenize_row(row, section, tokenizer)
        assert item.prompt_ids == trained.input_ids[: trained.prompt_len]
        assert item.example.input_ids == trained.input_ids  # the loss sees the very training example

    chat = DataSection(train="x", format="chat")
    rows = [Row(f"r{i}", r) for i, r in enumerate(CHAT_ROWS)]
    items, _ = eval_items(rows, chat, tokenizer)
    assert [i.answer for i in items] == ["Rome", "blue", "cold"]
    for item, row in zip(items, CHAT_ROWS):
        last = max(k for k, m in enumerate(row["messages"]) if m["role"] == "assistant")
        text = tokenizer.apply_chat_template(row["messages"][:last], tokenize=False, add_generation_prompt=True)
        assert item.prompt_ids == tokenizer(text, add_special_tokens=False)["input_ids"]

    completion = DataSection(train="x", format="completion")
    items, _ = eval_items([Row("c", {"prompt": "1 2 3", "completion": " 4"})], completion, tokenizer)
    assert items[0].answer == " 4" and items[0].prompt_ids == tokenizer("1 2 3")["input_ids"]
    text = DataSection(train="x", format="text")
    items, _ = eval_items([Row("t", {"text": "just text"})], text, tokenizer)
    assert items[0].answer is None and items[0].prompt_ids is None  # loss only


def test_eval_data_renders_as_its_training_source(tiny_model_dir, tmp_path):
    """--data that is one of the run's data.train sources takes that source's format and own chat template (the
    recipe's data.format is alpaca here); a file that is no source takes the data section's."""
    from lorakit.config.load import parse_recipe
    from lorakit.data.chat import load_template, resolve_chat_template
    from lorakit.tools.evaluate import Target, data_section

    alpaca = write_memorisation_data(tmp_path / "a.jsonl")
    chat, other = tmp_path / "c.jsonl", tmp_path / "other.jsonl"
    for path in (chat, other):
        path.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS))
    recipe = recipe_dict(tiny_model_dir, alpaca, tmp_path / "run")
    spelled = str(tmp_path / "." / "c.jsonl")  # the recipe's spelling of the path differs from --data's
    recipe["data"]["train"] = [str(alpaca), {"path": spelled, "format": "chat", "chat_template": "zephyr"}]
    parsed = parse_recipe(recipe)
    target = Target(kind="adapter", path=tmp_path, model=parsed.model, base=None, recipe=parsed)

    rows = read_rows(str(chat)).rows
    section = data_section(target, chat, rows)
    assert (section.format, section.chat_template) == ("chat", "zephyr")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.chat_template != load_template("zephyr", "x")
    resolve_chat_template(section, tokenizer)
    items, skipped = eval_items(rows, section, tokenizer)
    assert not skipped and [i.answer for i in items] == ["Rome", "blue", "cold"]
    zephyr = load_template("zephyr", "x")
    for item, row in zip(items, CHAT_ROWS):
        last = max(k for k, m in enumerate(row["messages"]) if m["role"] == "assistant")
        text = tokenizer.apply_chat_template(row["messages"][:last], chat_template=zephyr, tokenize=False,
                                             add_generation_prompt=True)
        assert item.prompt_ids == tokenizer(text, add_special_tokens=False)["input_ids"]

    assert data_section(target, other, read_rows(str(other)).rows).format == "alpaca"  # refused row by row
    assert data_section(target, alpaca, read_rows(str(alpaca)).rows).format == "alpaca"


def test_batched_left_padded_generation_equals_one_by_one_generate(tiny_model_dir):
    """Prompts of different lengths batched with left padding give what `lorakit generate --chat` gives alone."""
    model, tokenizer = load_for_generation(ModelSection(name_or_path=str(tiny_model_dir)), {}, allow_pickle=False,
                                           device="cpu")
    rows = [Row(f"r{i}", r) for i, r in enumerate(CHAT_ROWS)]
    items, _ = eval_items(rows, DataSection(train="x", format="chat"), tokenizer)
    assert len({len(i.prompt_ids) for i in items}) == 3  # really padded
    batched = generate_greedy(model, tokenizer, [i.prompt_ids for i in items], max_new_tokens=6, batch_size=3)
    alone = [generate_one(model, tokenizer, Request("base", messages=r["messages"][:k]), chat=True, max_new_tokens=6,
                          temperature=0.0, top_p=1.0, seed=0)
             for r, k in zip(CHAT_ROWS, (4, 1, 1))]
    assert batched == alone
    assert any(batched)


def test_eval_run_base_too(run_dir, tiny_model_dir):
    data = run_dir.parent / "train.jsonl"
    result = cli("eval", run_dir, "--data", data, "--base-too", "--max-new-tokens", "4", "--batch-size", "3")
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "eval.json").read_text())
    assert set(report["totals"]) == {"base", "tuned"} and report["scored_rows"] == 8
    assert "base" in result.output and "tuned" in result.output and "perplexity" in result.output
    # The answer loss is the token-weighted loss plain PEFT computes on the same rows, for both models.
    base_loss, tuned_loss = adapter_loss_gain(tiny_model_dir, run_dir / "adapter", data)
    assert report["totals"]["tuned"]["loss"] == pytest.approx(tuned_loss, abs=1e-4)
    assert report["totals"]["base"]["loss"] == pytest.approx(base_loss, abs=1e-4)
    assert report["totals"]["tuned"]["loss"] < report["totals"]["base"]["loss"]
    # ... computed as training computes it: the head over answer tokens, a chunk of logits at a time.
    assert report["settings"]["loss_path"] == {"tuned": "chunked", "base": "chunked"}
    row = report["per_row"][0]
    assert row["answer"] == "Paris" and {"output", "score"} <= set(row["tuned"])
    # A second eval moves the first report aside.
    assert cli("eval", run_dir / "adapter", "--data", data, "--max-new-tokens", "2").exit_code == 0
    assert len(list(run_dir.glob("eval.json.replaced-*"))) == 1


def test_eval_merged_model_matches_adapter(run_dir, tmp_path):
    data = run_dir.parent / "train.jsonl"
    merged = tmp_path / "merged"
    assert cli("merge", run_dir, "-o", merged).exit_code == 0
    out = tmp_path / "new folder" / "m.json"  # created
    result = cli("eval", merged, "--data", data, "--base-too", "--max-new-tokens", "4", "-o", out)
    assert result.exit_code == 0, result.output
    merged_report = json.loads(out.read_text())
    adapter_out = tmp_path / "a.json"
    assert cli("eval", run_dir / "adapter", "--data", data, "--base-too", "--max-new-tokens", "4",
               "-o", adapter_out).exit_code == 0
    adapter_report = json.loads(adapter_out.read_text())
    assert merged_report["kind"] == "merged"
    for name in ("base", "tuned"):
        assert merged_report["totals"][name]["loss"] == pytest.approx(adapter_report["totals"][name]["loss"], abs=1e-4)


@pytest.mark.parametrize("case, code", [("no-target", 4), ("no-data", 3), ("metric", 2), ("regex", 3), ("fields", 3)])
def test_eval_mistakes_exit_with_one_line(run_dir, tmp_path, case, code):
    data = run_dir.parent / "train.jsonl"
    args = {"no-target": [tmp_path / "nothing", "--data", data],
            "no-data": [run_dir, "--data", tmp_path / "missing.jsonl"],
            "metric": [run_dir, "--data", data, "--metric", "bleu"],
            "regex": [run_dir, "--data", data, "--metric", "regex"],
            "fields": [run_dir, "--data", tmp_path / "chat.jsonl"]}[case]
    (tmp_path / "chat.jsonl").write_text(json.dumps(CHAT_ROWS[1]) + "\n")  # chat rows for an alpaca run
    if case == "regex":
        (tmp_path / "bad.jsonl").write_text(json.dumps({"instruction": "x", "input": "", "output": "(["}) + "\n")
        args[2] = tmp_path / "bad.jsonl"
    result = cli("eval", *args, "--max-new-tokens", "2", "-o", tmp_path / "e.json")
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("metric", ["contains", "regex"])
def test_an_empty_answer_under_contains_or_regex_is_refused_at_load(run_dir, tmp_path, tiny_model_dir, metric):
    """Every output contains the empty string and matches the empty pattern: such a row scored 1 whatever the model
    said. Refused before any model loads, by eval and by train.eval_generate (the same scoring code)."""
    from lorakit.config.load import parse_recipe
    from lorakit.errors import DataError
    from lorakit.training.scoring import TrainingScorer

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": i, "input": "", "output": o}) + "\n"
                            for i, o in (("Capital of France?", "Paris"), ("Say nothing", "  "))))
    result = cli("eval", run_dir, "--data", data, "--metric", metric, "-o", tmp_path / "e.json")
    message = (f"{data}:2: the answer is empty, and under --metric {metric} an empty answer matches every output; "
               "give the row its answer, or score with --metric exact")
    assert result.exit_code == 3 and " ".join(result.stderr.split()) == f"error: {message}", result.output
    assert not (tmp_path / "e.json").exists()
    recipe = recipe_dict(tiny_model_dir, data, tmp_path / "run", eval_generate=2, eval_metric=metric)
    recipe["data"]["eval"] = str(data)
    with pytest.raises(DataError, match=f"under train.eval_metric {metric} an empty answer .* or score with "
                                        "train.eval_metric: exact"):
        TrainingScorer(parse_recipe(recipe), AutoTokenizer.from_pretrained(run_dir / "adapter"))


def test_eval_bad_row_names_no_recipe_key(run_dir, tmp_path):
    """eval reads no recipe, so its remedy for a row that is not JSON is not data.skip_bad_rows."""
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    result = cli("eval", run_dir, "--data", tmp_path / "bad.jsonl", "-o", tmp_path / "e.json")
    assert result.exit_code == 3 and "bad.jsonl:1: invalid JSON" in result.stderr, result.output
    assert "fix the row" in result.stderr and "skip_bad_rows" not in result.stderr


def test_eval_and_explain_read_a_recorded_recipe_with_keys_now_refused(run_dir, tmp_path):
    """An older lorakit wrote every default into RUN/recipe.yaml, keys without effect in context among them, and
    let model.revision through beside a local model: eval and explain of that run still work (lorakit.config.start
    refuses those keys only when work starts)."""
    import shutil

    import yaml

    old = shutil.copytree(run_dir, tmp_path / "old-run")
    recorded = yaml.safe_load((old / "recipe.yaml").read_text())
    recorded["model"].update(double_quant=True, upcast_unquantized=False, revision="main")
    recorded["train"].update(keep_last=2, eval_metric="exact")
    recorded["output"]["project"] = "lorakit"
    (old / "recipe.yaml").write_text(yaml.safe_dump(recorded, sort_keys=False))
    data = write_memorisation_data(tmp_path / "rows.jsonl")
    result = cli("eval", old, "--data", data, "--max-new-tokens", "2", "-o", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval.json").read_text())["totals"]["tuned"]["loss"] is not None
    assert cli("explain", old).exit_code == 0
    assert cli("validate", old / "recipe.yaml").exit_code == 2  # as a recipe to train again it is refused


@pytest.mark.parametrize("adapter", [{"lora_dropout": 0.0}, EVAL_METHODS["prefix"]], ids=["lora", "prefix"])
def test_eval_generate_during_training_scores_as_lorakit_eval_does(adapter, tiny_model_dir, tmp_path):
    """train.eval_generate scores N held-out rows at every evaluation with the code `lorakit eval` runs: the final
    eval_score equals `lorakit eval` of the finished adapter on those rows; it reaches the trackers and the card.
    With a prefix-tuning adapter too (its prefix built by the prompt encoder of the model in training)."""
    from lorakit.config.load import load_recipe
    from lorakit.data.pipeline import split_eval
    from lorakit.training.scoring import TrainingScorer

    data = write_memorisation_data(tmp_path / "train.jsonl")
    recipe = recipe_dict(tiny_model_dir, data, tmp_path / "run", adapter=adapter, max_steps=4,
                         learning_rate=1e-2, eval_every=2, eval_generate=3, eval_metric="rouge-l")
    recipe["data"]["eval_split"] = 0.5
    recipe["output"]["report_to"] = ["tensorboard"]
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    result = cli("train", path)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "eval_score" in r]
    assert [r["step"] for r in scored] == [2, 4] and all("eval_loss" in r for r in scored)

    held_out = split_eval(read_rows(str(data)).rows, 0.5, 7)[1][:3]
    rows = tmp_path / "held_out.jsonl"
    rows.write_text("".join(json.dumps(r.data) + "\n" for r in held_out))
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    max_new = TrainingScorer(load_recipe(path), tokenizer).max_new_tokens
    assert cli("eval", run, "--data", rows, "--metric", "rouge-l", "--max-new-tokens", max_new).exit_code == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["totals"]["tuned"]["score"] == pytest.approx(scored[-1]["eval_score"], abs=1e-6)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [s.step for s in events.Scalars("eval/score")] == [2, 4]
    assert "| eval_score |" in (run / "adapter" / "README.md").read_text()


@pytest.mark.parametrize("train, data, message", [
    ({"eval_generate": 2}, {}, "train.eval_generate: needs eval rows"),
    ({"eval_generate": 2}, {"format": "text", "eval_split": 0.2}, "data.format text rows have no answer"),
    ({"eval_metric": "contains"}, {}, "train.eval_metric: has no effect without train.eval_generate"),
    ({"eval_metric": "exact"}, {}, "train.eval_metric: has no effect without train.eval_generate"),  # the default, set
])
def test_eval_generate_recipe_mistakes(tiny_model_dir, tmp_path, train, data, message):
    recipe = recipe_dict(tiny_model_dir, "d.jsonl", tmp_path / "run", **train)
    recipe["data"].update(data)
    result = cli("validate", write_recipe(tmp_path / "recipe.yaml", recipe))
    assert result.exit_code == 2 and message in result.output, result.output


def test_demo_questions_are_held_out_chat_rows_with_answers(tiny_model_dir):
    """data/demo/questions.jsonl (make demo's `lorakit eval`): reworded questions, none seen in training."""
    from pathlib import Path

    demo = Path(__file__).parents[2] / "data" / "demo"
    rows = read_rows(str(demo / "questions.jsonl")).rows
    items, skipped = eval_items(rows, DataSection(train="x", format="chat"),
                                AutoTokenizer.from_pretrained(tiny_model_dir))
    assert len(items) == len(rows) == 8 and not skipped and all(i.answer for i in items)
    trained = {r.data["messages"][0]["content"] for r in read_rows(str(demo / "train.jsonl")).rows}
    assert not trained & {r.data["messages"][0]["content"] for r in rows}
    answers = " ".join(r.data["messages"][-1]["content"] for r in read_rows(str(demo / "train.jsonl")).rows)
    assert all(i.answer in answers for i in items)  # each answer is a fact the training rows teach


def test_plot_draws_eval_score(tmp_path):
    from lorakit.training.plot import plot_run

    records = [{"step": s, "loss": 3.0 / s, "lr": 1e-3} for s in (1, 2, 3, 4)] + [{"step": 4, "eval_loss": 1.0}]
    pngs = []
    for name, extra in (("without", []), ("with", [{"step": 2, "eval_score": 0.25}, {"step": 4, "eval_score": 0.75}])):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records + extra))
        pngs.append(plot_run(run, tmp_path / f"{name}.png").read_bytes())
    assert pngs[0] != pngs[1]


def test_default_report_path_of_a_checkpoint_is_beside_the_run_not_inside_the_checkpoint(tmp_path):
    """Checkpoint rotation deletes whole step folders: the report of a checkpoint goes into the run directory."""
    from lorakit.tools.evaluate import default_output

    run = tmp_path / "run"
    step = run / "checkpoints" / "step-000004"
    (step / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text("x")
    (step / "recipe.yaml").write_text("x")
    assert default_output(step) == default_output(step / "adapter") == run / "eval-step-000004.json"
    assert default_output(run) == default_output(run / "adapter") == run / "eval.json"
    assert default_output(tmp_path / "elsewhere") == Path("eval.json")


@pytest.mark.slow
@pytest.mark.parametrize("method", EVAL_METHODS)
def test_eval_scores_every_method_with_its_adapter(method, tiny_model_dir, tmp_path):
    """Each method's run is scored with its adapter on (its loss is not the base's; for PEFT methods, the loss
    plain PEFT computes) and its outputs are what `lorakit generate` gives with the adapter, row by row."""
    data = write_memorisation_data(tmp_path / "train.jsonl")
    recipe = recipe_dict(tiny_model_dir, data, tmp_path / "run", adapter=EVAL_METHODS[method], max_steps=3,
                         learning_rate=3e-2)
    assert cli("train", write_recipe(tmp_path / "recipe.yaml", recipe)).exit_code == 0
    result = cli("eval", tmp_path / "run", "--data", data, "--base-too", "--max-new-tokens", "4", "--batch-size", "3")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    tuned, base = report["totals"]["tuned"]["loss"], report["totals"]["base"]["loss"]
    assert abs(tuned - base) > 1e-4
    if method != "bottleneck":
        assert (base, tuned) == pytest.approx(adapter_loss_gain(tiny_model_dir, tmp_path / "run" / "adapter", data),
                                              abs=1e-4)
    model, tokenizer = load_for_generation(ModelSection(name_or_path=str(tiny_model_dir), dtype="float32"),
                                           {"tuned": tmp_path / "run" / "adapter"}, allow_pickle=False, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "adapter")
    rows = read_rows(str(data)).rows
    items, _ = eval_items(rows, DataSection(train=str(data), max_seq_len=128), tokenizer)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    alone = generate_greedy(model, tokenizer, [i.prompt_ids for i in items], max_new_tokens=4, batch_size=1)
    assert [r["tuned"]["output"] for r in report["per_row"]] == alone


def _bottleneck_dir(path: Path, config: str) -> Path:
    """A bottleneck adapter directory without lorakit.json (copied out of its run, or saved by hand)."""
    import torch
    from safetensors.torch import save_file

    path.mkdir()
    (path / "bottleneck_config.json").write_text(config)
    save_file({"adapters.0.attention.down.weight": torch.zeros(4, 64)}, path / "bottleneck_model.safetensors")
    return path


def test_a_bottleneck_adapter_without_lorakit_json_takes_the_base_its_config_records(tiny_model_dir, tmp_path):
    from lorakit.tools.evaluate import resolve_target

    adapter = _bottleneck_dir(tmp_path / "a", json.dumps({"r": 4, "base_model_name_or_path": str(tiny_model_dir)}))
    target = resolve_target(adapter)
    assert (target.kind, target.model.name_or_path) == ("adapter", str(tiny_model_dir))


@pytest.mark.parametrize("case", ["bottleneck-no-base", "bottleneck-damaged", "peft-damaged", "peft-base-not-text"])
def test_eval_of_an_adapter_without_lorakit_json_that_names_no_base_or_is_damaged_is_exit_4(case, tmp_path):
    """Was exit 1: the bottleneck's adapter_config.json (it has none) or a base that is no string read inline."""
    if case.startswith("bottleneck"):
        adapter = _bottleneck_dir(tmp_path / "a", '{"r": 4}' if case == "bottleneck-no-base" else '{"r": 4,')
    else:
        adapter = tmp_path / "a"
        adapter.mkdir()
        config = '{"peft_type": "LORA",' if case == "peft-damaged" else '{"peft_type": "LORA", "base_model_name_or_path": 7}'
        (adapter / "adapter_config.json").write_text(config)
    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "x", "input": "", "output": "y"}) + "\n")
    result = cli("eval", adapter, "--data", tmp_path / "d.jsonl", "-o", tmp_path / "e.json")
    assert result.exit_code == 4, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    name = "bottleneck_config.json" if case.startswith("bottleneck") else "adapter_config.json"
    assert f"a/{name}" in result.output
    assert ("not valid JSON" if case.endswith("damaged") else "records no base model") in result.output


def test_eval_of_preference_pairs_scores_the_chosen_answer_and_the_preference(tiny_model_dir, tmp_path):
    """Pairs: the loss is the chosen answer's (it was the chosen and the rejected answers' NLL together), the rows
    are recognised without a recipe (was exit 3, "cannot tell the row format"), and the preference accuracy and
    margin are those of the summed answer log-probs computed with plain PEFT, for the tuned model and the base."""
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from lorakit.data.formats import tokenize_pair
    from lorakit.testing import build_random_adapter

    adapter = build_random_adapter(tiny_model_dir, tmp_path / "adapter", LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), seed=3)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    pairs = [{"prompt": f"Count to {k}", "chosen": " ".join(map(str, range(k))), "rejected": "fox " * k}
             for k in (1, 2, 3, 4)]
    chats = [{"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}]}
             for p in pairs]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    result = cli("eval", adapter, "--data", data, "--base-too", "--max-new-tokens", "2", "--output",
                 tmp_path / "pairs.json")
    assert result.exit_code == 0, result.output
    assert "pref acc" in result.output and "summed, as dpo compares them" in result.output
    assert cli("eval", adapter, "--data", tmp_path / "chat.jsonl", "--base-too", "--max-new-tokens", "2",
               "--output", tmp_path / "chat.json").exit_code == 0
    report, chat = (json.loads((tmp_path / name).read_text()) for name in ("pairs.json", "chat.json"))
    assert report["format"] == "preference"
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    section = DataSection(train=str(data), format="preference", max_seq_len=128)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                      adapter).eval()

    def answer_logp(example):
        ids = torch.tensor([example.input_ids])
        logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
        return float(logps[torch.tensor(example.labels[1:]) != -100].sum())

    for name in ("tuned", "base"):
        assert report["totals"][name]["loss"] == pytest.approx(chat["totals"][name]["loss"], abs=1e-6)
        with torch.no_grad(), model.disable_adapter() if name == "base" else torch.no_grad():
            margins = [answer_logp(p) - answer_logp(p.rejected)
                       for p in (tokenize_pair(Row("d", r), section, tokenizer) for r in pairs)]
        assert report["totals"][name]["preference_margin"] == pytest.approx(sum(margins) / 4, abs=1e-4)
        assert report["totals"][name]["preference_accuracy"] == sum(m > 0 for m in margins) / 4
    assert report["totals"]["tuned"]["preference_margin"] != report["totals"]["base"]["preference_margin"]
