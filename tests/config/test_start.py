"""lorakit.config.start: keys with no effect in their recipe's context are refused when work starts (exit 2, one
line naming the key and the fix), never when a run's recorded recipe is read back, and left out of the resolved
recipe a run writes."""

import json
from types import SimpleNamespace

import pytest
import yaml
from run_helpers import cli, write_recipe

from lorakit.config.load import dump_recipe, parse_recipe, resolved
from lorakit.config.start import CONTEXT_KEYS
from lorakit.errors import RecipeError

MINIMAL = {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "train": {"max_steps": 10}}


def recipe(**sections) -> dict:
    return {name: {**MINIMAL.get(name, {}), **sections.get(name, {})} for name in {*MINIMAL, *sections}}


DROP = object()  # in the "applies" column: a key the context sets that the other case must not have

# (key, value where it has no effect, the recipe around it; the keys that make it take effect)
NO_EFFECT = [
    ("model.double_quant", True, {}, {"model": {"quantization": "nf4"}}),
    ("model.double_quant", False, {"model": {"quantization": "int8"}}, {"model": {"quantization": "fp4"}}),
    ("model.upcast_unquantized", False, {}, {"model": {"quantization": "int8"}}),
    ("data.padding_free", True, {"data": {"packing": True}}, {"data": {"packing": False}}),
    ("data.train_on_inputs", True, {"data": {"format": "text"}}, {"data": {"format": "completion"}}),
    ("data.split", "test", {}, {"data": {"train": ["t.jsonl", "owner/name"]}}),
    ("data.subset", "en", {"data": {"train": "./saved_dir"}}, {"data": {"eval": "imdb"}}),
    ("train.eval_metric", "contains", {}, {"train": {"eval_generate": 2}, "data": {"eval_split": 0.1}}),
    ("train.chunked_loss", True, {"adapter": {"method": "prefix", "num_virtual_tokens": 4}},
     {"adapter": {"method": "lora", "num_virtual_tokens": DROP}}),
    ("train.chunked_loss", False, {"adapter": {"method": "prompt", "num_virtual_tokens": 4}},
     {"adapter": {"method": "dora", "num_virtual_tokens": DROP}}),
    ("train.keep_last", 3, {}, {"train": {"save_every": 5}}),
    ("train.keep_last", 3, {"train": {"save_every": 0, "save_each_epoch": False}}, {"train": {"save_each_epoch": True}}),
    ("output.project", "mine", {"output": {"report_to": ["tensorboard"]}}, {"output": {"report_to": ["mlflow"]}}),
]


def with_key(base: dict, key: str, value) -> dict:
    data = recipe(**{name: dict(keys) for name, keys in base.items()})
    section, leaf = key.split(".")
    data.setdefault(section, {})[leaf] = value
    return data


def merged(data: dict, extra: dict) -> dict:
    """``data`` with ``extra``'s keys set (DROP: removed)."""
    out = {**data, **{name: {**data.get(name, {}), **keys} for name, keys in extra.items()}}
    return {name: {k: v for k, v in keys.items() if v is not DROP} for name, keys in out.items()}


@pytest.mark.parametrize("key, value, context, applies", NO_EFFECT, ids=[f"{c[0]}-{i}" for i, c in enumerate(NO_EFFECT)])
def test_a_key_without_effect_is_refused_where_work_starts_only(key, value, context, applies):
    data = with_key(context, key, value)
    why = next(c.why for c in CONTEXT_KEYS if c.key == key)
    with pytest.raises(RecipeError) as info:
        parse_recipe(data)
    assert info.value.problems == [f"{key}: {why}"]
    parse_recipe(data, recorded=True)  # a run's recipe.yaml: what ran, read back
    parse_recipe(recipe(**context))  # not set: its default is harmless
    parse_recipe(merged(data, applies))  # where it takes effect


def test_every_context_key_is_tested():
    assert {key for key, *_ in NO_EFFECT} == {c.key for c in CONTEXT_KEYS}


def test_revision_with_a_local_model_is_refused_to_start_not_to_read(tmp_path):
    data = recipe(model={"name_or_path": str(tmp_path), "revision": "main"})
    with pytest.raises(RecipeError, match=r"model.revision: 'main' has no effect: .* is a local path"):
        parse_recipe(data)
    assert parse_recipe(data, recorded=True).model.revision == "main"
    parse_recipe(recipe(model={"name_or_path": str(tmp_path), "revision": "main", "tokenizer": "owner/tok"}))


