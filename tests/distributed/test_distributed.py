"""Several processes on CPU (gloo), as CI runs them: the same invariants a GPU cluster relies on.

Fast: how ranks share the data, the idle micro-batch, FSDP checks, the accelerate configs, the launcher
helpers. Slow (one process launch each, ~20 s): 2 ranks x grad_accum k == 1 rank x 2k (adapter and loss log,
launched with `accelerate launch` and recipes/accelerate/ddp.yaml); a rank killed mid-run ends the job naming
it (`lorakit train --nproc 2`), its resume matches the uninterrupted run and a resume on another world size is
refused; a stuck rank ends the job after train.ddp_timeout (`torchrun`); FSDP (+ PEFT's wrap policy) for one
step; the FSDP + 4-bit storage check before loading.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lorakit.data import IGNORE_INDEX, StepSampler
from lorakit.faults import RANK_FAULT_ENV, fault_injector
from lorakit.distributed.fsdp import check_fsdp
from lorakit.data.shards import eval_shards, idle_batch
from lorakit.distributed.launch import relaunch, strip_option
from lorakit.errors import UsageError
from lorakit.config.load import parse_recipe
from run_helpers import cli, recipe_dict, subprocess_env, training_records, write_data, write_recipe

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = ROOT / "recipes" / "accelerate"

# 26 training rows, micro-batches of 2, grad_accum 2 on 2 ranks: 4 steps of 8 rows; the last step holds 2
# rows, one micro-batch, so rank 1 has none and must run an idle one. 5 eval rows split 3/2 over the ranks.
TRAIN_ROWS, EVAL_ROWS, STEPS = 26, 5, 4


# ----------------------------------------------------------------------------------------------------------
# Sharding


def test_ranks_share_each_global_batch_without_overlap_or_loss():
    for num, mb, accum in [(26, 2, 2), (37, 3, 1), (9, 4, 2)]:
        one = StepSampler(num_examples=num, micro_batch_size=mb, grad_accum=2 * accum, seed=3)
        ranks = [StepSampler(num_examples=num, micro_batch_size=mb, grad_accum=accum, seed=3, world_size=2, rank=r)
                 for r in range(2)]
        assert ranks[0].steps_per_epoch == one.steps_per_epoch
        seen = []
        for step in range(one.steps_per_epoch):
            mine = [ranks[r].micro_batches(step) for r in range(2)]
            assert sorted(sum(mine[0] + mine[1], [])) == sorted(sum(one.micro_batches(step), []))
            seen += sum(mine[0] + mine[1], [])
        assert sorted(seen) == list(range(num))  # each example once per epoch


def test_the_last_partial_step_can_leave_a_rank_without_data():
    rank1 = StepSampler(num_examples=TRAIN_ROWS, micro_batch_size=2, grad_accum=2, seed=7, world_size=2, rank=1)
    assert rank1.steps_per_epoch == STEPS and rank1.micro_batches(STEPS - 1) == []


def test_eval_shards_give_every_rank_the_same_number_of_batches():
    for num, mb, world in [(5, 2, 2), (1, 4, 3), (10, 3, 4), (8, 2, 2)]:
        shards = [eval_shards(num, mb, world, r) for r in range(world)]
        assert len({len(s) for s in shards}) == 1
        flat = [i for s in shards for batch in s for i in batch]
        assert sorted(flat) == list(range(num))
        assert all(len(batch) <= mb for s in shards for batch in s)


def test_an_idle_batch_adds_nothing_but_reaches_every_adapter_weight(tiny_model_dir, tmp_path):
    """What a rank without data runs: loss 0 and zero gradients, yet every trainable tensor gets a gradient
    (DDP's all-reduce waits for a gradient of each)."""
    from lorakit.data import collate, load_datasets
    from lorakit.adapters.build import build_model
    from lorakit.models.loading import load_tokenizer

    recipe = parse_recipe(recipe_dict(tiny_model_dir, write_data(tmp_path / "d.jsonl", 4), tmp_path / "run"))
    tokenizer = load_tokenizer(recipe.model, str(tiny_model_dir))
    example = load_datasets(recipe.data, tokenizer, 0).train[0]
    idle = idle_batch(example)
    assert idle.input_ids == example.input_ids and set(idle.labels) == {IGNORE_INDEX}

    model = build_model(recipe, str(tiny_model_dir))
    loss = model(**collate([idle], tokenizer), num_items_in_batch=7).loss
    loss.backward()
    assert loss.item() == 0.0
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and not p.grad.any() for p in trainable)


