"""`lorakit generate`: adapters hot-swapped on one base give what each gives alone; `base` is the plain base."""

import json

import pytest
import torch
from peft import LoraConfig
from typer.testing import CliRunner

from lorakit.cli.main import app
from lorakit.tools.generate import BASE, Request, generate_one, load_for_generation, peft_name
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
        model.set_adapter(peft_name("math"))
        with_adapter = model(ids).logits
        with model.disable_adapter():
            without = model(ids).logits
    assert (with_adapter - without).abs().max() > 1e-2


def test_any_adapter_name_loads_without_peft_warnings(tiny_model_dir, two_adapters):
    """PEFT warned "Adapter name 'a' should not be contained in the prefix 'lora_'" and then "Found missing adapter
    keys" (the other adapter's) for a name inside its prefix, and refused a name with a '.' (exit 4, blaming the
    base): the names given reach PEFT as peft_name digests."""
    import warnings

    named = {"a": two_adapters["math"], "my.v2": two_adapters["code"]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, tokenizer = load_for_generation(ModelSection(name_or_path=str(tiny_model_dir)), named,
                                               allow_pickle=False, device="cpu")
    assert [str(w.message) for w in caught if "adapter" in str(w.message).lower()] == []
    for name, path in named.items():
        served = [generate_one(model, tokenizer, Request(name, prompt=p), **SETTINGS) for p in PROMPTS]
        assert served == completions(tiny_model_dir, {name: path}, name)


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


def test_cli_takes_a_run_adapter_or_model_and_finds_the_base_the_adapter_records(tiny_model_dir, two_adapters,
                                                                                 tmp_path):
    """`lorakit generate RUN` as `lorakit eval RUN`: an adapter loads onto the base it records (was exit 2,
    "Missing option '--model'"); a model directory as TARGET loads alone, as --model."""
    def run(*args):
        return CliRunner().invoke(app, ["generate", *map(str, args), "--prompt", PROMPTS[0], "--max-new-tokens", "4"])

    math = two_adapters["math"]
    explicit, target = run("--model", tiny_model_dir, "--adapter", math), run(math)
    assert target.exit_code == 0, target.output
    assert target.stdout == explicit.stdout and target.stdout.strip()
    assert f"base model: {tiny_model_dir} (as the adapter records" in target.stderr
    assert run("--adapter", math).stdout == explicit.stdout  # --adapter alone finds the base too
    assert run(tiny_model_dir).stdout == run("--model", tiny_model_dir).stdout
    assert run().exit_code == 2 and "lorakit generate RUN" in run().output
    assert run(tiny_model_dir, "--model", tiny_model_dir).exit_code == 2
    assert run(tmp_path / "missing").exit_code == 4

    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({
        **json.loads((math / "adapter_config.json").read_text()), "base_model_name_or_path": str(tmp_path)}))
    (other / "adapter_model.safetensors").write_bytes((math / "adapter_model.safetensors").read_bytes())
    mixed = run(math, "--adapter", f"other={other}")
    assert mixed.exit_code == 2 and "record different bases" in mixed.output and "--model BASE" in mixed.output
    (other / "adapter_config.json").write_text(json.dumps({
        **json.loads((math / "adapter_config.json").read_text()), "base_model_name_or_path": None}))
    assert run(other).exit_code == 2 and "records no base model" in run(other).output