def test_split_and_subset_at_their_defaults_pass_on_local_data():
    """Every recipe `lorakit init` wrote before data.split/data.subset joined the table spells out split: train and
    subset: null; those still start."""
    parse_recipe(recipe(data={"split": "train", "subset": None}))


def test_a_field_mapping_no_format_reads_is_refused_to_start_not_to_read():
    """data.fields {question: instruction} (written the wrong way round) was silently ignored."""
    data = recipe(data={"fields": {"question": "instruction", "output": "answer"}})
    with pytest.raises(RecipeError, match=r"data.fields: 'question' is not a field of the format \(alpaca: "
                       r"instruction, input, output\); .* e.g. \{instruction: question\}$"):
        parse_recipe(data)
    assert parse_recipe(data, recorded=True).data.fields["question"] == "instruction"
    source = {"path": "c.jsonl", "format": "chat", "fields": {"text": "body"}}
    with pytest.raises(RecipeError, match=r"data.train\[1\].fields: 'text' is not a field of the format \(chat: "
                       r"messages\)"):
        parse_recipe(recipe(data={"train": ["t.jsonl", source]}))
    # a key of any format in use is read: data.format's, a source's, preference's chat prompt
    parse_recipe(recipe(data={"train": ["t.jsonl", {"path": "c.jsonl", "format": "chat"}],
                              "fields": {"messages": "conversation", "instruction": "q"}}))
    parse_recipe(recipe(data={"format": "preference", "fields": {"messages": "history", "chosen": "good"}},
                        train={"objective": "dpo"}))


def test_the_resolved_recipe_leaves_out_keys_without_effect_and_trains_again():
    """DIR/recipe.yaml spells out every default: were double_quant, keep_last, ... in it, it could not run again."""
    plain = parse_recipe(MINIMAL)
    text = dump_recipe(plain)
    again = parse_recipe(yaml.safe_load(text))
    assert again.model_dump() == plain.model_dump()
    left_out = [f"{section}.{leaf}" for section, keys in plain.model_dump().items() for leaf in keys
                if leaf not in yaml.safe_load(text)[section]]
    assert left_out == ["model.double_quant", "model.upcast_unquantized", "data.split", "data.subset",
                        "train.eval_metric", "train.keep_last", "output.project"]
    qlora = parse_recipe(recipe(model={"quantization": "nf4"}, train={"save_every": 5}))
    dumped = yaml.safe_load(dump_recipe(qlora))
    assert dumped["model"]["double_quant"] is True and dumped["train"]["keep_last"] == 2
    parse_recipe(dumped)


def _checkpoint(recipe_text: str):
    return SimpleNamespace(path="runs/x/checkpoints/step-000004", recipe_text=recipe_text,
                           manifest={"format_version": 2}, state={"world_size": 1})


def test_resume_after_removing_a_refused_key_is_no_change():
    """A checkpoint of an older lorakit recorded double_quant (set to false, without a 4-bit base) and lacks a key
    added since; the user removes double_quant, now refused, from the recipe: the resume sees no change."""
    from lorakit.checkpoint.resume import check_resume

    old = {**resolved(parse_recipe(MINIMAL))}
    old["model"] = {**old["model"], "double_quant": False}
    old["train"] = {k: v for k, v in old["train"].items() if k != "ddp_timeout"}
    assert check_resume(_checkpoint(yaml.safe_dump(old)), parse_recipe(MINIMAL), 1, False, print) is False
    # A tracker dropped on resume (output.report_to is cosmetic): its output.project, now without effect, goes too.
    tracked = resolved(parse_recipe(recipe(output={"report_to": ["mlflow"], "project": "p"})))
    assert check_resume(_checkpoint(yaml.safe_dump(tracked)), parse_recipe(MINIMAL), 1, False, print) is False
    changed = parse_recipe(recipe(train={"learning_rate": 1e-3}))
    with pytest.raises(Exception, match=r"train.learning_rate: 0.0002 → 0.001"):
        check_resume(_checkpoint(yaml.safe_dump(old)), changed, 1, False, print)


@pytest.mark.parametrize("key, value", [("model.double_quant", True), ("train.keep_last", 3),
                                        ("train.eval_metric", "exact"), ("output.project", "p")])
