"""`lorakit inspect`: shapes from the meta device, PEFT's own counts, the seed's rank table."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from lorakit.errors import EXIT_USAGE, UsageError
from lorakit.tools.inspect import RANKS, format_report, inspect_model, inspect_sections, lora_params, rank_table
from lorakit.config.load import parse_targets
from lorakit.adapters.build import build_model
from lorakit.config.load import parse_recipe
from run_helpers import cli

TINY_METHODS = {
    "lora": {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
    "dora": {"method": "dora", "r": 8},
    "rslora": {"method": "lora", "r": 4, "use_rslora": True, "modules_to_save": ["lm_head"]},
    "ia3": {"method": "ia3"},
    "prefix": {"method": "prefix", "num_virtual_tokens": 5, "prefix_projection": True, "encoder_hidden_size": 8},
    "prompt": {"method": "prompt", "num_virtual_tokens": 5, "prompt_tuning_init_text": "Count to three"},
    "bottleneck": {"method": "bottleneck", "r": 8, "placement": ["mlp"]},
}


def has_row(text: str, *cells: str) -> bool:
    """A table line holding exactly these cells, whatever the column padding."""
    pattern = r"^\s*" + r"\s+".join(map(re.escape, cells)) + r"\s*$"
    return re.search(pattern, text, re.MULTILINE) is not None


@pytest.fixture(scope="module")
def llama_7b_dir(tmp_path_factory):
    """Only the config.json of a Llama-2-7B-shaped model (transformers' LlamaConfig defaults): no weights."""
    from transformers import LlamaConfig

    out = tmp_path_factory.mktemp("llama-7b-config")
    LlamaConfig().save_pretrained(out)
    return out


def test_rank_table_for_a_4096_matrix():
    [(shape, modules, counts, full)] = rank_table({(4096, 4096): ["q_proj"]})
    assert RANKS == (1, 4, 8, 16, 64)
    assert counts == [8_192, 32_768, 65_536, 131_072, 524_288] and full == 16_777_216
    assert lora_params(4096, 4096, 16) == 131_072 and lora_params(11008, 4096, 1) == 15_104


def test_inspect_a_7b_config_loads_no_weights(llama_7b_dir):
    model, adapter = inspect_sections(None, str(llama_7b_dir), None, None, None, [])
    report = inspect_model(model, adapter)
    assert ("q_proj", 32, (4096, 4096)) in report.linear and ("down_proj", 32, (4096, 11008)) in report.linear
    row = next(r for r in report.rank_rows if r[0] == (4096, 4096))
    assert row[1] == ["q_proj", "k_proj", "v_proj", "o_proj"] and row[2] == [8_192, 32_768, 65_536, 131_072, 524_288]
    # r=16 on all 7 projections of 32 layers: 32·(4·131,072 + 3·241,664); PEFT's count of the same model
    assert report.trainable_params == 32 * (4 * 131_072 + 3 * 241_664) == 39_976_960
    assert ("q_proj", 32, 131_072, 4_194_304) in report.trainable
    text = format_report(report)
    assert has_row(text, "4096×4096", "8,192", "32,768", "65,536", "131,072", "524,288", "16,777,216",
                   "q_proj,k_proj,v_proj,o_proj")
    assert "trainable params: 39,976,960 || all params: 6,778,392,576 || trainable%: 0.5898" in text


@pytest.mark.parametrize("name", list(TINY_METHODS))
def test_counts_match_peft_on_the_real_model(name, tiny_model_dir):
    data = {"model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"}, "adapter": TINY_METHODS[name],
            "data": {"train": "x.jsonl"}, "train": {"max_steps": 1}}
    recipe = parse_recipe(data)
    report = inspect_model(recipe.model, recipe.adapter)
    real_trainable, real_total = build_model(recipe).get_nb_trainable_parameters()
    assert (report.trainable_params, report.all_params) == (real_trainable, real_total)
    assert sum(total for _, _, _, total in report.trainable) == real_trainable


