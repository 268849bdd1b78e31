"""The commands after training, given what a newcomer or a careless hand gives them: a run that has not finished,
a folder of a run instead of the run, an adapter whose base has moved or whose files are damaged, an eval report
aimed at someone else's file. Each ends in one line with its exit code, names the file and the way out, and
leaves the user's files alone; nothing silently succeeds on a broken adapter."""

import json
import shutil
from pathlib import Path

import pytest
from peft import LoraConfig
from run_helpers import cli, recipe_dict, write_recipe

from lorakit.testing import build_random_adapter, build_tiny_llama, write_memorisation_data


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """A 3-step alpaca run with a checkpoint per step (adapter, merged model, recipe.yaml, run.json)."""
    root = tmp_path_factory.mktemp("after-training")
    data = write_memorisation_data(root / "train.jsonl")
    recipe = recipe_dict(tiny_model_dir, data, root / "run", adapter={"lora_dropout": 0.0}, max_steps=3,
                         save_every=1)
    recipe["output"]["save"] = "both"
    result = cli("train", write_recipe(root / "recipe.yaml", recipe))
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture
def adapter(tiny_model_dir, tmp_path):
    """A LoRA adapter lorakit would have written: PEFT's files and a lorakit.json naming the base."""
    path = build_random_adapter(tiny_model_dir, tmp_path / "adapter", LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    record = {"base_model": str(tiny_model_dir), "base_model_path": str(tiny_model_dir), "quantization": "none",
              "dtype": "float32", "method": "lora"}
    (path / "lorakit.json").write_text(json.dumps(record))
    return path


def one_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def rows(tmp_path: Path) -> Path:
    return write_memorisation_data(tmp_path / "rows.jsonl")


# ----------------------------------------------------------------------------------------------------------
# lorakit eval


def test_eval_report_never_takes_the_place_of_a_file_that_is_no_report(tiny_model_dir, adapter, tmp_path):
    """-o at a model's config.json moved it aside and wrote the report in its place: the base no longer loaded."""
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")  # a copy: the shared model stays whole either way
    config = base / "config.json"
    before = config.read_bytes()
    out = one_line(cli("eval", adapter, "--data", rows(tmp_path), "-o", config), 5)
    assert "not an eval report" in out and config.read_bytes() == before
    assert not list(base.glob("config.json.replaced-*"))
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": true}\n')
    one_line(cli("eval", adapter, "--data", rows(tmp_path), "-o", mine), 5)
    assert mine.read_text() == '{"mine": true}\n'


def test_eval_refuses_more_new_tokens_than_the_model_has_positions(adapter, tmp_path):
    """--max-new-tokens 100000 generated past the tiny model's 512 positions with only transformers' warning."""
    out = one_line(cli("eval", adapter, "--data", rows(tmp_path), "--max-new-tokens", "100000", "-o",
                       tmp_path / "e.json"), 2)
    assert "--max-new-tokens 100,000: the model's context is 512 tokens" in out
    assert not (tmp_path / "e.json").exists()


def test_eval_skips_a_chat_row_without_an_assistant_turn(tiny_model_dir, run, tmp_path):
    """Such a row has nothing to score or to compute a loss on: skipped and said so, as training leaves it out;
    it was an exit 3 whose remedy named data.skip_bad_rows, a key eval does not read (and train.eval_generate
    stopped the run at start on it)."""
    from transformers import AutoTokenizer

    from lorakit.config.schema import DataSection
    from lorakit.data.sources import Row
    from lorakit.training.scoring import eval_items

    question = {"messages": [{"role": "user", "content": "hi"}]}
    answered = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    items, skipped = eval_items([Row("d:1", question), Row("d:2", answered)], DataSection(train="x", format="chat"),
                                tokenizer)
    assert [i.answer for i in items] == ["hello"] and skipped == ["d:1: no assistant turn to score against"]

    data = tmp_path / "questions.jsonl"
    data.write_text(json.dumps(question) + "\n")
    merged = shutil.copytree(run / "merged", tmp_path / "merged")  # apart from its alpaca run: rows tell the format
    out = one_line(cli("eval", merged, "--data", data, "-o", tmp_path / "e.json"), 3)
    assert "questions.jsonl:1: no assistant turn" in out and "skip_bad_rows" not in out


def test_eval_generate_during_training_skips_such_a_row_as_the_eval_loss_does(tiny_model_dir, tmp_path):
    """train.eval_generate stopped the run at start (exit 3) on an eval row the eval loss simply leaves out."""
    chat = write_memorisation_data(tmp_path / "chat.jsonl", "chat")
    held_out = tmp_path / "held-out.jsonl"
    held_out.write_text(chat.read_text() + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    recipe = recipe_dict(tiny_model_dir, chat, tmp_path / "run", max_steps=2, eval_every=1, eval_generate=4)
    recipe["data"].update(format="chat", eval=str(held_out))
    result = cli("train", write_recipe(tmp_path / "recipe.yaml", recipe))
    assert result.exit_code == 0, result.output
    assert "eval_score" in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_eval_finds_a_moved_base_as_merge_does_and_takes_base(tiny_model_dir, adapter, tmp_path, monkeypatch):
    """lorakit.json records the resolved base path and the name the recipe gave; a project moved as a whole keeps
    the relative name valid (merge read it; eval stopped on the stale path naming a recipe key the user never
    set, with no way to give the base). --base gives it, checked against the recorded architecture."""
    data = rows(tmp_path)
    project = tmp_path / "project"
    shutil.copytree(tiny_model_dir, project / "models" / "tiny")
    record = json.loads((adapter / "lorakit.json").read_text())
    record.update(base_model="./models/tiny", base_model_path="/old/home/project/models/tiny")
    (adapter / "lorakit.json").write_text(json.dumps(record))
    monkeypatch.chdir(project)
    result = cli("eval", adapter, "--data", data, "--max-new-tokens", "2", "-o", tmp_path / "e.json")
    assert result.exit_code == 0, result.output

    monkeypatch.chdir(tmp_path)  # now neither name is here
    out = one_line(cli("eval", adapter, "--data", data, "-o", tmp_path / "e.json"), 2)
    assert "lorakit.json" in out and "/old/home/project/models/tiny" in out and "--base" in out
    assert "model.name_or_path" not in out
    result = cli("eval", adapter, "--data", data, "--base", project / "models" / "tiny", "--base-too",
                 "--max-new-tokens", "2", "-o", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    assert set(json.loads((tmp_path / "e.json").read_text())["totals"]) == {"base", "tuned"}
    other = build_tiny_llama(tmp_path / "other", hidden_size=32)
    record["base_model_path"] = str(tiny_model_dir)  # a record whose base is here: the architectures compare
    (adapter / "lorakit.json").write_text(json.dumps(record))
    out = one_line(cli("eval", adapter, "--data", data, "--base", other, "-o", tmp_path / "e.json"), 4)
    assert f"--base {other} is not the model the adapter was trained on" in out and "hidden_size" in out


def test_eval_of_a_merged_model_with_a_damaged_or_moved_record(run, tiny_model_dir, tmp_path):
    """lorakit_merge.json damaged or naming a base that is gone: --base-too exits 2 naming the file and the way
    out (it was exit 1, a JSONDecodeError, even without --base-too); --base gives the base. A damaged config.json
    of the model is exit 4 naming it (was exit 1, transformers' OSError)."""
    data = rows(tmp_path)
    merged = shutil.copytree(run / "merged", tmp_path / "merged")
    (merged / "lorakit_merge.json").write_text("{oops")
    result = cli("eval", merged, "--data", data, "--max-new-tokens", "2", "-o", tmp_path / "e.json")
    assert result.exit_code == 0, result.output  # the record is only needed for --base-too
    out = one_line(cli("eval", merged, "--data", data, "--base-too", "-o", tmp_path / "e.json"), 2)
    assert "lorakit_merge.json is not valid JSON" in out and "--base PATH" in out
    (merged / "lorakit_merge.json").write_text(json.dumps({"base": str(tmp_path / "gone")}))
    out = one_line(cli("eval", merged, "--data", data, "--base-too", "-o", tmp_path / "e.json"), 2)
    assert str(tmp_path / "gone") in out and "not on this machine" in out
    result = cli("eval", merged, "--data", data, "--base-too", "--base", tiny_model_dir, "--max-new-tokens", "2",
                 "-o", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    one_line(cli("eval", merged, "--data", data, "--base", tiny_model_dir, "-o", tmp_path / "e.json"), 2)

    (merged / "config.json").write_text("{oops")
    out = one_line(cli("eval", merged, "--data", data, "-o", tmp_path / "e.json"), 4)
    assert "merged/config.json is not valid JSON" in out


def test_eval_of_a_file_says_it_is_a_file(run, tmp_path):
    data = rows(tmp_path)
    out = one_line(cli("eval", data, "--data", data, "-o", tmp_path / "e.json"), 4)
    assert "rows.jsonl: a file;" in out and "not found" not in out


# ----------------------------------------------------------------------------------------------------------
# Unfinished runs and damaged adapters, in every command that reads an adapter


def test_a_run_that_has_not_written_its_adapter_names_its_newest_checkpoint(run, tmp_path):
    unfinished = shutil.copytree(run, tmp_path / "unfinished")
    for folder in ("adapter", "merged"):
        shutil.rmtree(unfinished / folder)
    (unfinished / "run.json").unlink()
    newest = sorted((unfinished / "checkpoints").iterdir())[-1]
    for args in (["merge", unfinished, "-o", tmp_path / "m"], ["eval", unfinished, "--data", rows(tmp_path)],
                 ["export", unfinished, "-o", tmp_path / "m.gguf"],  # was exit 2, "neither a run directory ..."
                 ["export", unfinished, "--format", "gguf-lora", "-o", tmp_path / "m.gguf"],
                 ["export", unfinished, "--check", "vllm"],
                 ["generate", "--model", run.parent / "nothing", "--adapter", unfinished, "--prompt", "x"]):
        out = one_line(cli(*args), 4)
        assert "has not written" in out and str(newest) in out, args
    out = one_line(cli("explain", unfinished), 2)
    assert "has not finished" in out


def test_an_adapter_without_its_weights_file_is_exit_4_everywhere(tiny_model_dir, adapter, tmp_path):
    """eval and generate blamed the base ("PEFT cannot attach it ... Repo id must be a string"), and the vLLM
    check said "vLLM can serve this adapter (LoRA rank 4 on ; weights , ...)" with exit 0."""
    (adapter / "adapter_model.safetensors").unlink()
    for args in (["eval", adapter, "--data", rows(tmp_path), "-o", tmp_path / "e.json"],
                 ["generate", "--model", tiny_model_dir, "--adapter", f"a={adapter}", "--prompt", "x"],
                 ["export", adapter, "--check", "vllm"],
                 ["merge", adapter, "-o", tmp_path / "m"]):
        out = one_line(cli(*args), 4)
        assert "no adapter_model.safetensors" in out and "is --model the base" not in out, args


@pytest.mark.parametrize("damage", ["truncated-weights", "record-not-json"])
def test_gguf_lora_of_a_damaged_adapter_is_exit_4_naming_the_file(adapter, tmp_path, damage):
    """--format gguf-lora read the adapter without the checks merge and the other formats make: exit 1."""
    if damage == "truncated-weights":
        weights = adapter / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        name = "adapter_model.safetensors"
    else:
        (adapter / "lorakit.json").write_text("{oops")
        name = "lorakit.json"
    out = one_line(cli("export", adapter, "--format", "gguf-lora", "-o", tmp_path / "a.gguf"), 4)
    assert f"adapter/{name}" in out and "damaged" in out
    assert not list(tmp_path.glob("*.gguf"))


# ----------------------------------------------------------------------------------------------------------
# A folder of a run given where the run (or another folder) belongs


def test_generate_given_a_run_or_an_adapter_as_model_names_the_command(run, tiny_model_dir):
    out = one_line(cli("generate", "--model", run / "adapter", "--prompt", "x"), 2)
    assert f"--model {tiny_model_dir} --adapter {run / 'adapter'}" in out
    out = one_line(cli("generate", "--model", run, "--prompt", "x"), 2)
    assert f"--model {run / 'merged'}" in out


@pytest.mark.parametrize("folder", ["adapter", "merged", "checkpoints/step-000002"])
def test_plot_and_explain_of_a_folder_of_the_run_name_the_run(run, folder):
    for command in ("plot", "explain"):
        out = one_line(cli(command, run / folder), 2)
        assert f"lorakit {command} {run}" in out, out


# ----------------------------------------------------------------------------------------------------------
# What the commands tell the user to run next


def test_vllm_serve_names_a_local_base_by_its_absolute_path(tiny_model_dir, adapter, tmp_path, monkeypatch):
    """A recipe that named its base relative to where training ran ('models/tiny') gave `vllm serve models/tiny`
    beside the adapter's absolute path: from any other directory vLLM would look for a hub id."""
    record = json.loads((adapter / "lorakit.json").read_text())
    record["base_model"] = "models/tiny"
    (adapter / "lorakit.json").write_text(json.dumps(record))
    monkeypatch.chdir(tmp_path)
    result = cli("export", adapter, "--check", "vllm")
    assert result.exit_code == 0, result.output
    assert f"vllm serve {tiny_model_dir} --enable-lora" in result.output


def test_the_card_of_an_alpaca_run_does_not_say_chat(run):
    """The run trained on alpaca prompts; the card's generate command sent the question through the chat
    template the adapter never saw."""
    for folder in ("adapter", "merged"):
        text = (run / folder / "README.md").read_text()
        line = next(line for line in text.splitlines() if line.startswith("lorakit generate"))
        command, _, comment = line.partition("#")
        assert "--chat" not in command and "alpaca" in comment


def test_another_checkpoint_of_the_base_architecture_is_warned_about(run, tiny_model_dir, tmp_path):
    """The base check compared config fields only, so another fine-tune of the same architecture passed without a
    word; the run records its base's weights_fingerprint and merge/generate/eval/export warn on another one (a
    warning, not a refusal: the same model re-saved in another dtype or quantized differs too)."""
    from lorakit.models.checks import weights_fingerprint

    record = json.loads((run / "adapter" / "lorakit.json").read_text())
    assert record["base_fingerprint"] == weights_fingerprint(tiny_model_dir)
    other = build_tiny_llama(tmp_path / "other", seed=5)  # the architecture, other weights
    warned = cli("generate", "--model", other, "--adapter", f"a={run / 'adapter'}", "--prompt", "x",
                 "--max-new-tokens", "2")
    assert warned.exit_code == 0 and "its weights are not those the adapter was trained on" in warned.stderr, \
        warned.output
    assert "its weights" not in warned.stdout  # generate's stdout is the completion
    merged = cli("merge", run / "adapter", "-o", tmp_path / "merged", "--base", other, "--no-verify")
    assert merged.exit_code == 0 and f"--base {other}: its weights are not those" in merged.output, merged.output
    same = cli("generate", "--model", tiny_model_dir, "--adapter", f"a={run / 'adapter'}", "--prompt", "x",
               "--max-new-tokens", "2")
    assert same.exit_code == 0 and "its weights are not" not in same.output, same.output


def test_eval_warns_when_the_recorded_base_holds_other_weights_since(run, tmp_path):
    """A recorded base folder whose weights changed after training (a re-download of another revision, a fine-tune
    saved over it) is warned about when eval loads it (load_for_generation checks each adapter's base)."""
    adapter = shutil.copytree(run / "adapter", tmp_path / "adapter")
    record = json.loads((adapter / "lorakit.json").read_text())
    record["base_fingerprint"] = "0" * 16  # what the folder held at training time, before it changed
    (adapter / "lorakit.json").write_text(json.dumps(record))
    result = cli("eval", adapter, "--data", rows(tmp_path), "--max-new-tokens", "2", "-o", tmp_path / "e.json")
    assert result.exit_code == 0 and "the recorded base" in result.output, result.output
    assert "its weights are not those the adapter was trained on" in result.output
    plain = cli("eval", run / "adapter", "--data", rows(tmp_path), "--max-new-tokens", "2", "-o", tmp_path / "f.json")
    assert plain.exit_code == 0 and "its weights are not" not in plain.output, plain.output
