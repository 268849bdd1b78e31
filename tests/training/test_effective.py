"""The effective-settings block (`lorakit train` prints it, run.json records it, `lorakit explain RUN` prints it
again): every recipe key has a line showing what it did, or a documented reason in NOT_OBSERVED."""

from __future__ import annotations

import json

import pytest

from lorakit.training.effective import NOT_OBSERVED
from lorakit.config.load import parse_recipe
from lorakit.config.schema import describe_keys
from lorakit.training.run import run_training
from run_helpers import cli, recipe_dict, write_data


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("effective")
    data = write_data(root / "d.jsonl", 8)
    out = {}
    for name, adapter, model, train in [
        ("pissa", {"init_lora_weights": "pissa", "loraplus_lr_ratio": 16}, {}, {}),
        ("dora-nf4", {"method": "dora"}, {"quantization": "nf4", "add_tokens": ["<tool>"]}, {"warmup_steps": 1}),
        ("bottleneck", {"method": "bottleneck", "dropout": 0.1, "lora_dropout": None, "target_modules": None}, {}, {}),
    ]:
        recipe = recipe_dict(tiny_model_dir, data, root / name, max_steps=2, adapter=adapter)
        recipe["model"].update(model)
        recipe["train"].update(train)
        out[name] = run_training(parse_recipe(recipe))
    return out


def settings(run) -> dict[str, dict]:
    return {s["label"]: s for s in json.loads((run / "run.json").read_text())["effective_settings"]}


def test_every_recipe_key_has_a_line_or_a_reason(runs):
    covered = {k for run in runs.values() for s in settings(run).values() for k in s["keys"]}
    missing = [key for key, _, _ in describe_keys() if key not in covered and key not in NOT_OBSERVED]
    assert missing == [], f"keys with no effective-settings line and no reason in NOT_OBSERVED: {missing}"
    assert not set(NOT_OBSERVED) & covered, "a key with a line needs no reason"
    assert set(NOT_OBSERVED) <= {key for key, _, _ in describe_keys()}


def test_lines_show_what_took_effect(runs):
    pissa, dora = settings(runs["pissa"]), settings(runs["dora-nf4"])
    assert pissa["init"]["value"].startswith("pissa: base rewritten in 4 modules, converted at save: yes")
    assert pissa["optimizer"]["value"] == "AdamW (fused), 2 groups: 4 tensors at lr 0.001; 4 tensors at lr 0.016"
    assert dora["optimizer"]["value"].startswith("AdamW (fused), 1 group: ")
    assert dora["trainable tokens"]["value"] == "embed_tokens: 1 rows, lm_head: 1 rows"
    assert "added <tool>" in dora["tokenizer"]["value"] and pissa["trainable tokens"]["value"] == "none"
    assert pissa["modules adapted"]["value"] == "4: q_proj ×2, v_proj ×2"
    assert pissa["rank / scale"]["value"] == "r [4], scale [2.0] (alpha/r)"
    assert dora["dropout"]["value"] == "p [0.1], CPU masks from 16 random bits per element (LoraDropout)"
    bottleneck = settings(runs["bottleneck"])  # its adapters' dropout is LoRA's too (before: nn.Dropout, no line)
    assert bottleneck["dropout"]["value"] == dora["dropout"]["value"] and bottleneck["dropout"]["keys"] == [
        "adapter.dropout"]
    assert pissa["quantization"]["value"] == "none (0 quantized layers)"
    assert dora["DoRA magnitude vectors"]["value"] == "4"
    assert dora["quantization"]["value"].startswith("14 layers nf4, stored as float32, double quant on")
    assert pissa["DoRA magnitude vectors"]["value"] == "0"
    assert pissa["schedule"]["value"] == "LambdaLR (cosine), warmup 0 steps, 2 steps"
    assert dora["schedule"]["value"] == "LambdaLR (cosine), warmup 1 steps from LR 0 at step 1, 2 steps"
    lrs = [json.loads(line).get("lr") for line in (runs["dora-nf4"] / "metrics.jsonl").read_text().splitlines()]
    assert [lr for lr in lrs if lr is not None][0] == 0  # as the line says: transformers' warmup starts at 0


