"""Recipe schema, loading, overrides and error messages (no model is loaded)."""

import pytest
import yaml

from lorakit.errors import RecipeError, UsageError
from lorakit.config.schema import (
    NO_WARMUP_SCHEDULERS, SCHEDULERS, UNSUPPORTED_SCHEDULERS, USABLE_SCHEDULERS, Recipe,
)
from lorakit.config.load import apply_overrides, dump_recipe, load_recipe, parse_recipe

MINIMAL = {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "train": {"max_steps": 10}}


def write(tmp_path, data, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def problems(data):
    with pytest.raises(RecipeError) as info:
        parse_recipe(data)
    return info.value.problems


def test_minimal_recipe_fills_defaults():
    recipe = parse_recipe(MINIMAL)
    assert recipe.adapter.method == "lora"
    assert recipe.adapter.lora_alpha == 2 * recipe.adapter.r  # the 2·r heuristic
    assert recipe.train.lr_scheduler == "cosine"
    assert recipe.output.save == "adapter"


def test_explicit_alpha_kept():
    recipe = parse_recipe({**MINIMAL, "adapter": {"r": 8, "lora_alpha": 8}})
    assert recipe.adapter.lora_alpha == 8


@pytest.mark.parametrize("objective", ["dpo", "ipo", "orpo", "simpo"])
def test_preference_objectives_default_to_no_lora_dropout_and_honour_an_explicit_one(objective, tmp_path):
    """TRL trains its preference losses without dropout (disable_dropout=True); lorakit's default was 0.05."""
    pairs = {**MINIMAL, "data": {"train": "p.jsonl", "format": "preference"},
             "train": {"max_steps": 10, "objective": objective}}
    recipe = parse_recipe(pairs)
    assert recipe.adapter.lora_dropout == 0.0 and recipe.adapter.defaulted("lora_dropout")
    explicit = parse_recipe({**pairs, "adapter": {"method": "dora", "lora_dropout": 0.05}})
    assert explicit.adapter.lora_dropout == 0.05 and not explicit.adapter.defaulted("lora_dropout")
    assert parse_recipe(MINIMAL).adapter.lora_dropout == 0.05  # supervised: unchanged
    # The resolved recipe (DIR/recipe.yaml) says which, and reads back the same.
    assert load_recipe(write(tmp_path, yaml.safe_load(dump_recipe(recipe)))).adapter.lora_dropout == 0.0


def test_contract_keys_exist():
    """The keys the foundation issue fixes as public interface."""
    expected = {
        "model": {"name_or_path", "dtype", "quantization", "trust_remote_code"},
        "adapter": {"method", "r", "lora_alpha", "lora_dropout", "target_modules"},
        "data": {"train", "eval", "eval_split", "format", "max_seq_len", "packing", "train_on_inputs"},
        "train": {
            "max_steps", "epochs", "micro_batch_size", "grad_accum", "learning_rate", "lr_scheduler",
            "warmup_steps", "warmup_ratio", "weight_decay", "optimizer", "max_grad_norm",
            "gradient_checkpointing", "seed", "log_every", "eval_every", "save_every", "keep_last",
        },
        "output": {"dir", "save"},
    }
    for section, keys in expected.items():
        assert keys <= set(Recipe.model_fields[section].annotation.model_fields), section


def test_every_key_has_a_description():
    for section in Recipe.model_fields.values():
        for name, field in section.annotation.model_fields.items():
            assert field.description, name


def test_schedulers_match_transformers():
    from transformers.trainer_utils import SchedulerType

    assert set(SCHEDULERS) == {s.value for s in SchedulerType}


@pytest.mark.parametrize("name", USABLE_SCHEDULERS)
def test_every_offered_scheduler_runs_on_the_step_count(name):
    """What the recipe accepts, the run can build and step (a warmup where the schedule takes one)."""
    import torch

    from lorakit.training.optim import build_scheduler

    warmup = 0 if name in NO_WARMUP_SCHEDULERS else 2
    recipe = parse_recipe({**MINIMAL, "train": {"max_steps": 10, "lr_scheduler": name, "warmup_steps": warmup}})
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=recipe.train.learning_rate)
    scheduler = build_scheduler(optimizer, recipe.train, total_steps=10)
    for _ in range(10):
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("warmup, total, warned", [(100, 6, True), (6, 6, True), (5, 6, False), (0, 6, False)])
def test_a_warmup_as_long_as_the_run_is_warned(warmup, total, warned):
    from lorakit.training.optim import warmup_warning

    recipe = parse_recipe({**MINIMAL, "train": {"max_steps": total, "warmup_steps": warmup, "learning_rate": 1e-3}})
    warning = warmup_warning(recipe.train, total)
    assert bool(warning) == warned
    if warmup == 100:  # the first step runs at 0, the sixth at 5/100 of the rate
        assert warning == ("train.warmup_steps 100 is not below the run's 6 steps: the learning rate never reaches "
                           "train.learning_rate 0.001 (it peaks at 5e-05); lower train.warmup_steps or set "
                           "train.warmup_ratio")
    ratio = parse_recipe({**MINIMAL, "train": {"max_steps": total, "warmup_ratio": 0.99}})
    assert warmup_warning(ratio.train, total) is None  # a ratio near 1 says what it means