def test_inspect_cli_model_mode(tiny_model_dir):
    result = cli("inspect", "--model", tiny_model_dir, "--method", "dora", "--r", "2", "--targets", "q_proj,v_proj")
    assert result.exit_code == 0, result.output
    assert "adapter: dora r=2 lora_alpha=4 lora_dropout=0.05 target_modules=q_proj,v_proj" in result.output
    assert has_row(result.output, "gate_proj", "2", "128×64", "8,192")
    assert has_row(result.output, "q_proj", "2", "320", "640")  # r·(64 + 64) + DoRA's 64 magnitudes
    assert has_row(result.output, "128×64", "192", "768", "1,536", "3,072", "12,288", "8,192", "gate_proj,up_proj")
    # --json-logs: the report as one event, the tables as named fields (stdout was the text tables)
    result = cli("--json-logs", "inspect", "--model", tiny_model_dir, "--method", "dora", "--r", "2", "--targets",
                 "q_proj,v_proj")
    assert result.exit_code == 0, result.output
    (event,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert event["event"] == "inspect" and event["adapter"].startswith("dora r=2")
    assert {"module": "gate_proj", "count": 2, "shape": [128, 64]} in event["linear"]
    assert {"shape": [128, 64], "modules": ["gate_proj", "up_proj"], "full": 8192,
            "per_rank": {"1": 192, "4": 768, "8": 1536, "16": 3072, "64": 12288}} in event["rank_table"]

    result = cli("inspect", "--model", tiny_model_dir, "--method", "prefix", "--set", "adapter.num_virtual_tokens=3")
    assert result.exit_code == 0, result.output
    # 3 virtual tokens × 2 layers × (key + value) × 32 (2 KV heads of 16)
    assert has_row(result.output, "prompt_encoder.default.embedding.weight", "1", "384", "384")
    assert "prefix tuning targets none of the linear modules above; the LoRA rank table is for lora and dora " \
        "(--method lora)" in result.output


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_inspect_of_a_prompt_learning_method_without_its_token_count_says_what_to_run(tiny_model_dir, method):
    """Before: 'inspect: adapter.num_virtual_tokens: required for method prefix (e.g. num_virtual_tokens: 20)', a
    recipe line where the user typed flags."""
    result = cli("inspect", "--model", tiny_model_dir, "--method", method)
    assert result.exit_code == EXIT_USAGE and "Traceback" not in result.output
    assert " ".join(result.stderr.split()) == (
        f"error: adapter.num_virtual_tokens: required for method {method}, which trains that many virtual tokens "
        f"instead of target modules; run: lorakit inspect --model {tiny_model_dir} --method {method} "
        "--set adapter.num_virtual_tokens=20")
    command = result.stderr.split("run: ")[1].split()
    assert cli(*command[1:]).exit_code == 0  # the command it names runs


def test_inspect_cli_recipe_mode_and_errors(tiny_model_dir, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir), "quantization": "nf4"},
        "adapter": {"method": "lora", "r": 4, "use_rslora": True}, "data": {"train": "x.jsonl"},
        "train": {"max_steps": 1},
    }))
    result = cli("inspect", path)
    assert result.exit_code == 0, result.output
    assert "model.quantization nf4: the adapter's counts are the same" in result.output
    result = cli("inspect", path, "--method", "ia3")  # keys ia3 has no use for (r, use_rslora) are dropped
    assert result.exit_code == 0, result.output
    assert "adapter: ia3 (PEFT's defaults: target_modules=down_proj,k_proj,v_proj feedforward_modules=down_proj)" \
        in result.output

    result = cli("inspect", path, "--targets", "qproj")
    assert result.exit_code == EXIT_USAGE and "did you mean q_proj?" in result.output
    result = cli("inspect", path, "--targets", r".*\.nothing")
    assert result.exit_code == EXIT_USAGE and "matches no module" in result.output
    result = cli("inspect")
    assert result.exit_code == EXIT_USAGE and "give a RECIPE or --model PATH" in result.output


def test_inspect_refuses_a_set_key_the_method_does_not_use_as_validate_does(tiny_model_dir, tmp_path):
    """--method drops the recipe's keys the method has no use for, never the user's --set keys. Before: the
    report printed with exit 0 and --set adapter.target_modules=[q_proj] took no effect."""
    prefix = ("--method", "prefix", "--set", "adapter.num_virtual_tokens=3")
    result = cli("inspect", "--model", tiny_model_dir, *prefix, "--set", "adapter.target_modules=[q_proj]")
    assert result.exit_code == EXIT_USAGE and len(result.stderr.strip().splitlines()) == 1, result.output
    assert result.stderr.strip() == "error: inspect: adapter.target_modules: not used by method prefix (prefix " \
        "tuning learns key/value prefixes and targets no modules); remove it"
    result = cli("inspect", "--model", tiny_model_dir, *prefix, "--set", "adapter.use_rslora=true")
    assert result.exit_code == EXIT_USAGE, result.output
    assert "adapter.use_rslora: unknown key for method prefix (PrefixTuningConfig); it is an option of method " \
        "lora/dora" in result.stderr

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir)}, "adapter": {"method": "lora", "r": 4},
        "data": {"train": "x.jsonl"}, "train": {"max_steps": 1},
    }))
    said = cli("validate", path, "--set", "adapter.method=ia3", "--set", "adapter.r=8").stderr
    result = cli("inspect", path, "--method", "ia3", "--set", "adapter.r=8")
    assert result.exit_code == EXIT_USAGE and result.stderr == said != "", result.output
    assert "adapter.r: not used by method ia3" in said
    assert cli("inspect", path, "--method", "ia3").exit_code == 0  # the recipe's r is dropped