def test_validate_refuses_in_one_line(tmp_path, key, value):
    result = cli("validate", write_recipe(tmp_path / "recipe.yaml", with_key({}, key, value)))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"{key}: " in result.stderr and "remove it" in result.stderr


def test_templates_write_keys_without_effect_commented_out():
    from lorakit.config.init import TEMPLATES, render

    for name in TEMPLATES:
        text = render(name)
        parse_recipe(yaml.safe_load(text))  # the rules of starting work included
    cpu = render("cpu-demo")
    assert "  # double_quant: true   # not used here: only applies to a 4-bit base" in cpu
    assert "  # keep_last: 2   # not used here: the run writes no checkpoints to keep" in cpu
    assert "\n  double_quant: true\n" in render("qlora")


def test_dpo_template_shows_how_to_start_from_the_sft_adapter():
    """The dpo template says "after SFT" and showed adapter.init_from only as `null`: it now writes the key commented
    out with the path shape (and train.reference: init_from beside it), and uncommented the recipe validates."""
    from lorakit.config.init import render

    text = render("dpo")
    assert "\n  # init_from: runs/sft/adapter   # the SFT run's adapter this stage continues\n" in text
    assert "\n  # reference: init_from   # with adapter.init_from" in text and "uncomment adapter.init_from" in text
    parse_recipe(yaml.safe_load(text))
    after_sft = parse_recipe(yaml.safe_load(text.replace("  # init_from: ", "  init_from: ").replace(
        "  # reference: init_from", "  reference: init_from")))
    assert after_sft.adapter.init_from == "runs/sft/adapter" and after_sft.train.reference == "init_from"


def test_resume_from_the_runs_own_recorded_recipe(tiny_model_dir, tmp_path):
    """`lorakit train RUN/recipe.yaml --resume`: the run's own record, as an older lorakit wrote it (every default,
    keys without effect among them), resumes bitwise; the same text in another file is a recipe, refused."""
    import shutil

    from run_helpers import recipe_dict, write_data

    data = write_data(tmp_path / "train.jsonl", n=12)
    run = tmp_path / "run"
    assert cli("train", write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model_dir, data, run, max_steps=4,
                                                                        save_every=2))).exit_code == 0
    reference = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    recorded = yaml.safe_load((run / "recipe.yaml").read_text())
    recorded["model"]["double_quant"] = True
    recorded["train"]["eval_metric"] = "exact"
    recorded["output"]["project"] = "lorakit"
    (run / "recipe.yaml").write_text(yaml.safe_dump(recorded, sort_keys=False))
    copy = shutil.copy(run / "recipe.yaml", tmp_path / "copy.yaml")
    step_2 = run / "checkpoints" / "step-000002"
    result = cli("train", copy, "--resume", step_2)
    assert result.exit_code == 2 and "model.double_quant: only applies to a 4-bit base" in result.stderr, result.output
    result = cli("train", run / "recipe.yaml", "--resume", step_2)
    assert result.exit_code == 0 and "changed settings" not in result.output, result.output
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == reference
    assert "double_quant" not in (run / "recipe.yaml").read_text()  # rewritten resolved: it trains again as it is


@pytest.mark.parametrize("train, adapter, warned", [
    ({"learning_rate": 100}, {}, "train.learning_rate: 100 is far above the usual range for AdamW on an adapter "
                                 "(1e-5 to 0.01, 2e-4 by default)"),
    ({"learning_rate": 2e4}, {}, "train.learning_rate: 2e4 is far above"),  # 2e-4 with the minus sign lost
    ({"learning_rate": 1e-9}, {}, "train.learning_rate: 1e-9 is far below the usual range"),
    ({"learning_rate": 1e-2}, {"loraplus_lr_ratio": 16}, "adapter.loraplus_lr_ratio: 16 × train.learning_rate 0.01 "
                                                         "gives LoRA+'s B matrices 0.16, far above"),
    ({"learning_rate": 3e-2}, {}, None),  # PEFT's prompt-tuning example: high, not absurd
    ({"learning_rate": 1e-6}, {}, None),  # TRL's DPO default
    # Per method (it warned prompt tuning at its paper's 0.3): PEFT's prompt-tuning examples go up to 1, prefix 3e-2
    ({"learning_rate": 0.3}, {"method": "prompt", "r": None, "num_virtual_tokens": 8}, None),
    ({"learning_rate": 1.0}, {"method": "prompt", "r": None, "num_virtual_tokens": 8}, None),
    ({"learning_rate": 20}, {"method": "prompt", "r": None, "num_virtual_tokens": 8},
     "train.learning_rate: 20 is far above the usual range for AdamW on prompt tuning (1e-5 to 1, 2e-4 by default)"),
    ({"learning_rate": 0.2}, {"method": "prefix", "r": None, "num_virtual_tokens": 8}, None),
    ({"learning_rate": 0.5}, {"method": "prefix", "r": None, "num_virtual_tokens": 8},
     "train.learning_rate: 0.5 is far above the usual range for AdamW on prefix tuning (1e-5 to 0.03"),
    ({"learning_rate": 0.5}, {}, "train.learning_rate: 0.5 is far above the usual range for AdamW on an adapter"),
    ({"learning_rate": 0.5}, {"method": "ia3", "r": None}, "train.learning_rate: 0.5 is far above"),  # IA3's: ≤ 1e-2
])
def test_a_learning_rate_far_outside_any_usual_range_is_warned_not_refused(train, adapter, warned):
    from lorakit.config.start import start_warnings

    warnings = start_warnings(parse_recipe(recipe(train=train, adapter=adapter)))
    assert (warnings[0].startswith(warned) and len(warnings) == 1) if warned else warnings == []