@pytest.mark.parametrize("name", list(UNSUPPORTED_SCHEDULERS))
def test_schedulers_a_recipe_cannot_drive_are_refused_when_read(name):
    found = problems({**MINIMAL, "train": {"max_steps": 10, "lr_scheduler": name}})
    assert found == [f"train.lr_scheduler: {name!r} cannot run from a recipe: {UNSUPPORTED_SCHEDULERS[name]}; "
                     f"choose one of {', '.join(USABLE_SCHEDULERS)}"]


def test_all_problems_reported_at_once():
    data = {
        "model": {"name_or_path": "m", "dtype": "bf16"},
        "adapter": {"r": 0},
        "data": {"train": "t.jsonl", "formt": "chat"},
        "train": {"max_steps": 10, "learning_rate": -1, "lr_scheduler": "cosin"},
        "trian": {},
    }
    found = problems(data)
    assert "train.learning_rate: must be > 0, got -1" in found
    assert "data.formt: unknown key; did you mean format?" in found
    assert "trian: unknown section; did you mean train?" in found
    assert any(p.startswith("adapter.r: must be > 0") for p in found)
    assert any(p.startswith("model.dtype: must be auto, bfloat16") and "did you mean bfloat16" in p for p in found)
    assert any(p.startswith("train.lr_scheduler: unknown scheduler 'cosin'; did you mean cosine?") for p in found)
    assert len(found) == 6


def test_errors_inside_a_list_of_sources_name_the_item_once():
    """A typo in a data.train mapping was exit 1 (the suggestion walked into the union); a bad weight came with two
    'should be a valid string' lines for the union members that did not apply, under data.train.1.TrainSource."""
    def train(*items):
        return problems({**MINIMAL, "data": {"train": ["t.jsonl", *items]}})

    assert train({"path": "a.jsonl", "wieght": 2}) == ["data.train[1].wieght: unknown key; did you mean weight?"]
    assert train({"path": "a.jsonl", "weight": -1}) == ["data.train[1].weight: must be > 0, got -1"]
    assert train({"path": "a.jsonl", "format": "chatt"}) == [
        "data.train[1].format: must be alpaca, chat, text, completion, preference; got 'chatt'; did you mean chat?"]
    assert problems({**MINIMAL, "adapter": {"target_modules": ["q_proj", 3]}}) == [
        "adapter.target_modules[1]: input should be a valid string, got 3"]
    assert problems({**MINIMAL, "train": {"max_steps": 2.5}}) == [
        "train.max_steps: input should be a valid integer, got a number with a fractional part (2.5)"]


@pytest.mark.parametrize("section, key, value, message", [
    ("adapter", "target_modules", [], "adapter.target_modules: [] names no module; give module names"),
    ("adapter", "target_modules", "", "adapter.target_modules: '' names no module"),
    ("adapter", "target_modules", ["q_proj", " "], "adapter.target_modules: ['q_proj', ' '] holds an empty name"),
    ("data", "train", [], "data.train: names no data; give a .jsonl"),
    ("data", "train", ["t.jsonl", {"path": ""}], "data.train: holds an empty path (['t.jsonl', ''])"),
    ("data", "eval", "", "data.eval: names no data"),
])
def test_empty_names_are_refused_when_read(section, key, value, message):
    """Were exit 2 only once loading: PEFT's 'No `target_modules` passed' under 'adapter:', or 'data.train:  is
    empty' with no name; validate passed them."""
    data = {**MINIMAL, section: {**MINIMAL.get(section, {}), key: value}}
    assert [p for p in problems(data) if p.startswith(message)], problems(data)


def test_a_section_with_every_key_commented_out_is_empty_and_a_scalar_is_not_a_mapping():
    """`output:` alone (YAML null) said 'input should be a valid dictionary or instance of OutputSection'."""
    assert parse_recipe({**MINIMAL, "output": None, "adapter": None}).output.save == "adapter"
    assert problems({**MINIMAL, "train": 3}) == ["train: must be a mapping of keys, got int 3"]
    assert problems({**MINIMAL, "data": {"train": "t.jsonl", "fields": [1]}}) == [
        "data.fields: must be a mapping of keys, got list [1]"]