def test_inspect_refuses_a_flag_that_would_override_a_set_key(tiny_model_dir):
    """--r 4 --set adapter.r=8: two answers, one was dropped without a word (the flag's)."""
    result = cli("inspect", "--model", tiny_model_dir, "--r", "4", "--set", "adapter.r=8")
    assert result.exit_code == EXIT_USAGE, result.output
    assert result.stderr.strip() == "error: --set adapter.r=8: --r 4 sets adapter.r to 4; drop one of the two"
    assert cli("inspect", "--model", tiny_model_dir, "--r", "4", "--set", "adapter.r=4").exit_code == 0


def test_parse_targets():
    assert parse_targets("all-linear") == "all-linear"
    assert parse_targets("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert parse_targets(r".*\.(q|v)_proj") == r".*\.(q|v)_proj"
    assert parse_targets("q_proj,,v_proj,") == ["q_proj", "v_proj"]  # a stray comma does not make it a regex
    for empty in ("", " ", ","):
        with pytest.raises(UsageError, match="--targets .*: empty"):
            parse_targets(empty)


def test_inspect_cli_unknown_method_is_one_usage_line(tiny_model_dir):
    result = cli("inspect", "--model", tiny_model_dir, "--method", "dorra")
    assert result.exit_code == EXIT_USAGE, result.output
    assert "--method: must be" in result.stderr and "did you mean dora?" in result.stderr  # the flag typed
    assert len(result.stderr.strip().splitlines()) == 1


def test_inspect_cli_model_mode_checks_set_on_other_sections(tiny_model_dir):
    """Without a recipe, data and train are placeholders beside what --set gives them, never silently over it."""
    result = cli("inspect", "--model", tiny_model_dir, "--set", "train.max_steps=ten")
    assert result.exit_code == EXIT_USAGE and "train.max_steps" in result.stderr, result.output
    assert cli("inspect", "--model", tiny_model_dir, "--set", "train.epochs=2").exit_code == 0


@pytest.mark.parametrize("model", ["qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B"])
def test_inspect_takes_estimate_memorys_offline_presets(model):
    """A preset, or the hub id it came from, offline (the suite runs with HF_HUB_OFFLINE=1): inspect refused both,
    as hub ids neither cached nor reachable, while estimate-memory took them from the same presets."""
    from lorakit.config.schema import AdapterSection, ModelSection
    from lorakit.models.presets import read_preset

    result = cli("inspect", "--model", model, "--r", "8", "--targets", "q_proj,v_proj")
    assert result.exit_code == 0, result.output
    assert "model: preset qwen2.5-0.5b (Qwen/Qwen2.5-0.5B) (qwen2, 24 layers, hidden 896;" in result.output
    report = inspect_model(ModelSection(name_or_path=model), AdapterSection(r=8, target_modules=["q_proj", "v_proj"]))
    # adapter: 24 layers × r·((896 + 896) + (896 + 128)) on q_proj, v_proj
    assert report.trainable_params == 24 * 8 * (896 * 2 + 896 + 128)
    assert report.all_params - report.trainable_params == read_preset("qwen2.5-0.5b")["_source"]["parameters"]


def test_inspect_of_an_unreachable_hub_id_names_the_offline_presets():
    """As estimate-memory's: a hub id neither cached nor reachable (the suite runs with HF_HUB_OFFLINE=1) ends in
    one line listing the presets that work offline."""
    result = cli("inspect", "--model", "org/unknown")
    assert result.exit_code == EXIT_USAGE, result.output
    assert result.stderr.startswith("error: --model: 'org/unknown' is a hub id that is not in the Hugging Face cache")
    assert "offline presets: " in result.stderr and "qwen2.5-0.5b" in result.stderr


def test_inspect_of_a_cached_hub_id_checks_the_hub_once_and_reads_its_revision(cached_hub_model, monkeypatch):
    """inspect asked whether the hub id was within reach itself (to name the presets) and then again through the
    config's loader, which read the default branch whatever model.revision said."""
    import lorakit.paths
    from lorakit.config.schema import AdapterSection, ModelSection

    asked = []
    probe = lorakit.paths.hub_unreachable
    monkeypatch.setattr(lorakit.paths, "hub_unreachable", lambda *a, **k: asked.append(a) or probe(*a, **k))
    adapter = AdapterSection(r=4, target_modules=["q_proj"])
    assert inspect_model(ModelSection(name_or_path=cached_hub_model), adapter).num_layers == 2
    assert len(asked) == 1
    assert inspect_model(ModelSection(name_or_path=cached_hub_model, revision="v3"), adapter).num_layers == 3
