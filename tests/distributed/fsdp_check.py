"""Run by tests/distributed/test_distributed.py under `torchrun --nproc-per-node 2` (gloo, CPU); not collected by pytest.

accelerate enables FSDP only on GPUs, so this builds what `accelerate launch --config_file
recipes/accelerate/fsdp.yaml` builds there — torch FSDP1 (full shard, use_orig_params false) with the auto-wrap
policy lorakit sets (PEFT's: decoder layers, adapter layers apart) — or, with VERSION 2, what fsdp_version: 2
builds (fully_shard on every decoder layer, then on the root), on lorakit's model, and drives lorakit's own FSDP
code with it:

1. one SGD step with each rank on half the batch equals one unsharded process; the adapter gathered by
   distributed.gather_adapter and saved by train.save_adapter is that process's adapter;
2. a resumable checkpoint: 2 AdamW steps, train.save_checkpoint, a fresh model restored the way `lorakit train
   --resume` restores it (checkpoint.restore_adapter before wrapping, train.resume_state after), 2 more steps
   == 4 uninterrupted steps (adapter and optimizer state); the checkpoint holds whole, unsharded tensors; the
   same from the checkpoint of an unsharded run (checkpoints do not depend on FSDP).

usage: fsdp_check.py RECIPE.yaml OUT_DIR [VERSION]
"""

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lorakit.checkpoint.write import check_finite
from lorakit.checkpoint.read import list_checkpoints, verify_checkpoint
from lorakit.checkpoint.resume import restore_adapter
from lorakit.data import StepSampler, collate, load_datasets, num_targets
from lorakit.distributed.fsdp import build_accelerator, gather_adapter, optimizer_state
from lorakit.adapters.build import build_model
from lorakit.models.loading import load_tokenizer, resolve_model_path
from lorakit.config.load import load_recipe
from lorakit.training.context import RunPaths
from lorakit.training.optim import build_optimizer, build_scheduler
from lorakit.training.run import resume_state, save_adapter
from lorakit.training.loop import save_checkpoint


def run_steps(model, optimizer, scheduler, batches, num_items, steps):
    for _ in range(steps):
        for batch in batches:
            model(**batch, num_items_in_batch=num_items).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def shard(model, version: int):
    """What accelerator.prepare builds from fsdp.yaml: FSDP1 with the wrap policy lorakit.distributed.fsdp.prepare_fsdp
    sets, or FSDP2 (fully_shard per decoder layer, then the root)."""
    if version == 2:
        from torch.distributed.fsdp import fully_shard

        from lorakit.models.loading import decoder_layers

        for layer in decoder_layers(model.get_base_model()):
            fully_shard(layer)
        return fully_shard(model)
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    return FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), sharding_strategy=ShardingStrategy.FULL_SHARD,
                use_orig_params=False, device_id=torch.device("cpu"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a)[:3], sorted(b)[:3])
    return max(((a[k].float() - b[k].float()).abs().max().item() for k in a), default=0.0)


def flat_moments(osd: dict) -> dict:
    return {f"{p}.{k}": v for p, s in osd["state"].items() for k, v in s.items() if torch.is_tensor(v)}