def test_adapter_typo_suggests_key():
    found = problems({**MINIMAL, "adapter": {"lora_alpah": 32}})
    assert found == ["adapter.lora_alpah: unknown key for method lora (LoraConfig); did you mean lora_alpha?"]


def test_adapter_passthrough_validated_against_peft():
    recipe = parse_recipe({**MINIMAL, "adapter": {"use_rslora": True, "bias": "lora_only"}})
    assert recipe.adapter.model_extra == {"use_rslora": True, "bias": "lora_only"}


@pytest.mark.parametrize(
    "train, message",
    [
        ({}, "train.max_steps / train.epochs: set exactly one of them (neither is set)"),
        ({"max_steps": 5, "epochs": 1}, "train.max_steps / train.epochs: set exactly one of them (both are set)"),
        ({"max_steps": 5, "warmup_steps": 2, "warmup_ratio": 0.1}, "train.warmup_steps / train.warmup_ratio"),
        ({"max_steps": 5, "eval_every": 2}, "train.eval_every: needs eval rows to evaluate"),  # was ignored
    ],
)
def test_cross_field_rules(train, message):
    found = problems({**MINIMAL, "train": train})
    assert any(p.startswith(message) for p in found), found


def test_upcast_needs_a_quantized_base():
    found = problems({**MINIMAL, "model": {**MINIMAL["model"], "upcast_unquantized": True}})
    assert any(p.startswith("model.upcast_unquantized: only for a quantized base") for p in found), found
    parse_recipe({**MINIMAL, "model": {**MINIMAL["model"], "quantization": "nf4", "upcast_unquantized": True}})


def test_prompt_learning_methods_generate_during_training():
    """train.eval_generate is accepted with prefix and prompt tuning (lorakit.compat.adapter_generate makes both
    generate what their forward computes)."""
    data = {**MINIMAL, "data": {**MINIMAL["data"], "eval_split": 0.2}, "train": {"max_steps": 1, "eval_generate": 2}}
    for method in ("prefix", "prompt"):
        parse_recipe({**data, "adapter": {"method": method, "num_virtual_tokens": 4}})


def test_missing_required_keys():
    found = problems({"train": {"max_steps": 1}})
    assert "model: required key is missing" in found
    assert "data: required key is missing" in found


def test_overrides_are_typed_by_schema(tmp_path):
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(
        path,
        ["train.learning_rate=1e-4", "adapter.r=4", "data.packing=true", "model.name_or_path=123",
         "adapter.target_modules=[q_proj, v_proj]", "data.fields.instruction=question"],
    )
    assert recipe.train.learning_rate == 1e-4
    assert recipe.adapter.r == 4 and recipe.adapter.lora_alpha == 8
    assert recipe.data.packing is True
    assert recipe.model.name_or_path == "123"  # a string field keeps the text as typed
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]
    assert recipe.data.fields == {"instruction": "question"}


def test_one_tracker_name_is_a_list_of_one(tmp_path):
    """transformers takes report_to="wandb"; lorakit refused 'report_to: mlflow' as 'input should be a valid list'."""
    path = write(tmp_path, {**MINIMAL, "output": {"report_to": "mlflow"}})
    assert load_recipe(path).output.report_to == ["mlflow"]
    assert load_recipe(path, ["output.report_to=wandb"]).output.report_to == ["wandb"]
    assert load_recipe(path, ["output.report_to=[wandb, tensorboard]"]).output.report_to == ["wandb", "tensorboard"]
    assert yaml.safe_load(dump_recipe(load_recipe(path)))["output"]["report_to"] == ["mlflow"]


@pytest.mark.parametrize("value, message", [
    ("mlfow", "output.report_to: must be tensorboard, mlflow, wandb, trackio, aim, comet_ml, clearml, dvclive, "
              "swanlab; got 'mlfow'; did you mean mlflow?"),
    (["wandb", "foo"], "output.report_to[1]: must be tensorboard, mlflow"),
    ("none", "output.report_to: 'none' is not a tracker; for no tracker leave output.report_to out (or [])"),
    (["none"], "output.report_to: 'none' is not a tracker"),
    ("all", "output.report_to: 'all' is not a tracker; name the ones to use (tensorboard, mlflow, wandb,"),
    ("wandb, mlflow", "output.report_to: 'wandb, mlflow' names several trackers in one string; write a list: "
                      "[wandb, mlflow]"),
])
def test_a_tracker_name_that_is_none_is_one_line_naming_the_fix(value, message):
    [found] = problems({**MINIMAL, "output": {"report_to": value}})  # one line, not one per union member
    assert found.startswith(message)