def test_explain_prints_the_recorded_block(runs, tmp_path):
    result = cli("explain", runs["pissa"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("effective settings:")
    assert all(label in result.output for label in settings(runs["pissa"]))
    missing = cli("explain", tmp_path)
    assert missing.exit_code == 2 and "run.json not found" in missing.output
    # a file: was "explain: FILE/run.json not found"
    given = cli("explain", runs["pissa"] / "run.json")
    assert given.exit_code == 2 and f"is a file, not a run directory; lorakit explain {runs['pissa']}" in given.output
    given = cli("explain", runs["pissa"] / "metrics.jsonl")
    assert given.exit_code == 2 and "is a file, not a run directory; give the directory" in given.output
    # --json-logs: one event carrying the records (stdout was the text block, no JSON line)
    as_json = cli("--json-logs", "explain", runs["pissa"])
    assert as_json.exit_code == 0, as_json.output
    (event,) = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert event["event"] == "effective_settings" and event["run"] == str(runs["pissa"])
    assert [s["label"] for s in event["settings"]] == list(settings(runs["pissa"]))


def test_chat_template_line_names_each_sources_template_where_they_differ(tiny_model_dir):
    from lorakit.config.schema import DataSection, ModelSection, TrainSource
    from lorakit.models.loading import load_tokenizer
    from lorakit.training.effective import _templates

    tok = load_tokenizer(ModelSection(name_or_path=str(tiny_model_dir)), str(tiny_model_dir))
    assert _templates(DataSection(train="a.jsonl"), tok, "<e>") == "none (not a chat format)"
    assert _templates(DataSection(train="a.jsonl", format="chat", chat_template="llama3"), tok, "<e>") == (
        "llama3, end of turn '<e>'")
    mixed = DataSection(train=["a.jsonl", TrainSource(path="b.jsonl", format="chat", chat_template="zephyr"),
                               TrainSource(path="c.jsonl", format="chat")])
    assert _templates(mixed, tok, "<e>") == (f"zephyr for b.jsonl; the tokenizer's ({tok.name_or_path}) for c.jsonl "
                                             f"(the adapter keeps the tokenizer's ({tok.name_or_path})), end of turn '<e>'")


@pytest.mark.parametrize("content, needle", [
    (b"{", "is not valid JSON"),
    (b"[]", "holds a JSON list"),
    (b"\xff\xfe{}", "UTF-16"),
    (b'{"effective_settings": "x"}', "not a list of {label, value} records"),
    (b'{"effective_settings": [{"label": 1, "value": 2}]}', "not a list of {label, value} records"),
])
def test_explain_names_a_damaged_run_json_in_one_line(tmp_path, content, needle):
    (tmp_path / "run.json").write_bytes(content)
    result = cli("explain", tmp_path)
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and "rerun the training" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_ia3_line_names_the_modules_peft_chose(tiny_model_dir):
    """IA3 with target_modules null takes PEFT's per-architecture modules; the block had no line saying which
    (only LoRA layers were looked for)."""
    from lorakit.adapters.build import build_model
    from lorakit.adapters.inits import InitRecord
    from lorakit.training.effective import _adapter_lines

    recipe = parse_recipe(recipe_dict(tiny_model_dir, "unused.jsonl", "unused", adapter={
        "method": "ia3", "r": None, "lora_dropout": None, "target_modules": None}))
    lines = {s.label: s for s in _adapter_lines(recipe, build_model(recipe), InitRecord())}
    assert lines["modules adapted"].value == ("6: k_proj ×2, v_proj ×2, down_proj ×2; input scaled (feedforward): "
                                              "down_proj")
    assert lines["modules adapted"].keys == ("adapter.target_modules",)