def main(recipe_path: str, out: str, version: int = 1) -> None:
    from peft import get_peft_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    recipe = load_recipe(recipe_path)
    accelerator = build_accelerator(recipe.train)  # the gloo process group, as lorakit train sets it up
    rank, world = dist.get_rank(), dist.get_world_size()
    model_path = resolve_model_path(recipe.model)
    tokenizer = load_tokenizer(recipe.model, model_path)
    examples = load_datasets(recipe.data, tokenizer, recipe.train.seed).train[: 2 * world]
    batches = [collate(examples[i : i + 2], tokenizer) for i in range(0, len(examples), 2)]
    total = sum(num_targets(b["labels"]) for b in batches)
    mine, num_items = batches[rank::world], total / world  # FSDP averages gradients over ranks, as lorakit's loop
    say = print if rank == 0 else (lambda *_: None)

    # 1. One SGD step (its step is proportional to the gradient; Adam's first is ±lr whatever its size).
    torch.manual_seed(0)
    reference = build_model(recipe, model_path)
    initial = {k: v.clone() for k, v in adapter_weights(reference).items()}
    sgd = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=1.0)
    run_steps(reference, sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda s: 1.0), batches, total, 1)

    torch.manual_seed(0)
    model = build_model(recipe, model_path)
    sharded = shard(model, version)
    if version == 1:
        assert len(FSDP.fsdp_modules(sharded)) > 1 + model.config.num_hidden_layers, "decoder and adapter layers wrapped"
    sgd = torch.optim.SGD([p for p in sharded.parameters() if p.requires_grad], lr=1.0)
    run_steps(sharded, sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda s: 1.0), mine, num_items, 1)
    gathered = gather_adapter(sharded)  # a collective: every rank takes part
    peft_alone = None
    if version == 1 and hasattr(model, "peft_config") and not model.active_peft_config.is_prompt_learning:
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType

        cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(sharded, StateDictType.FULL_STATE_DICT, cfg):
            full = sharded.state_dict()  # a collective
        peft_alone = get_peft_model_state_dict(model, state_dict=full)
    if rank == 0:
        save_adapter(model, tokenizer, recipe, Path(out) / "adapter", model_path, gathered)
        saved, expected = _load_adapter_file(Path(out) / "adapter"), adapter_weights(reference)
        diff, moved = max_diff(saved, expected), max_diff(expected, initial)
        say(f"fsdp-vs-single max|diff| {diff:.3g}; step moved the adapter by {moved:.3g}", flush=True)
        assert moved > 1e-4 and diff < 1e-5
        if peft_alone is not None:
            check_peft_alone(peft_alone, saved)
    dist.barrier()

    # 2. A resumable checkpoint at step 2 of 4, written sharded, or by an unsharded run (each rank the whole batch):
    # checkpoints are the same with or without FSDP, so either resumes sharded.
    sampler = StepSampler(num_examples=len(examples), micro_batch_size=2, grad_accum=1, seed=recipe.train.seed,
                          world_size=world, rank=rank)
    states, checkpoints = {}, {}
    for label in ("straight", "resumed", "from-unsharded"):
        torch.manual_seed(0)
        model = build_model(recipe, model_path)
        sharded = model if label == "from-unsharded" else shard(model, version)
        optimizer = build_optimizer(sharded, recipe.train)
        scheduler = build_scheduler(optimizer, recipe.train, 4)
        if label == "straight":
            run_steps(sharded, optimizer, scheduler, mine, num_items, 4)
        else:
            if label == "from-unsharded":
                run_steps(model, optimizer, scheduler, batches, total, 2)
            else:
                run_steps(sharded, optimizer, scheduler, mine, num_items, 2)
            paths = RunPaths(Path(out) / label)
            save_checkpoint(accelerator, sharded, optimizer, scheduler, recipe, paths, sampler, 2, 0)
            (_, path), = list_checkpoints(paths.checkpoints)
            checkpoint = checkpoints[label] = verify_checkpoint(path)
            assert checkpoint.state["fsdp"] == (label == "resumed") and checkpoint.state["world_size"] == world
            torch.manual_seed(1)  # another initial adapter: the checkpoint must replace it
            fresh = build_model(recipe, model_path)
            restore_adapter(checkpoint, model=fresh, sampler=sampler, changed=False, say=say)
            sharded = shard(fresh, version)
            optimizer = build_optimizer(sharded, recipe.train)
            scheduler = build_scheduler(optimizer, recipe.train, 4)
            start = resume_state(checkpoint, False, accelerator, sharded, optimizer, scheduler, paths, say)
            assert start.step == 2
            run_steps(sharded, optimizer, scheduler, mine, num_items, 2)
        states[label] = (gather_adapter(sharded), optimizer_state(sharded, optimizer))
    # As the final save does, on rank 0 alone: no collective may hide in it (FSDP2's moments are DTensors). The
    # other rank waits on a file, not a collective that a stray one on rank 0 could pair with.
    done = Path(out) / "check_finite.done"
    if rank == 0:
        check_finite(sharded, optimizer, 4, states["resumed"][0])
        done.touch()
    else:
        deadline = time.monotonic() + 60
        while not done.exists():
            assert time.monotonic() < deadline, "rank 0 is stuck in check_finite (a collective on one rank)"
            time.sleep(0.1)
    dist.barrier()
    if rank == 0:
        a, oa = states["straight"]
        for label, checkpoint in checkpoints.items():
            trainable = {n: s for n, s in checkpoint.state["trainable"]}
            assert a.keys() == trainable.keys() and all(list(v.shape) == trainable[k] for k, v in a.items())
            saved = _read_optimizer(checkpoint.path)["state"]
            whole = {p: s["exp_avg"].shape for p, s in saved.items() if "exp_avg" in s}
            assert whole and all(list(shape) == trainable[p] for p, shape in whole.items()), "unsharded moments"
            b, ob = states[label]
            diff, moments = max_diff(a, b), max_diff(flat_moments(oa), flat_moments(ob))
            say(f"fsdp-resume ({label}) max|diff| adapter {diff:.3g}, optimizer state {moments:.3g}", flush=True)
            assert diff < 1e-6 and moments < 1e-6
    dist.barrier()
    dist.destroy_process_group()


def check_peft_alone(found: dict, saved: dict) -> None:
    """The sentinel of lorakit.compat.save_gathered_peft_adapter: PEFT before 0.22 finds nothing in a state dict
    named by FSDP1's nested wrappers; from 0.22 on (peft.utils.integrations.remove_torch_wrapper_names) it finds the
    adapter lorakit saved. Fails when PEFT behaves otherwise; once pyproject requires peft>=0.22,
    distributed.save_adapter_weights can hand PEFT the gathered state dict directly."""
    import peft
    from packaging.version import Version

    if Version(peft.__version__) < Version("0.22.0"):
        assert not found, f"PEFT {peft.__version__} now handles FSDP1 names"
    else:
        assert max_diff(found, saved) == 0.0, f"PEFT {peft.__version__} saves another adapter from FSDP1's names"


def _load_adapter_file(folder: Path) -> dict:
    from safetensors.torch import load_file

    (file,) = [p for p in folder.glob("*.safetensors")]
    return load_file(str(file))


def adapter_weights(model) -> dict:
    """The adapter's tensors under the names its saved file uses."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model) if hasattr(model, "peft_config") else model.adapters.state_dict()


def _read_optimizer(path: Path) -> dict:
    from lorakit.checkpoint.format import _read_piece

    return _read_piece(path, "optimizer")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1)