@pytest.mark.parametrize("bad", ["train.learning_rate", "=3", "train.max_steps.x=1"])
def test_bad_override_is_usage_error(tmp_path, bad):
    with pytest.raises(UsageError):
        apply_overrides({"train": {"max_steps": 3}}, [bad])


def test_tilde_override_removes_a_key_the_recipe_sets(tmp_path):
    """A 4-bit recipe run unquantized: its model.double_quant would be refused as without effect, and --set
    '~model.double_quant' removes it; removing a key the recipe does not set is refused (it would change nothing)."""
    data = {**MINIMAL, "model": {**MINIMAL["model"], "quantization": "nf4", "double_quant": True}}
    path = write(tmp_path, data)
    with pytest.raises(RecipeError, match="model.double_quant: only applies to a 4-bit base"):
        load_recipe(path, ["model.quantization=none"])
    recipe = load_recipe(path, ["model.quantization=none", "~model.double_quant"])
    assert recipe.model.quantization == "none" and "double_quant" not in recipe.model.model_fields_set
    with pytest.raises(UsageError, match=r"--set ~train.keep_last: the recipe does not set train.keep_last"):
        load_recipe(path, ["~train.keep_last"])
    for bad in ("~model", "~model.double_quant=true", "~.x"):
        with pytest.raises(UsageError, match="~KEY removes a key the recipe sets"):
            apply_overrides(dict(data), [bad])


def test_output_dir_and_a_set_output_dir_that_differ_are_refused(tmp_path):
    """train --set output.dir=runs/a --output-dir runs/b: before, the run went to runs/b without a word."""
    path = write(tmp_path, MINIMAL)
    with pytest.raises(UsageError, match=r"^--set output.dir=runs/a: --output-dir runs/b sets output.dir to runs/b; "
                                         "drop one of the two$"):
        load_recipe(path, ["output.dir=runs/a"], output_dir="runs/b")
    assert load_recipe(path, ["output.dir=runs/a"], output_dir="runs/a").output.dir == "runs/a"
    assert load_recipe(path, ["train.seed=3"], output_dir="runs/b").output.dir == "runs/b"


def test_override_unknown_key_suggests(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(RecipeError, match="train.learnig_rate: unknown key; did you mean learning_rate"):
        load_recipe(path, ["train.learnig_rate=1"])


def test_resolved_recipe_round_trips(tmp_path):
    recipe = parse_recipe({**MINIMAL, "adapter": {"r": 4, "use_rslora": True}, "data": {"train": ["a.jsonl", "b.csv"]}})
    path = write(tmp_path, dump_recipe(recipe), "resolved.yaml")
    again = load_recipe(path)
    assert again == recipe
    assert dump_recipe(again) == dump_recipe(recipe)


def test_yaml_errors(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match=r"bad.yaml:\d+:\d+: invalid YAML"):
        load_recipe(write(tmp_path, "model:\n  - [unclosed\n", "bad.yaml"))
    with pytest.raises(RecipeError, match="invalid YAML"):  # safe_load refuses python tags
        load_recipe(write(tmp_path, "model: !!python/object/apply:os.system ['echo hi']\n", "evil.yaml"))
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n", "list.yaml"))
    with pytest.raises(RecipeError, match="empty"):
        load_recipe(write(tmp_path, "", "empty.yaml"))


def test_schema_errors_are_worded_from_pydantic_structured_context_not_its_message_text():
    """A reworded (or translated) pydantic message changes nothing: choices come from the schema's Literal,
    bounds from err["ctx"]."""
    from lorakit.config.load import _format_error

    bound = {"type": "greater_than", "loc": ("adapter", "r"), "msg": "Eingabe muss größer als 0 sein", "input": -1,
             "ctx": {"gt": 0}}
    assert _format_error(bound) == "adapter.r: must be > 0, got -1"
    literal = {"type": "literal_error", "loc": ("model", "quantization"), "msg": "ungültig", "input": "nf5",
               "ctx": {"expected": "?"}}
    message = _format_error(literal)
    assert message.startswith("model.quantization: must be none, nf4, fp4, int8; got 'nf5'")
    assert "nf4" in message.split("got 'nf5'")[1]  # the did-you-mean suggestion


def test_lorakit_config_class_errors_are_raised_as_usage_errors_by_type():
    from lorakit.config.methods import BottleneckConfig
    from lorakit.errors import OptionError, UsageError

    with pytest.raises(OptionError) as raised:
        BottleneckConfig(r=0)
    assert isinstance(raised.value, UsageError) and isinstance(raised.value, ValueError)
    assert str(raised.value).startswith("adapter.r:")
