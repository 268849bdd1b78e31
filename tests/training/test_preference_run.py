"""`lorakit train` with a preference objective on the tiny model: the metrics (metrics.jsonl, the trackers, the
plot), the first step's DPO loss of ln 2, eval rewards, a merged model, train.reference: precomputed from the
data cache. Real processes (resume, DDP): tests/e2e/test_preference_e2e.py."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from run_helpers import cli, pref_recipe, training_records, write_pairs, write_recipe

METRICS = {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
           "logps/rejected"}


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_dpo_run_logs_rewards_everywhere(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    data = write_pairs(tmp_path / "pairs.jsonl", 20)
    recipe = pref_recipe(tiny_model_dir, data, tmp_path / "run")
    recipe["output"].update(report_to=["tensorboard"], save="both")
    result = cli("train", write_recipe(tmp_path / "recipe.yaml", recipe))
    assert result.exit_code == 0, result.output
    assert [line.split(None, 1) for line in result.output.splitlines() if "log-probs chunked" in line] == [
        ["loss", "dpo, reference base, log-probs chunked"]]  # the effective settings' line, once
    logged = records(tmp_path / "run")
    steps = [r for r in logged if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(METRICS <= r.keys() for r in steps)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 0's forward: B = 0
    assert steps[0]["rewards/margin"] == 0 and steps[-1]["rewards/margin"] > 0  # it learned to prefer
    evals = [r for r in logged if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all({f"eval_{k}" for k in METRICS} <= r.keys() for r in evals)
    assert (tmp_path / "run" / "merged" / "config.json").is_file()
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "run" / "loss.png").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [s.value for s in events.Scalars("train/rewards/margin")] == pytest.approx(
        [r["rewards/margin"] for r in steps], rel=1e-6)
    assert events.Scalars("eval/rewards/accuracy")


@pytest.mark.parametrize("objective", ["ipo", "orpo", "simpo"])
def test_the_other_objectives_train(tiny_model_dir, tmp_path, objective):
    data = write_pairs(tmp_path / "pairs.jsonl", 12)
    result = cli("train", write_recipe(tmp_path / "r.yaml", pref_recipe(tiny_model_dir, data, tmp_path / "run",
                                                                          objective, max_steps=2)))
    assert result.exit_code == 0, result.output
    steps = [r for r in records(tmp_path / "run") if "loss" in r]
    assert len(steps) == 2 and all(METRICS <= r.keys() and math.isfinite(r["loss"]) for r in steps)


def test_precomputed_reference_is_stored_in_the_data_cache(tiny_model_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 12)
    base = pref_recipe(tiny_model_dir, data, tmp_path / "base", max_steps=2)
    pre = pref_recipe(tiny_model_dir, data, tmp_path / "pre", max_steps=2, reference="precomputed")
    assert cli("train", write_recipe(tmp_path / "base.yaml", base)).exit_code == 0
    first = cli("train", write_recipe(tmp_path / "pre.yaml", pre))
    assert first.exit_code == 0, first.output
    assert "reference log-probs: computed for" in first.output and "reference precomputed" in first.output
    pre["output"]["dir"] = str(tmp_path / "pre-2")
    again = cli("train", write_recipe(tmp_path / "pre-2.yaml", pre))
    assert again.exit_code == 0 and "reference log-probs: from the data cache" in again.output
    # The same learning as the reference computed on the fly (dropout is off in the reference either way), up to
    # float rounding (the live reference runs in the training micro-batches, the precomputed one in data order).
    # Accuracy is left out: at B = 0 every reward is 0 on the fly and may be a rounding error of either sign
    # precomputed, a tie broken either way.
    for a, b in zip(training_records(tmp_path / "base" / "metrics.jsonl"),
                    training_records(tmp_path / "pre" / "metrics.jsonl")):
        assert a.keys() == b.keys()
        for key in (k for k in a if not k.endswith("rewards/accuracy")):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert training_records(tmp_path / "pre" / "metrics.jsonl") == training_records(tmp_path / "pre-2" / "metrics.jsonl")


def test_dpo_continues_an_sft_adapter_with_it_as_the_reference(tiny_model_dir, tmp_path):
    from run_helpers import recipe_dict, write_data

    sft = recipe_dict(tiny_model_dir, write_data(tmp_path / "sft.jsonl", 8), tmp_path / "sft", max_steps=3,
                      learning_rate=2e-2, adapter={"lora_dropout": 0.0})
    assert cli("train", write_recipe(tmp_path / "sft.yaml", sft)).exit_code == 0
    data = write_pairs(tmp_path / "pairs.jsonl", 12)
    recipe = pref_recipe(tiny_model_dir, data, tmp_path / "dpo", max_steps=2, reference="init_from")
    del recipe["adapter"]["lora_dropout"]  # unset: no dropout under DPO (0.05 before), as TRL trains it
    recipe["adapter"]["init_from"] = str(tmp_path / "sft" / "adapter")
    result = cli("train", write_recipe(tmp_path / "dpo.yaml", recipe))
    assert result.exit_code == 0, result.output
    settings = {s["label"]: s["value"] for s in json.loads((tmp_path / "dpo" / "run.json").read_text())[
        "effective_settings"]}
    assert settings["dropout"] == ("p [0.0] (the default under train.objective dpo: preference losses train without "
                                   "dropout, as TRL's do; adapter.lora_dropout sets one)")
    assert "adapter: starting from" in result.output and "reference log-probs: computed" in result.output
    # The record says where the adapter started (before: "init default", the fresh weights init_from replaced)
    explained = cli("explain", tmp_path / "dpo")
    init = next(line.split(None, 1)[1] for line in explained.output.splitlines() if line.split()[0] == "init")
    assert init.startswith(f"weights of {tmp_path / 'sft' / 'adapter'} (adapter.init_from): "), init
    record = json.loads((tmp_path / "dpo" / "adapter" / "lorakit.json").read_text())["init"]
    assert record["init_from"] == str(tmp_path / "sft" / "adapter")
    # and what initialised it (before: init_lora_weights "default", and the card's `True`, PEFT's fresh init's)
    assert record["init_lora_weights"] == "init_from"
    card = (tmp_path / "dpo" / "adapter" / "README.md").read_text()
    assert f"| init_from | `{tmp_path / 'sft' / 'adapter'}` |" in card and "| init_lora_weights |" not in card
    first = [r for r in records(tmp_path / "dpo") if "loss" in r][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as its reference
    # Against the base instead, the SFT adapter has already moved the policy: not ln 2.
    recipe["train"]["reference"], recipe["output"]["dir"] = "base", str(tmp_path / "dpo-base")
    assert cli("train", write_recipe(tmp_path / "dpo-base.yaml", recipe)).exit_code == 0
    assert abs([r for r in records(tmp_path / "dpo-base") if "loss" in r][0]["loss"] - math.log(2)) > 1e-4
    recipe["adapter"]["r"], recipe["output"]["dir"] = 8, str(tmp_path / "dpo-r8")
    refused = cli("train", write_recipe(tmp_path / "dpo-r8.yaml", recipe))
    assert refused.exit_code == 4 and "adapter.init_from" in refused.output and "set adapter.r" in refused.output


def test_resume_refuses_a_reference_that_changed_since_the_checkpoint(tiny_model_dir, tmp_path):
    """train.reference init_from computes the reference again on resume, from the adapter.init_from directory as it
    is now: an adapter changed since the checkpoint was used silently (the rest of the run against another
    reference); now exit 4 naming it, or --allow-recipe-change. The unchanged one resumes."""
    from peft import LoraConfig

    from lorakit.testing import build_random_adapter

    def sft_adapter(seed):
        return build_random_adapter(tiny_model_dir, tmp_path / "sft", LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False), seed=seed)

    recipe = pref_recipe(tiny_model_dir, write_pairs(tmp_path / "pairs.jsonl", 8), tmp_path / "dpo", max_steps=2,
                         save_every=1, eval_every=0, reference="init_from")
    recipe["adapter"]["init_from"] = str(sft_adapter(0))
    recipe["data"]["eval_split"] = None
    path = write_recipe(tmp_path / "dpo.yaml", recipe)
    assert (result := cli("train", path)).exit_code == 0, result.output
    checkpoint = tmp_path / "dpo" / "checkpoints" / "step-000001"

    def unfinish(n):  # as if stopped after the checkpoint: a finished run's resume only says it is finished
        (tmp_path / "dpo" / "adapter").rename(tmp_path / f"adapter-{n}")

    unfinish(0)
    assert (result := cli("train", path, "--resume", checkpoint)).exit_code == 0, result.output
    assert "resuming from" in result.output
    unfinish(1)
    sft_adapter(1)  # the SFT stage run again in place
    refused = cli("train", path, "--resume", checkpoint)
    assert refused.exit_code == 4, refused.output
    assert "the reference log-probs differ from this checkpoint's" in " ".join(refused.output.split())
    allowed = cli("train", path, "--resume", checkpoint, "--allow-recipe-change")
    assert allowed.exit_code == 0 and "continuing against the new reference" in " ".join(allowed.output.split())
    # Other pairs (edited data, allowed): their reference means differ for that reason, and it is not blamed
    unfinish(2)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(pairs.read_text().replace("Count to 1", "Count up to 1"))
    edited = cli("train", path, "--resume", checkpoint, "--allow-recipe-change")
    assert edited.exit_code == 0 and "continuing on the new data" in " ".join(edited.output.split())
    assert "reference log-probs differ" not in edited.output
