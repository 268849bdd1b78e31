"""Run by tests/test_distributed.py under `torchrun --nproc-per-node 2` (gloo, CPU); not collected by pytest.

accelerate enables FSDP only on GPUs, so this builds what `accelerate launch --config_file
recipes/accelerate/fsdp.yaml` builds there — torch FSDP (full shard, use_orig_params false) with the auto-wrap
policy lorakit sets (PEFT's: decoder layers, adapter layers apart) — on lorakit's model, runs one optimizer
step with each rank on half the batch, gathers the adapter as accelerate.get_state_dict does (FULL_STATE_DICT
to rank 0) and saves it with lorakit's save_adapter. Rank 0 checks it against one unsharded process.

usage: fsdp_one_step.py RECIPE.yaml OUT_DIR
"""

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lorakit.data import collate, load_datasets
from lorakit.model import build_model, load_tokenizer, resolve_model_path
from lorakit.recipe import load_recipe
from lorakit.train import save_adapter, supervised_targets


def one_step(model, batches, num_items, lr):
    # SGD: its step is proportional to the gradient (Adam's first step is ±lr whatever the gradient's size).
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for batch in batches:
        model(**batch, num_items_in_batch=num_items).loss.backward()
    optimizer.step()


def main(recipe_path: str, out: str) -> None:
    from peft import get_peft_model_state_dict
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullStateDictConfig, ShardingStrategy, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    recipe = load_recipe(recipe_path)
    model_path = resolve_model_path(recipe.model)
    tokenizer = load_tokenizer(recipe.model, model_path)
    examples = load_datasets(recipe.data, tokenizer, recipe.train.seed).train[: 2 * world]
    batches = [collate(examples[i : i + 2], tokenizer) for i in range(0, len(examples), 2)]
    total = sum(supervised_targets(b) for b in batches)
    lr = 1.0

    torch.manual_seed(0)
    reference = build_model(recipe, model_path)
    initial = {k: v.clone() for k, v in get_peft_model_state_dict(reference).items()}
    one_step(reference, batches, total, lr)

    torch.manual_seed(0)
    model = build_model(recipe, model_path)
    sharded = FSDP(
        model,
        auto_wrap_policy=fsdp_auto_wrap_policy(model),  # what lorakit.distributed.prepare_fsdp sets
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        use_orig_params=False,
        device_id=torch.device("cpu"),
    )
    assert len(FSDP.fsdp_modules(sharded)) > 1 + recipe_layers(model), "decoder and adapter layers are wrapped"
    # Each rank its own micro-batch; DDP and FSDP average gradients, hence total / world (as lorakit's loop).
    one_step(sharded, batches[rank :: world], total / world, lr)

    # accelerate offloads the gathered weights to the CPU (offload_to_cpu=True); on CPU shards that fails in
    # torch (the storage it would copy from is freed), and there is nowhere to offload to anyway.
    config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
    with FSDP.state_dict_type(sharded, StateDictType.FULL_STATE_DICT, config):
        state_dict = sharded.state_dict()  # a collective: every rank takes part
    if rank == 0:
        # Why save_adapter goes through distributed.adapter_skeleton: PEFT's own selection finds nothing here.
        # When this fails, PEFT handles nested FSDP wrappers itself and the skeleton can go.
        assert not get_peft_model_state_dict(model, state_dict=state_dict), "PEFT now handles FSDP1 names"
        save_adapter(model, tokenizer, recipe, Path(out), model_path, state_dict)
        from safetensors.torch import load_file

        saved = load_file(str(Path(out) / "adapter_model.safetensors"))
        expected = get_peft_model_state_dict(reference)
        assert saved.keys() == expected.keys(), (sorted(saved)[:3], sorted(expected)[:3])
        diff = max((saved[k] - expected[k]).abs().max().item() for k in expected)
        moved = max((expected[k] - v).abs().max().item() for k, v in initial.items())
        print(f"fsdp-vs-single max|diff| {diff:.3g}; step moved the adapter by {moved:.3g}", flush=True)
        assert moved > 1e-4 and diff < 1e-5
    dist.barrier()
    dist.destroy_process_group()


def recipe_layers(model) -> int:
    return model.config.num_hidden_layers


if __name__ == "__main__":
    main(*sys.argv[1:3])