# ----------------------------------------------------------------------------------------------------------
# FSDP checks and the accelerate configs


def _recipe(train: dict | None = None, **model):
    return parse_recipe({"model": {"name_or_path": "x", **model}, "data": {"train": "d.jsonl"},
                         "train": {"max_steps": 1, **(train or {})}})


@pytest.mark.parametrize(
    "model, mixed_precision, refused",
    [
        ({"quantization": "nf4", "dtype": "bfloat16"}, "no", None),
        ({"quantization": "nf4", "dtype": "bfloat16"}, "bf16", None),
        ({"quantization": "nf4", "dtype": "float32"}, "bf16", "mixed_precision bf16"),
        ({"quantization": "fp4", "dtype": "float16"}, "bf16", "model.dtype"),
        ({"quantization": "int8", "dtype": "bfloat16"}, "no", "int8"),
        ({"quantization": "none", "dtype": "float32"}, "bf16", None),
    ],
)
def test_fsdp_refuses_what_it_cannot_shard(model, mixed_precision, refused):
    if refused is None:
        check_fsdp(_recipe(**model), mixed_precision)
        return
    with pytest.raises(UsageError, match=refused):
        check_fsdp(_recipe(**model), mixed_precision)


def _adapter_recipe(adapter: dict, train: dict | None = None, model: dict | None = None):
    return parse_recipe({"model": {"name_or_path": "x", **(model or {})}, "data": {"train": "d.jsonl"},
                         "adapter": adapter, "train": {"max_steps": 1, **(train or {})}})


