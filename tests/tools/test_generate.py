"""`lorakit generate`: adapters hot-swapped on one base give what each gives alone; `base` is the plain base."""

import json

import pytest
import torch
from peft import LoraConfig
from typer.testing import CliRunner

from lorakit.cli.main import app
from lorakit.tools.generate import BASE, Request, generate_one, load_for_generation
from lorakit.config.schema import ModelSection
from lorakit.testing import build_random_adapter

PROMPTS = ["The capital of France is", "1 2 3 4 5"]
SETTINGS = {"chat": False, "max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "seed": 0}


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    return {
        "math": build_random_adapter(tiny_model_dir, root / "math", LoraConfig(
            r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False), seed=1),
        "code": build_random_adapter(tiny_model_dir, root / "code", LoraConfig(
            r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False), seed=2),
    }


def completions(tiny_model_dir, adapters: dict, name: str) -> list[str]:
    model, tokenizer = load_for_generation(ModelSection(name_or_path=str(tiny_model_dir)), adapters,
                                           allow_pickle=False, device="cpu")
    return [generate_one(model, tokenizer, Request(name, prompt=p), **SETTINGS) for p in PROMPTS]


def test_hot_swapped_adapters_match_each_adapter_alone_and_base_matches_plain_base(tiny_model_dir, two_adapters):
    model, tokenizer = load_for_generation(ModelSection(name_or_path=str(tiny_model_dir)), two_adapters,
                                           allow_pickle=False, device="cpu")
    # Interleaved on purpose: every request switches adapter.
    served = {name: [] for name in (*two_adapters, BASE)}
    for prompt in PROMPTS:
        for name in served:
            served[name].append(generate_one(model, tokenizer, Request(name, prompt=prompt), **SETTINGS))
    for name, path in two_adapters.items():
        assert served[name] == completions(tiny_model_dir, {name: path}, name)
    assert served[BASE] == completions(tiny_model_dir, {}, BASE)
    # Not vacuous: the adapters really change the model's next-token distribution.
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        model.set_adapter("math")
        with_adapter = model(ids).logits
        with model.disable_adapter():
            without = model(ids).logits
    assert (with_adapter - without).abs().max() > 1e-2


def test_cli_file_routes_each_row_to_its_adapter(tiny_model_dir, two_adapters, tmp_path):
    rows = [{"prompt": PROMPTS[0], "adapter": "code"}, {"prompt": PROMPTS[0], "adapter": "base"},
            {"messages": [{"role": "user", "content": "hi"}], "adapter": "math"}, {"prompt": PROMPTS[1]}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["generate", "--model", str(tiny_model_dir), "--adapter", f"math={two_adapters['math']}",
            "--adapter", f"code={two_adapters['code']}", "--max-new-tokens", "4"]
    result = CliRunner().invoke(app, [*args, "--file", str(prompts)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [line["adapter"] for line in lines] == ["code", "base", "math", "math"]  # default: the first --adapter
    assert all(isinstance(line["completion"], str) for line in lines)

    prompts.write_text(json.dumps({"prompt": "x", "adapter": "poetry"}) + "\n")
    result = CliRunner().invoke(app, [*args, "--file", str(prompts)])
    assert result.exit_code == 3 and "prompts.jsonl:1" in result.output and "poetry" in result.output


@pytest.mark.parametrize("args, code", [
    (["--adapter", "base=DIR", "--prompt", "x"], 2),  # reserved name
    (["--prompt", "x", "--file", "p.jsonl"], 2),  # both inputs
    (["--adapter", "a=/nonexistent", "--prompt", "x"], 4),
    (["--prompt", "x", "--use", "missing"], 2),
])
def test_cli_usage_errors(tiny_model_dir, two_adapters, args, code):
    args = [a.replace("DIR", str(two_adapters["math"])) for a in args]
    result = CliRunner().invoke(app, ["generate", "--model", str(tiny_model_dir), *args])
    assert result.exit_code == code, result.output


def test_bottleneck_adapter_is_served_and_disabled_for_base(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit.config.methods import BottleneckConfig
    from lorakit.adapters.bottleneck import BottleneckModel

    wrapped = BottleneckModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir), BottleneckConfig(r=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for param in wrapped.adapters.parameters():
            param.normal_(0, 0.5)  # up starts at zero: make the adapter do something
    wrapped.save_pretrained(tmp_path / "bottleneck")
    model, tokenizer = load_for_generation(ModelSection(name_or_path=str(tiny_model_dir)),
                                           {"bn": tmp_path / "bottleneck"}, allow_pickle=False, device="cpu")
    assert [generate_one(model, tokenizer, Request(BASE, prompt=p), **SETTINGS) for p in PROMPTS] == completions(
        tiny_model_dir, {}, BASE)
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        with_adapter = model(ids).logits
        with model.disable_adapter():
            without = model(ids).logits
    assert (with_adapter - without).abs().max() > 1e-2


@pytest.mark.parametrize("line", [b'{"prompt": ', b'["a", "b"]', b'{"prompt": "caf\xe9"}', b"[" * 100_000],
                         ids=["invalid-json", "not-an-object", "not-utf8", "too-deep"])
def test_a_bad_prompt_line_reads_as_a_bad_training_row(tiny_model_dir, tmp_path, line):
    """generate reads its --file with the data layer's JSON Lines reader: the same message, naming file and line."""
    from lorakit.data.sources import BadRowError, read_rows

    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n' + line + b"\n")
    with pytest.raises(BadRowError) as training:
        read_rows(str(path))
    assert training.value.reason.startswith(f"{path}:2")
    result = CliRunner().invoke(app, ["generate", "--model", str(tiny_model_dir), "--file", str(path)])
    assert result.exit_code == 3
    assert training.value.reason in " ".join(result.output.split())
