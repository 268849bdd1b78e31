"""Every shipped recipe validates against the schema (nothing loaded) and opens with how to run it."""

from pathlib import Path

import pytest
import yaml

from lorakit.config.docs import recipe_json_schema
from lorakit.config.load import parse_recipe, read_yaml

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
ALL_YAML = sorted(p for ext in ("*.yaml", "*.yml") for p in RECIPES.rglob(ext))


def is_accelerate_config(path: Path) -> bool:
    """recipes/accelerate/ holds accelerate's own config files, not lorakit recipes."""
    return "accelerate" in path.relative_to(RECIPES).parts[:-1]


LORAKIT_RECIPES = [p for p in ALL_YAML if not is_accelerate_config(p)]
ACCELERATE_CONFIGS = [p for p in ALL_YAML if is_accelerate_config(p)]


def _id(path: Path) -> str:
    return str(path.relative_to(RECIPES))


@pytest.mark.parametrize("path", LORAKIT_RECIPES, ids=_id)
def test_recipe_validates(path):
    parse_recipe(read_yaml(path), source=str(path))


@pytest.mark.parametrize("path", LORAKIT_RECIPES, ids=_id)
def test_recipe_matches_the_published_json_schema(path):
    """What `lorakit schema` hands to editors accepts every shipped recipe."""
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(yaml.safe_load(path.read_text()), recipe_json_schema())


@pytest.mark.parametrize("path", LORAKIT_RECIPES, ids=_id)
def test_recipe_opens_with_command_override_and_memory(path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    assert str(path.relative_to(ROOT)) in text, "the header must give the exact command that runs this recipe"
    assert "--set " in text, "the header must show one override example"
    assert "memory" in text.lower(), "the header must give the estimated memory (or how to get it)"


def test_accelerate_configs_are_yaml_mappings():
    for path in ACCELERATE_CONFIGS:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


def test_gallery_covers_the_methods_and_precisions():
    recipes = [parse_recipe(read_yaml(p)) for p in LORAKIT_RECIPES]
    methods = {r.adapter.method for r in recipes}
    assert {"lora", "dora", "ia3"} <= methods
    assert any(r.model.quantization == "nf4" for r in recipes)
    assert (RECIPES / "smoke.yaml").is_file() and (RECIPES / "cpu-demo.yaml").is_file()


def test_init_cpu_demo_is_the_shipped_recipe():
    """`lorakit init cpu-demo` writes recipes/cpu-demo.yaml (the recipe `make demo` runs and the docs' numbers
    come from), comments and the schema's defaults aside: the template sets exactly the recipe's keys and values."""
    from lorakit.config.init import TEMPLATES, render

    shipped = read_yaml(RECIPES / "cpu-demo.yaml")
    assert TEMPLATES["cpu-demo"].overrides == shipped
    written = parse_recipe(yaml.safe_load(render("cpu-demo")))
    assert written.model_dump() == parse_recipe(shipped).model_dump()


def test_mistral_lora_is_the_seed_recipe():
    r = parse_recipe(read_yaml(RECIPES / "mistral-7b-lora.yaml"))
    assert r.model.name_or_path == "mistralai/Mistral-7B-v0.1"
    assert (r.adapter.method, r.adapter.r, r.adapter.lora_alpha, r.adapter.lora_dropout) == ("lora", 16, 32, 0.05)
    assert r.adapter.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert r.train.lr_scheduler == "cosine"