@pytest.mark.parametrize(
    "adapter, train, env, refused",
    [
        ({"method": "lora"}, {"save_every": 100, "save_each_epoch": True}, {}, None),  # checkpoints are gathered
        ({"method": "dora"}, {}, {"FSDP_VERSION": "1"}, None),
        ({"method": "bottleneck"}, {}, {}, None),
        ({"method": "prompt", "num_virtual_tokens": 4}, {}, {}, None),
        ({"method": "ia3"}, {}, {}, "adapter.method: ia3"),  # its vectors share the frozen layers' flat params
        ({"method": "ia3"}, {}, {"FSDP_VERSION": "2"}, None),  # FSDP2 shards per parameter
        ({"method": "lora"}, {"optimizer": "adamw_8bit"}, {}, "train.optimizer: adamw_8bit"),
        ({"method": "lora"}, {"optimizer": "paged_adamw_8bit"}, {}, "train.optimizer=adamw"),
        ({"method": "lora"}, {}, {"FSDP_VERSION": "2"}, None),
        ({"method": "lora"}, {}, {"FSDP_VERSION": "3"}, "fsdp_version: 3"),
    ],
)
def test_fsdp_refuses_what_it_cannot_checkpoint(adapter, train, env, refused, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    recipe = _adapter_recipe(adapter, train)
    if refused is None:
        check_fsdp(recipe, "no")
        return
    with pytest.raises(UsageError, match=refused):
        check_fsdp(recipe, "no")


def test_fsdp_refuses_float32_norms_beside_4bit_storage():
    """model.upcast_unquantized makes a decoder layer's norms fp32 beside its bf16-stored nf4 weights: FSDP1 flattens
    a layer into one tensor of one dtype (tests/distributed/fsdp_check.py runs FSDP + QLoRA without the upcast)."""
    recipe = _adapter_recipe({"method": "lora"}, model={"quantization": "nf4", "dtype": "bfloat16",
                                                        "upcast_unquantized": True})
    with pytest.raises(UsageError, match="model.upcast_unquantized"):
        check_fsdp(recipe, "no")


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_fsdp2_refuses_quantized_bases(quantization, monkeypatch):
    monkeypatch.setenv("FSDP_VERSION", "2")
    recipe = _adapter_recipe({"method": "lora"}, model={"quantization": quantization, "dtype": "bfloat16"})
    with pytest.raises(UsageError, match="cannot be sharded by FSDP version 2; use fsdp_version: 1"):
        check_fsdp(recipe, "no")


def test_4bit_storage_follows_the_compute_dtype():
    """What check_fsdp relies on: FSDP shards 4-bit weights stored in the model dtype like any other."""
    from lorakit.models.loading import build_quant_config

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert build_quant_config(_recipe(quantization="nf4").model, dtype).bnb_4bit_quant_storage == dtype


EXPECTED = {
    "ddp.yaml": {"distributed_type": "MULTI_GPU", "num_machines": 1},
    "fsdp.yaml": {"distributed_type": "FSDP", "num_machines": 1},
    "fsdp-qlora.yaml": {"distributed_type": "FSDP", "num_machines": 1},
    "fsdp2.yaml": {"distributed_type": "FSDP", "num_machines": 1},
    "multi-node.yaml": {"distributed_type": "MULTI_GPU", "num_machines": 2},
}
FSDP_KEYS = {  # per fsdp_version
    1: {"fsdp_sharding_strategy": "FULL_SHARD", "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_use_orig_params": False},
    2: {"fsdp_reshard_after_forward": True, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_state_dict_type": "SHARDED_STATE_DICT"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_configs_load_with_accelerates_own_loader(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = ACCELERATE / name
    raw = yaml.safe_load(path.read_text())
    assert raw["mixed_precision"] == "no"  # the recipe's model.dtype decides precision
    assert {k: raw[k] for k in EXPECTED[name]} == EXPECTED[name]
    if raw["distributed_type"] == "FSDP":
        keys = FSDP_KEYS[raw["fsdp_config"]["fsdp_version"]]
        assert {k: raw["fsdp_config"][k] for k in keys} == keys
        assert "fsdp_transformer_layer_cls_to_wrap" not in raw["fsdp_config"]  # the model's own decoder layer
    if raw["num_machines"] > 1:
        assert {"main_process_ip", "main_process_port", "machine_rank"} <= set(raw)
    config = load_config_from_file(str(path))  # rejects unknown keys and bad values
    assert config.distributed_type.value == raw["distributed_type"]
    assert f"accelerate launch --config_file recipes/accelerate/{name}" in path.read_text()


def test_the_fsdp_qlora_config_launches_what_check_fsdp_reads():
    """accelerate's launcher turns the config into the environment lorakit reads before loading the model."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(ACCELERATE / "fsdp-qlora.yaml"), "-m", "lorakit", "train", "r.yaml"]
    )
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "no"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP" and env["FSDP_USE_ORIG_PARAMS"] == "false"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"


def test_the_fsdp2_config_launches_version_2():
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(ACCELERATE / "fsdp2.yaml"), "-m", "lorakit", "train", "r.yaml"]
    )
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"  # what check_fsdp reads


# ----------------------------------------------------------------------------------------------------------
# Launcher helpers


def test_nproc_is_removed_from_the_relaunched_command():
    argv = ["--debug", "train", "r.yaml", "--nproc", "2", "--set", "train.seed=1", "--nproc=3", "--resume"]
    assert strip_option(argv, "--nproc") == ["--debug", "train", "r.yaml", "--set", "train.seed=1", "--resume"]


def test_nproc_is_refused_inside_a_launched_process(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(UsageError, match="already started by a launcher"):
        relaunch(2, ["train", "r.yaml"])


def test_fault_injection_is_off_unless_asked(monkeypatch):
    monkeypatch.delenv(RANK_FAULT_ENV, raising=False)
    fault_injector(1)(3)  # nothing happens
    monkeypatch.setenv(RANK_FAULT_ENV, "die:1:3")
    fault_injector(0)(3)  # another rank: nothing happens


# ----------------------------------------------------------------------------------------------------------
# Multi-process runs (slow)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """Data, a 2-rank recipe (grad_accum 2, dropout on, eval, a checkpoint at step 2), its 1-rank twin, runs."""
    root = tmp_path_factory.mktemp("distributed")
    train, evals = write_data(root / "train.jsonl", TRAIN_ROWS), write_data(root / "eval.jsonl", EVAL_ROWS)

    def recipe(name: str, **train_keys) -> Path:
        data = recipe_dict(tiny_model_dir, train, root / name, max_steps=None, epochs=1, eval_every=2,
                           save_every=2, learning_rate=3e-3, ddp_timeout=600, **train_keys)
        data["data"]["eval"] = str(evals)
        return write_recipe(root / f"{name}.yaml", data)

    return {"root": root, "two": recipe("two"), "one": recipe("one", grad_accum=4),
            "model": tiny_model_dir, "two_ranks": {}}


def _run(cmd: list, env: dict | None = None, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env or subprocess_env(), timeout=timeout,
                            cwd=ROOT)
    return result, time.monotonic() - start


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < atol, f"adapters differ by {worst}"


def _assert_same_log(a: list[dict], b: list[dict]) -> None:
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for x, y in zip(a, b):
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-5), (key, x, y)


def _two_rank_run(setup) -> Path:
    """The uninterrupted 2-rank run, started with `accelerate launch` and the shipped DDP config (once)."""
    if "run" not in setup["two_ranks"]:
        out = setup["root"] / "two"
        result, _ = _run([_bin("accelerate"), "launch", "--config_file", str(ACCELERATE / "ddp.yaml"),
                          "--num_processes", "2", "-m", "lorakit", "train", str(setup["two"])])
        assert result.returncode == 0, result.stderr[-3000:]
        setup["two_ranks"]["run"] = out
    return setup["two_ranks"]["run"]


@pytest.mark.slow
def test_two_ranks_with_grad_accum_k_equal_one_rank_with_2k(setup):
    two = _two_rank_run(setup)
    result, _ = _run([sys.executable, "-m", "lorakit", "train", str(setup["one"])])
    assert result.returncode == 0, result.stderr[-3000:]
    one = setup["root"] / "one"

    _assert_same_adapter(_adapter(two), _adapter(one))
    log_two, log_one = training_records(two / "metrics.jsonl"), training_records(one / "metrics.jsonl")
    # one line per step and per evaluation: only rank 0 writes
    assert [r["step"] for r in log_two if "loss" in r] == list(range(1, STEPS + 1))
    assert sum("eval_loss" in r for r in log_two) == 2
    _assert_same_log(log_two, log_one)
    assert any(v.abs().max() > 1e-4 for k, v in _adapter(one).items() if "lora_B" in k)  # B starts at 0: it trained


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_and_the_run_resumes_to_the_same_adapter(setup):
    two = _two_rank_run(setup)
    out = setup["root"] / "killed"
    cmd = [sys.executable, "-m", "lorakit", "train", str(setup["two"]), "--output-dir", str(out), "--nproc", "2"]
    killed, seconds = _run(cmd, env=subprocess_env(**{RANK_FAULT_ENV: "die:1:3"}))  # SIGKILL rank 1 at step 3
    assert killed.returncode != 0
    # train.ddp_timeout is 600 s: ending sooner means the launcher tore the job down, nobody waited it out
    assert seconds < 240, f"the job took {seconds:.0f}s to end after a rank died"
    assert "rank 1" in killed.stderr and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    assert (out / "checkpoints" / "step-000002").is_dir()

    other_world = cli("train", setup["two"], "--output-dir", out, "--resume")  # 1 process: refused before loading
    assert other_world.exit_code == 4, other_world.output[-2000:]
    assert "world size (processes): 2 → 1" in other_world.output

    resumed, _ = _run([*cmd, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_adapter(_adapter(out), _adapter(two), atol=1e-6)
    _assert_same_log(training_records(out / "metrics.jsonl"), training_records(two / "metrics.jsonl"))


@pytest.mark.slow
def test_a_stuck_rank_ends_the_job_after_ddp_timeout(setup):
    out = setup["root"] / "stuck"
    cmd = [_bin("torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "lorakit", "train", str(setup["two"]),
           "--output-dir", str(out), "--set", "train.ddp_timeout=15"]
    result, seconds = _run(cmd, env=subprocess_env(**{RANK_FAULT_ENV: "hang:1:1"}))  # rank 1 stops responding
    assert result.returncode != 0
    assert seconds < 240, f"the job took {seconds:.0f}s to end with a stuck rank and a 15 s timeout"
    assert "rank 0: a collective" in result.stderr and "train.ddp_timeout=15s" in result.stderr, result.stderr[-3000:]


FSDP_RUNS = {  # name: (adapter keys, model keys[, FSDP version])
    "lora": ({"r": 4, "lora_dropout": 0.0, "target_modules": "all-linear"}, {}),
    "dora": ({"method": "dora", "r": 4, "lora_dropout": 0.0, "target_modules": ["q_proj", "down_proj"]}, {}),
    "prefix": ({"method": "prefix", "num_virtual_tokens": 4, "prefix_projection": True, "encoder_hidden_size": 16,
                "r": None, "lora_dropout": None, "target_modules": None}, {}),
    "bottleneck": ({"method": "bottleneck", "r": 4, "lora_dropout": None, "target_modules": None}, {}),
    # FSDP + QLoRA: the nf4 weights stored as bfloat16 shard with the (bfloat16) norms and embeddings
    "qlora": ({"r": 4, "lora_dropout": 0.0, "target_modules": "all-linear"}, {"dtype": "bfloat16", "quantization": "nf4"}),
    # FSDP2 (fsdp_version: 2) shards per parameter: IA3's vectors may sit beside frozen weights
    "lora-fsdp2": ({"r": 4, "lora_dropout": 0.0, "target_modules": "all-linear"}, {}, 2),
    "ia3-fsdp2": ({"method": "ia3", "r": None, "lora_dropout": None, "target_modules": None}, {}, 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", FSDP_RUNS)
def test_fsdp_on_cpu_matches_one_process_and_resumes_exactly(setup, tmp_path, name):
    """accelerate runs FSDP on GPUs only; tests/distributed/fsdp_check.py builds the same wrapping with torch on CPU and runs
    lorakit's gather / save / checkpoint / resume code on it (one step == one process; 2 + resume + 2 == 4)."""
    adapter, model, *version = FSDP_RUNS[name]
    recipe = recipe_dict(setup["model"], setup["root"] / "train.jsonl", tmp_path / "unused", adapter=adapter)
    recipe["model"].update(model)
    path = write_recipe(tmp_path / "fsdp.yaml", recipe)
    result, _ = _run([_bin("torchrun"), "--standalone", "--nproc-per-node", "2",
                      str(ROOT / "tests" / "distributed" / "fsdp_check.py"), str(path), str(tmp_path / "out"), str(*version or [1])])
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "fsdp-vs-single" in result.stdout and "fsdp-resume" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where torch sees no GPU")
def test_a_gpu_accelerate_config_without_a_gpu_is_one_line(setup, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(setup["model"], setup["root"] / "train.jsonl", tmp_path / "run"))
    result, _ = _run([_bin("accelerate"), "launch", "--config_file", str(ACCELERATE / "fsdp.yaml"), "--num_processes",
                      "1", "-m", "lorakit", "train", str(recipe)])
    assert result.returncode != 0
    assert "error: accelerate launch: the accelerate config asks for GPUs, but torch sees none" in result.stderr
    assert "Traceback" not in result.stderr.split("error: accelerate launch")[0][-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fsdp_with_a_4bit_storage_fsdp_would_cast_is_refused_before_loading(setup, tmp_path):
    recipe = recipe_dict(setup["model"], setup["root"] / "train.jsonl", tmp_path / "run")
    recipe["model"]["quantization"] = "nf4"  # stored as float32 (model.dtype), but FSDP would compute in bf16
    path = write_recipe(tmp_path / "qlora.yaml", recipe)
    env = subprocess_env(ACCELERATE_USE_FSDP="true", ACCELERATE_MIXED_PRECISION="bf16")
    result, _ = _run([sys.executable, "-m", "lorakit", "train", str(path)], env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "mixed_precision bf16" in result.stderr and "model.dtype=bfloat16" in result.stderr
    assert not (tmp_path / "run").exists()


def test_the_failure_reported_is_the_rank_that_ended_the_job():
    """A killed rank is named whether the launcher saw it first or saw the collective failure of another rank (exit
    1) or the ranks it stopped itself (SIGTERM) first; without a killed rank, one that exited with its own error."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from lorakit.distributed.launch import cause_of

    def job(**codes):
        return ChildFailedError("lorakit", {int(r[1:]): ProcessFailure(int(r[1:]), 100 + int(r[1:]), code, "")
                                            for r, code in codes.items()})

    assert cause_of(job(r0=1, r1=-signal.SIGKILL))[0] == 1
    assert cause_of(job(r0=-signal.SIGTERM, r1=-signal.SIGKILL))[0] == 1
    assert cause_of(job(r0=-signal.SIGTERM, r1=3))[0] == 1
    assert cause_of(job(r0=3, r1=3))[0] == 0