def test_a_run_that_saved_only_its_merged_model_is_generated_and_evaluated_with_it(tiny_model_dir, tmp_path):
    """output.save: merged leaves RUN/merged and no RUN/adapter: `generate RUN` and `eval RUN` said "RUN has no
    adapter_config.json" (exit 4); they use RUN/merged."""
    import shutil

    from lorakit.testing import write_memorisation_data

    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "merged")
    alone = CliRunner().invoke(app, ["generate", str(run / "merged"), "--prompt", PROMPTS[0], "--max-new-tokens", "4"])
    result = CliRunner().invoke(app, ["generate", str(run), "--prompt", PROMPTS[0], "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert result.stdout == alone.stdout and result.stdout.strip()
    data = write_memorisation_data(tmp_path / "rows.jsonl")
    scored = CliRunner().invoke(app, ["eval", str(run), "--data", str(data), "--max-new-tokens", "4",
                                      "-o", str(tmp_path / "eval.json")])
    assert scored.exit_code == 0, scored.output
    assert json.loads((tmp_path / "eval.json").read_text())["totals"]["tuned"]
    merged = CliRunner().invoke(app, ["merge", str(run), "-o", str(tmp_path / "again")])
    assert merged.exit_code == 4 and "saved its merged model only" in merged.output  # was: "give an adapter dir"


@pytest.mark.parametrize("args, code", [
    (["--adapter", "base=DIR", "--prompt", "x"], 2),  # reserved name
    (["--prompt", "x", "--file", "p.jsonl"], 2),  # both inputs
    (["--adapter", "a=/nonexistent", "--prompt", "x"], 4),
    (["--prompt", "x", "--use", "missing"], 2),
    (["--prompt", "x", "--top-p", "0.5"], 2),  # greedy: sampling options would do nothing
    (["--prompt", "x", "--seed", "3"], 2),
    (["--prompt", "x", "--max-new-tokens", "512"], 2),  # the tiny model's whole context: past its positions
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


@pytest.fixture(scope="module")
def prompt_learning_adapters(tiny_model_dir, tmp_path_factory):
    """A prefix- and a prompt-tuning adapter with PEFT's random (N(0, 1)) virtual tokens: far from neutral."""
    from peft import PrefixTuningConfig, PromptTuningConfig

    root = tmp_path_factory.mktemp("prompt-learning")
    return {
        "prefix": build_random_adapter(tiny_model_dir, root / "prefix", PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4), seed=3),
        "prompt": build_random_adapter(tiny_model_dir, root / "prompt", PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4), seed=4),
    }


def _forward_greedy(model, ids: torch.Tensor, steps: int, stop=()) -> list[int]:
    """Greedy tokens from whole-sequence forwards (what training computes), no cache, through the first of
    ``stop``; a prompt-tuning model's logits start with its virtual positions, so the last position is read."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        if ids[0, -1].item() in stop:
            break
    return ids[0].tolist()


def test_peft_prompt_learning_generation_broken_before_0_22(tiny_model_dir, prompt_learning_adapters):
    """The sentinel of lorakit.compat's _generate_with_prefix and prompt_learning_uncached: before PEFT 0.22,
    PEFT's own cached generate() with a prefix adapter gives the base model's first-token logits, and with a prompt
    adapter drifts from the forward after the first token; from 0.22 on both follow the forward. Fails when the
    installed PEFT behaves otherwise than compat.peft_generate_breaks_prompt_learning says."""
    from lorakit.compat import peft_generate_breaks_prompt_learning

    section = ModelSection(name_or_path=str(tiny_model_dir), dtype="float32")
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    broken = []
    for name, path in prompt_learning_adapters.items():
        model, _ = load_for_generation(section, {"a": path}, allow_pickle=False, device="cpu")
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False, output_scores=True, return_dict_in_generate=True)
            with model.disable_adapter():
                base_first = model(input_ids=ids).logits[0, -1]
            forced = model(input_ids=out.sequences, attention_mask=torch.ones_like(out.sequences)).logits[0]
        if name == "prefix":
            broken.append(torch.allclose(out.scores[0][0], base_first, atol=1e-5))
        else:
            last = forced.shape[0] - out.sequences.shape[1] + ids.shape[1] - 1
            drift = max((out.scores[i][0] - forced[last + i]).abs().max().item() for i in range(6))
            broken.append(drift > 1e-3)
    needed = peft_generate_breaks_prompt_learning()
    assert broken == [needed, needed]


def test_the_prompt_learning_workarounds_apply_before_peft_0_22():
    from lorakit.compat import peft_generate_breaks_prompt_learning

    assert all(map(peft_generate_breaks_prompt_learning, ["0.17.0", "0.21.2", "0.22.0.dev0"]))
    assert not any(map(peft_generate_breaks_prompt_learning, ["0.22.0", "0.22.1", "1.0.0"]))


def test_before_peft_0_22_only_a_prompt_tuning_adapter_generates_uncached_and_row_by_row(
        tiny_model_dir, prompt_learning_adapters):
    """One rule (compat.prompt_learning_uncached) decides both workarounds of a prompt-tuning adapter on an old PEFT;
    the base under disable_adapter() (eval --base-too) needs neither, yet was generated uncached, one row at a time."""
    from lorakit.compat import prompt_learning_uncached
    from lorakit.training.scoring import generation_batch_size

    section = ModelSection(name_or_path=str(tiny_model_dir), dtype="float32")
    models = {name: load_for_generation(section, {"a": path}, allow_pickle=False, device="cpu")[0]
              for name, path in prompt_learning_adapters.items()}
    prompt, prefix = models["prompt"], models["prefix"]
    assert prompt_learning_uncached(prompt, "0.21.2") and not prompt_learning_uncached(prompt, "0.22.0")
    assert not prompt_learning_uncached(prefix, "0.21.2")  # its own cached path (_generate_with_prefix)
    assert generation_batch_size(prompt, 3, adapter_on=True, peft_version="0.21.2") == 1
    assert generation_batch_size(prompt, 3, adapter_on=False, peft_version="0.21.2") == 3
    assert generation_batch_size(prompt, 3, adapter_on=True, peft_version="0.22.0") == 3


def test_the_prompt_learning_workarounds_generate_what_the_forward_computes_on_any_peft(
        tiny_model_dir, prompt_learning_adapters):
    """lorakit.compat's workaround paths (prefix: its own cached generation, left padding included; prompt: no cache)
    stay right on a PEFT that no longer needs them, so the version rule may err towards using them."""
    from lorakit.compat import _generate_with_prefix

    section = ModelSection(name_or_path=str(tiny_model_dir), dtype="float32")
    prefix, tokenizer = load_for_generation(section, {"a": prompt_learning_adapters["prefix"]}, allow_pickle=False,
                                            device="cpu")
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    width, pad = max(map(len, prompts)), tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = _generate_with_prefix(prefix, 4, ids, mask, max_new_tokens=8, do_sample=False, pad_token_id=pad,
                                    eos_token_id=-1)
    assert out[:, width:].tolist() == [_forward_greedy(prefix, torch.tensor([p]), 8)[len(p):] for p in prompts]

    prompt, _ = load_for_generation(section, {"a": prompt_learning_adapters["prompt"]}, allow_pickle=False,
                                    device="cpu")
    for p in prompts:
        with torch.no_grad():
            out = prompt.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                  max_new_tokens=8, do_sample=False, eos_token_id=-1, use_cache=False)
        assert out[0].tolist() == _forward_greedy(prompt, torch.tensor([p]), 8)


def test_prompt_tuning_generates_what_its_forward_computes(tiny_model_dir, prompt_learning_adapters):
    """`lorakit generate` and eval's batched greedy generation with a prompt-tuning adapter give the tokens of
    whole-sequence forwards (training's computation), batched rows as alone."""
    from lorakit.training.scoring import generate_greedy

    model, tokenizer = load_for_generation(ModelSection(name_or_path=str(tiny_model_dir), dtype="float32"),
                                           {"a": prompt_learning_adapters["prompt"]}, allow_pickle=False, device="cpu")
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    expected = [tokenizer.decode(_forward_greedy(model, torch.tensor([p]), 12)[len(p):], skip_special_tokens=True)
                for p in prompts]
    settings = {**SETTINGS, "max_new_tokens": 12}
    assert [generate_one(model, tokenizer, Request("a", prompt=p), **settings, stop_ids=[-1]) for p in PROMPTS] \
        == expected
    model.generation_config.eos_token_id = -1
    assert generate_greedy(model, tokenizer, prompts, max_new_tokens=12, batch_size=2) == expected


@pytest.fixture(scope="module")
def prefix_adapters(tiny_model_dir, prompt_learning_adapters, tmp_path_factory):
    """{architecture: (base dir, prefix adapter)}: the tiny Llama's and a tiny Qwen2's (biased q/k/v)."""
    from peft import PrefixTuningConfig

    from lorakit.testing import build_tiny_llama

    root = tmp_path_factory.mktemp("qwen2-prefix")
    qwen = build_tiny_llama(root / "model", architecture="qwen2")
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    return {"llama": (tiny_model_dir, prompt_learning_adapters["prefix"]),
            "qwen2": (qwen, build_random_adapter(qwen, root / "prefix", config, seed=5))}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefix_tuning_generates_what_its_forward_computes(arch, prefix_adapters):
    """Cached generation with a prefix-tuning adapter (lorakit.compat.adapter_generate) gives the tokens of
    whole-sequence forwards of the PeftModel (training's computation), rows batched with left padding as alone;
    so do `lorakit generate` and eval's batched generation. They are not the base's, which `base` still gives."""
    from lorakit.compat import adapter_generate
    from lorakit.training.scoring import generate_greedy

    base_dir, adapter = prefix_adapters[arch]
    model, tokenizer = load_for_generation(ModelSection(name_or_path=str(base_dir), dtype="float32"),
                                           {"a": adapter}, allow_pickle=False, device="cpu")
    texts = [*PROMPTS, "Hi"]
    prompts = [tokenizer(p)["input_ids"] for p in texts]
    assert len({len(p) for p in prompts}) == 3  # the batch below is really padded
    expected = [_forward_greedy(model, torch.tensor([p]), 12)[len(p):] for p in prompts]
    width, pad = max(map(len, prompts)), tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = adapter_generate(model, ids, mask, max_new_tokens=12, do_sample=False, pad_token_id=pad,
                               eos_token_id=-1)
    assert out[:, width:].tolist() == expected

    decoded = [tokenizer.decode(e, skip_special_tokens=True) for e in expected]
    settings = {**SETTINGS, "max_new_tokens": 12}
    assert [generate_one(model, tokenizer, Request("a", prompt=p), **settings, stop_ids=[-1]) for p in texts] \
        == decoded
    base = [generate_one(model, tokenizer, Request(BASE, prompt=p), **SETTINGS) for p in PROMPTS]
    assert base == completions(base_dir, {}, BASE)
    model.generation_config.eos_token_id = -1
    assert generate_greedy(model, tokenizer, prompts, max_new_tokens=12, batch_size=3) == decoded
    with model.disable_adapter():  # as `lorakit eval --base-too` scores the base
        plain = generate_greedy(model, tokenizer, prompts, max_new_tokens=12, batch_size=3, adapter_on=False)
    assert plain != decoded  # the prefix changes the completions


def test_cli_generate_and_eval_with_a_prefix_adapter(tiny_model_dir, prompt_learning_adapters, tmp_path):
    """`lorakit generate` prints, and `lorakit eval` scores in batches (with --base-too, the plain base's), the
    completions of whole-sequence forwards with the prefix, up to the first stop token."""
    from transformers import AutoModelForCausalLM

    from lorakit.config.schema import DataSection
    from lorakit.data.sources import read_rows
    from lorakit.data.stop_tokens import eos_ids
    from lorakit.tools.generate import generation_stop_ids
    from lorakit.training.scoring import eval_items

    prefix = prompt_learning_adapters["prefix"]
    model, tokenizer = load_for_generation(ModelSection(name_or_path=str(tiny_model_dir), dtype="float32"),
                                           {"a": prefix}, allow_pickle=False, device="cpu")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)

    def reference(m, ids, steps, stop):
        return tokenizer.decode(_forward_greedy(m, torch.tensor([ids]), steps, stop)[len(ids):],
                                skip_special_tokens=True)

    result = CliRunner().invoke(app, ["generate", "--model", str(tiny_model_dir), "--adapter", f"a={prefix}",
                                      "--prompt", PROMPTS[0], "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    stop = set(generation_stop_ids(model, tokenizer, [prefix]))
    assert result.stdout == reference(model, tokenizer(PROMPTS[0])["input_ids"], 8, stop) + "\n"

    data = tmp_path / "rows.jsonl"
    rows = [{"prompt": p, "completion": " x"} for p in [*PROMPTS, "Hi"]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["eval", str(prefix), "--data", str(data), "--base-too", "--batch-size", "3",
                                      "--max-new-tokens", "6", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    items, _ = eval_items(read_rows(str(data)).rows, DataSection(train=str(data), format="completion"), tokenizer)
    assert len({len(i.prompt_ids) for i in items}) == 3
    stop = set(eos_ids(base.generation_config.eos_token_id))  # eval stops where the model's config says
    for name, m in (("tuned", model), ("base", base)):
        assert [r[name]["output"] for r in report["per_row"]] == [reference(m, i.prompt_ids, 6, stop) for i in items]


def test_prefix_adapters_hot_swapped_generate_as_each_alone(tiny_model_dir, prompt_learning_adapters, tmp_path):
    """Two prefix-tuning adapters (of different lengths) on one base: each request generates with its own prefix."""
    from peft import PrefixTuningConfig

    adapters = {"four": prompt_learning_adapters["prefix"], "six": build_random_adapter(
        tiny_model_dir, tmp_path / "six", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6), seed=6)}
    model, tokenizer = load_for_generation(ModelSection(name_or_path=str(tiny_model_dir)), adapters,
                                           allow_pickle=False, device="cpu")
    served = {name: [generate_one(model, tokenizer, Request(name, prompt=p), **SETTINGS) for p in PROMPTS]
              for name in (*adapters, BASE, "four")}  # "four" again, after the others: it keeps nothing of theirs
    for name, path in adapters.items():
        assert served[name] == completions(tiny_model_dir, {name: path}, name)
    assert served[BASE] == completions(tiny_model_dir, {}, BASE) and served["four"] != served["six"]


def test_the_default_device_of_generate_and_eval_is_resolve_devices():
    """One home for "cuda if torch sees a GPU, else cpu" (generate and eval spelled it inline); merge's is cpu."""
    from lorakit.models.loading import resolve_device

    assert resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None, "cpu") == "cpu" and resolve_device("cpu") == "cpu"


@pytest.fixture(scope="module")
def qlora_adapter(tiny_model_dir, tmp_path_factory):
    from lorakit.testing import build_qlora_adapter

    return build_qlora_adapter(tiny_model_dir, tmp_path_factory.mktemp("qlora") / "adapter")


def test_generate_and_eval_load_the_base_in_the_precision_the_adapter_records(tiny_model_dir, qlora_adapter, tmp_path):
    """A QLoRA adapter answers from the 4-bit base it was trained on without --quantization (before: the full-
    precision base, silently); one stderr line says so and how to override; an explicit flag still wins."""
    args = ["generate", "--model", str(tiny_model_dir), "--adapter", f"q={qlora_adapter}", "--prompt", PROMPTS[0],
            "--max-new-tokens", "8", "--device", "cpu"]
    runs = {flag: CliRunner().invoke(app, [*args, *flag]) for flag in ((), ("--quantization", "nf4"),
                                                                        ("--quantization", "none"))}
    assert all(r.exit_code == 0 for r in runs.values()), [r.output for r in runs.values()]
    default, nf4, full = runs.values()
    assert default.stdout == nf4.stdout != full.stdout  # not vacuous: the two precisions answer differently
    note = f"base loaded in nf4, as {qlora_adapter}/lorakit.json records the adapter was trained; " \
           "--quantization none loads it in full precision"
    assert default.stderr.strip().splitlines() == [note] and note not in nf4.output + full.output

    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": PROMPTS[0], "completion": " x"}) + "\n")
    for flag, quantization in (((), "nf4"), (("--quantization", "none"), "none")):
        out = tmp_path / f"eval-{quantization}.json"
        result = CliRunner().invoke(app, ["eval", str(qlora_adapter), "--data", str(data), "--max-new-tokens", "8",
                                          "--device", "cpu", "-o", str(out), *flag])
        assert result.exit_code == 0, result.output
        report = json.loads(out.read_text())
        assert report["settings"]["quantization"] == quantization and (note in result.output) == (not flag)
    outputs = [json.loads((tmp_path / f"eval-{q}.json").read_text())["per_row"][0]["tuned"]["output"]
               for q in ("nf4", "none")]
    assert outputs[0] == default.stdout.strip() and outputs[1] != outputs[0]


def test_a_checkpoints_adapter_has_its_precision_from_the_checkpoints_recipe(tiny_model_dir, qlora_adapter, tmp_path):
    """A checkpoint's adapter/ has no lorakit.json: its recipe.yaml beside it records the quantization."""
    import shutil

    from run_helpers import recipe_dict, write_recipe

    from lorakit.adapters.files import recorded_quantization

    step = tmp_path / "checkpoints" / "step-000002"
    shutil.copytree(qlora_adapter, step / "adapter", ignore=shutil.ignore_patterns("lorakit.json"))
    recipe = recipe_dict(tiny_model_dir, tmp_path / "d.jsonl", tmp_path)
    recipe["model"].update(quantization="nf4", double_quant=False)
    write_recipe(step / "recipe.yaml", recipe)
    assert recorded_quantization(step / "adapter") == ("nf4", False, step / "recipe.yaml")
    assert recorded_quantization(qlora_adapter) == ("nf4", True, qlora_adapter / "lorakit.json")
    (step / "recipe.yaml").unlink()
    assert recorded_quantization(step / "adapter") is None  # a PEFT adapter lorakit did not train


def test_adapters_recorded_on_different_precisions_need_quantization(tiny_model_dir, qlora_adapter, tmp_path):
    full = build_random_adapter(tiny_model_dir, tmp_path / "full", LoraConfig(r=4, target_modules=["q_proj"]))
    (full / "lorakit.json").write_text(json.dumps({"quantization": "none"}))
    args = ["generate", "--model", str(tiny_model_dir), "--adapter", f"q={qlora_adapter}", "--prompt", "x",
            "--adapter", f"full={full}", "--max-new-tokens", "2", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "different base precisions (q nf4, full none)" in result.stderr
    assert CliRunner().invoke(app, [*args, "--quantization", "nf4"]).exit_code == 0


def test_generation_stops_at_a_position_table_instead_of_an_index_error(tmp_path, capsys):
    """GPT-2 indexes a table of n_positions: `lorakit generate --max-new-tokens 100` (and `lorakit eval`'s default
    64) past it ended in 'IndexError: index out of range in self' (exit 1). Now the new tokens are cut to what
    the prompt (and a prompt-tuning adapter's virtual tokens) leaves, with a warning saying so; a prompt that
    fills the table is exit 2."""
    from peft import PeftModel, PromptTuningConfig
    from transformers import GPT2LMHeadModel

    from lorakit.console import configure
    from lorakit.models.checks import new_token_room
    from lorakit.testing import build_tiny_gpt2

    model_dir = build_tiny_gpt2(tmp_path / "gpt2", n_positions=64)
    adapter = build_random_adapter(model_dir, tmp_path / "prompt", PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4))
    tuned = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(model_dir), adapter)
    configure()  # normal output: an earlier test's --json-logs or --quiet stays set in this process
    assert new_token_room(tuned, 5, 100) == 55
    assert new_token_room(tuned, 5, 100, adapter_on=False) == 59
    assert new_token_room(tuned, 5, 50) == 50
    err = capsys.readouterr().err
    assert "warning: generation: 100 new tokens cut to 55, what a prompt of 5 tokens and 4 virtual" in err
    assert "warning: generation: 100 new tokens cut to 59, what a prompt of 5 tokens leaves" in err

    runner = CliRunner()
    for args in (["--use", "base"], []):
        result = runner.invoke(app, ["generate", "--model", str(model_dir), "--adapter", f"tuned={adapter}", *args,
                                     "--prompt", "1 2 3 4 5", "--max-new-tokens", "100", "--device", "cpu"])
        assert result.exit_code == 0, result.output
        # on stderr: generate's stdout is the completion alone
        assert "new tokens cut to" in result.stderr and "new tokens cut" not in result.stdout
    result = runner.invoke(app, ["generate", "--model", str(model_dir), "--prompt", " ".join(["7"] * 80),
                                 "--device", "cpu"])
    assert result.exit_code == 2 and "fills the 64 positions this gpt2 model has" in result.output
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"instruction": "Count", "input": "", "output": "1 2"}) + "\n")
    result = runner.invoke(app, ["eval", str(adapter), "--data", str(rows), "--base-too", "-o",
                                 str(tmp_path / "eval.json"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
