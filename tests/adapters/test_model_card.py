"""DIR/adapter/README.md and merged/README.md: a Hugging Face card (not PEFT's placeholder) from the run's records."""

import hashlib

import yaml
from huggingface_hub import ModelCard
from run_helpers import cli, recipe_dict, write_recipe

from lorakit.testing import write_memorisation_data


def test_adapter_and_merged_model_cards(tiny_model_dir, tmp_path, tmp_path_factory):
    data = write_memorisation_data(tmp_path / "train.jsonl")
    recipe = recipe_dict(tiny_model_dir, data, tmp_path / "run", max_steps=3)
    recipe["data"]["eval_split"] = 0.25
    recipe["output"]["save"] = "both"
    assert cli("train", write_recipe(tmp_path / "recipe.yaml", recipe)).exit_code == 0
    run = tmp_path / "run"

    text = (run / "adapter" / "README.md").read_text()
    assert "More Information Needed" not in text  # PEFT's placeholder is gone
    card = ModelCard.load(run / "adapter" / "README.md")  # the hub's own parser reads the front matter
    # A base on disk is no hub id: the hub refuses a card whose base_model is a path, so it is left out.
    assert card.data.base_model is None and card.data.library_name == "peft"
    assert f"from `{tiny_model_dir}`" in text
    assert card.data.pipeline_tag == "text-generation" and card.data.tags == ["lorakit", "lora"]
    assert hashlib.sha256(data.read_bytes()).hexdigest() in text  # data provenance
    assert "train: 6 rows, 6 kept" in text and "| steps | 3 |" in text and "| eval loss |" in text
    assert "| r | `4` |" in text and "AutoPeftModelForCausalLM" in text and "lorakit generate" in text
    assert "hf upload USER/REPO" in text  # the locked huggingface_hub has `hf`, no huggingface-cli

    # The card's loading code runs as written, for the adapter and for the merged model.
    for folder in ("adapter", "merged"):
        card_text = (run / folder / "README.md").read_text()
        code = card_text.split("```python\n")[1].split("```")[0].replace("THIS_DIR_OR_REPO", str(run / folder))
        namespace: dict = {}
        exec(code, namespace)  # noqa: S102 - the snippet the card shows users
        assert namespace["model"] is not None and namespace["tokenizer"] is not None

    merged = ModelCard.load(run / "merged" / "README.md")
    assert merged.data.library_name == "transformers" and "merged" in merged.data.tags
    assert "merge base precision" in merged.text and "AutoModelForCausalLM" in merged.text

    # `lorakit merge` of a bare adapter (no run around it) still writes a card from the adapter's records.
    elsewhere = tmp_path_factory.mktemp("bare")  # apart from the run: merge refuses an output inside it
    bare = elsewhere / "bare"
    (run / "adapter").rename(bare)
    result = cli("merge", bare, "-o", elsewhere / "m2")
    assert result.exit_code == 0, result.output
    front = yaml.safe_load((elsewhere / "m2" / "README.md").read_text().split("---")[1])
    assert "base_model" not in front and front["tags"] == ["lorakit", "lora", "merged"]


def test_a_hub_base_is_the_cards_base_model(tmp_path):
    """A base given as a hub id (recorded unresolved: nothing local by that name) is the hub's base_model link."""
    from lorakit.adapters.card import build_card

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (adapter / "lorakit.json").write_text('{"base_model": "mistralai/Mistral-7B-v0.1", '
                                          '"base_model_path": "mistralai/Mistral-7B-v0.1", "quantization": "nf4"}')
    front = yaml.safe_load(build_card(adapter).split("---")[1])
    assert front["base_model"] == "mistralai/Mistral-7B-v0.1" and front["tags"] == ["lorakit", "qlora"]