def test_eval_data_that_is_a_training_file_is_warned(tmp_path, monkeypatch):
    """data.eval naming data.train's file (or a link to it, or one file of a list) ran without a word: its eval loss
    then measures recall of the training rows. A different file, a hub id or a missing file: no warning."""
    from lorakit.config.start import start_warnings

    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text("{}\n")
    (tmp_path / "other.jsonl").write_text("{}\n")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "train.jsonl")
    warned = lambda train, eval: start_warnings(parse_recipe(recipe(data={"train": train, "eval": eval})))  # noqa
    assert warned("train.jsonl", "./train.jsonl") == [
        "data.eval: ./train.jsonl is data.train's file: eval loss would measure how well the model recalls rows it "
        "trains on, not how it does on new ones; give held-out rows, or data.eval_split: 0.1 in place of data.eval"]
    assert warned(["other.jsonl", {"path": "train.jsonl"}], "link.jsonl")[0].startswith(
        "data.eval: link.jsonl is data.train[1]'s file")
    assert warned("train.jsonl", "other.jsonl") == warned("train.jsonl", "org/data") == []
    assert warned("train.jsonl", "missing.jsonl") == []


def test_validate_and_train_warn_of_an_absurd_learning_rate(tiny_model_dir, tmp_path):
    """train.learning_rate: 100 trained the tiny model to a finite loss and exit 0 without a word."""
    from run_helpers import recipe_dict, write_data

    path = write_recipe(tmp_path / "recipe.yaml", recipe_dict(tiny_model_dir, write_data(tmp_path / "d.jsonl", 8),
                                                              tmp_path / "run", max_steps=2, learning_rate=100))
    warning = "warning: train.learning_rate: 100 is far above the usual range"
    result = cli("validate", path)
    assert result.exit_code == 0 and warning in result.stderr and "recipe.yaml: ok" in result.stdout, result.output
    result = cli("train", path)
    assert result.exit_code == 0 and warning in result.stderr and "far above" not in result.stdout, result.output
    assert result.output.index(warning) < result.output.index("loading model")  # before anything heavy loads


def test_train_warns_of_a_warmup_longer_than_the_run_and_a_step_larger_than_the_data(tiny_model_dir, tmp_path):
    """warmup_steps 10 in a 2-step run and micro_batch_size 100 on 8 rows trained without a word."""
    from run_helpers import recipe_dict, write_data

    path = write_recipe(tmp_path / "recipe.yaml", recipe_dict(tiny_model_dir, write_data(tmp_path / "d.jsonl", 8),
                                                              tmp_path / "run", max_steps=2, warmup_steps=10,
                                                              micro_batch_size=100))
    result = cli("--json-logs", "train", path)
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]  # every stdout line is one JSON object
    warnings = [e["message"] for e in events if e["event"] == "warning" and e["source"] == "lorakit"]
    assert any(w.startswith("train.warmup_steps 10 is not below the run's 2 steps") for w in warnings), warnings
    assert any(w.startswith("train: a step takes micro_batch_size 100 × grad_accum") for w in warnings), warnings
    assert not [e for e in events if e["event"] == "log" and "warmup_steps" in e["message"]]  # not a run line
