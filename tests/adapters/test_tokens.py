"""model.add_tokens and adapter.trainable_tokens: new tokens in the tokenizer and the embedding, their rows trained
through PEFT's trainable_token_indices and saved as rows only, the tokenizer saved with the adapter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import RecipeError, UsageError
from lorakit.adapters.build import build_model, load_adapter
from lorakit.models.loading import load_base_model, load_tokenizer
from lorakit.config.load import parse_recipe
from lorakit.training.run import save_adapter
from run_helpers import recipe_dict

NEW = ["<tool>", "</tool>"]


def make_recipe(model_dir, adapter: dict, **model):
    return parse_recipe({"model": {"name_or_path": str(model_dir), "dtype": "float32", **model}, "adapter": adapter,
                         "data": {"train": "unused.jsonl"}, "train": {"max_steps": 3}})


def token_batch(tokenizer):
    ids = tokenizer("call <tool> now </tool> done", return_tensors="pt").input_ids
    return ids


def test_new_tokens_train_and_save_as_rows(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = make_recipe(tiny_model_dir, {"r": 4, "target_modules": ["q_proj"]}, add_tokens=NEW)
    tokenizer = load_tokenizer(recipe.model, str(tiny_model_dir))
    base_vocab = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    assert len(tokenizer) == base_vocab + 2
    ids = token_batch(tokenizer)
    assert set(tokenizer.convert_tokens_to_ids(NEW)) <= set(ids[0].tolist())  # never split

    torch.manual_seed(0)
    model = build_model(recipe, str(tiny_model_dir), tokenizer=tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == base_vocab + 2
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum("trainable_tokens_delta" in n for n in trainable) == 2  # embedding and the untied head
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits

    save_adapter(model, tokenizer, recipe, tmp_path / "adapter", str(tiny_model_dir))
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    rows = {k: v.shape for k, v in tensors.items() if "trainable_tokens" in k}
    assert sorted(rows.values()) == [(2, 64), (2, 64)]  # the new rows only, no whole embedding matrix
    assert not any(k.endswith(("embed_tokens.weight", "lm_head.weight")) for k in tensors)
    assert len(AutoTokenizer.from_pretrained(tmp_path / "adapter")) == base_vocab + 2
    assert json.loads((tmp_path / "adapter" / "lorakit.json").read_text())["vocab_size"] == base_vocab + 2

    reloaded = load_adapter(load_base_model(recipe.model, str(tiny_model_dir)), tmp_path / "adapter").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base.resize_token_embeddings(base_vocab + 2)  # plain PEFT: grow the base to the saved tokenizer
    plain = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, atol=1e-5, rtol=0)
        torch.testing.assert_close(plain(input_ids=ids).logits, trained, atol=1e-5, rtol=0)

    from lorakit.tools.generate import load_for_generation
    from lorakit.config.schema import ModelSection

    served, served_tokenizer = load_for_generation(ModelSection(name_or_path=str(tiny_model_dir)),
                                                   {"new": tmp_path / "adapter"}, allow_pickle=False, device="cpu")
    assert len(served_tokenizer) == base_vocab + 2  # the adapter's tokenizer: the new tokens decode
    with torch.no_grad():
        torch.testing.assert_close(served.eval()(input_ids=ids).logits, trained, atol=1e-5, rtol=0)

    from run_helpers import cli

    result = cli("merge", tmp_path / "adapter", "--output", tmp_path / "merged", "--base", tiny_model_dir)
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert len(AutoTokenizer.from_pretrained(tmp_path / "merged")) == base_vocab + 2
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, trained, atol=1e-5, rtol=0)


def test_existing_tokens_can_train_without_growing(tiny_model_dir):
    recipe = make_recipe(tiny_model_dir, {"r": 4, "target_modules": ["q_proj"], "trainable_tokens": ["a", "b"]})
    model = build_model(recipe, str(tiny_model_dir))
    assert model.get_input_embeddings().weight.shape[0] == load_base_model(recipe.model, str(tiny_model_dir)).vocab_size
    deltas = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    assert [tuple(p.shape) for p in deltas] == [(2, 64), (2, 64)]


@pytest.mark.parametrize("model,adapter,message", [
    ({"add_tokens": NEW}, {"method": "ia3"}, "method ia3 has none"),
    ({"add_tokens": NEW}, {"trainable_tokens": ["<tool>"]}, "'</tool>' not in adapter.trainable_tokens"),
    ({}, {"trainable_tokens": ["a"], "trainable_token_indices": [3]}, "remove one of them"),
])
def test_token_settings_that_cannot_work_are_refused(model, adapter, message, tiny_model_dir):
    data = recipe_dict(tiny_model_dir, "d.jsonl", "out")
    data["model"].update(model)
    data["adapter"] = adapter if adapter.get("method") == "ia3" else {**data["adapter"], **adapter}
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data)


def test_a_trainable_token_must_be_one_token(tiny_model_dir):
    recipe = make_recipe(tiny_model_dir, {"r": 4, "target_modules": ["q_proj"], "trainable_tokens": ["hello world"]})
    with pytest.raises(UsageError, match="'hello world' is .* tokens .* model.add_tokens"):
        build_model(recipe, str(tiny_model_dir))


def test_estimate_memory_counts_token_rows_as_training_does(tiny_model_dir, tmp_path):
    import yaml

    from run_helpers import cli

    adapter = {"r": 4, "target_modules": ["q_proj"]}
    recipe = make_recipe(tiny_model_dir, adapter, add_tokens=NEW)
    trainable, total = build_model(recipe, str(tiny_model_dir)).get_nb_trainable_parameters()
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir), "add_tokens": NEW},
                                    "adapter": adapter, "data": {"train": "x.jsonl"}, "train": {"max_steps": 1}}))
    result = cli("estimate-memory", path, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{"):])
    assert (data["trainable_params"], data["total_params"]) == (trainable, total)
