"""Every workaround of a library bug, in one place. Each names the sentinel test that fails once upstream is
fixed; then the workaround and its sentinel go.

Bottom layer: imports only libraries (lazily, so that importing lorakit stays light).
"""

from __future__ import annotations


def keep_bnb_4bit_layout(model) -> None:
    """Stop bitsandbytes (0.49+, on CPUs with AVX512-BF16) from repacking 4-bit weights in place at the first
    eval-mode forward. Only its inference kernel reads the repacked layout: after it, the backward pass (QLoRA
    gradients after an evaluation) and PEFT's dequantization (DoRA, merging) read it as the standard layout and
    compute wrong numbers. tests/adapters/test_methods.py::test_bnb_cpu_repacking_still_breaks_qlora fails once
    bitsandbytes no longer does this; then remove this function.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def dora_int8_broken_on_cpu(model) -> bool:
    """PEFT 0.21's DoRA re-wraps an int8 weight on CPU and drops its scales: the second forward fails, so
    lorakit refuses the combination. tests/adapters/test_methods.py::test_peft_dora_int8_cpu_still_broken fails
    once PEFT fixes it."""
    return getattr(model, "is_loaded_in_8bit", False) and model.device.type == "cpu"


def save_gathered_peft_adapter(model, out, state_dict: dict, **save_kwargs) -> None:
    """Save a PeftModel's adapter from ``state_dict`` gathered off FSDP shards.

    PEFT (0.21) reads a PeftModel's prompt encoders from the model itself, and picks a passed state dict's
    entries by module name stripping only a leading ``_fsdp_wrapped_module.``: under FSDP1, which wraps each
    decoder layer, it writes an empty adapter. So the state dict is saved through the same PEFT model built on
    the meta device (no memory), its weights put in place: PEFT then selects and names the entries as for an
    unsharded model. tests/distributed/fsdp_check.py fails once PEFT no longer needs this.
    """
    import copy

    from accelerate import init_empty_weights
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        base = AutoModelForCausalLM.from_config(model.base_model.model.config)
        skeleton = get_peft_model(base, copy.deepcopy(model.peft_config[model.active_adapter]))
    unexpected = skeleton.load_state_dict(state_dict, strict=False, assign=True).unexpected_keys
    if unexpected:  # the adapter's meta tensors became real; every gathered tensor must have found its place
        raise RuntimeError(f"gathered adapter weights the model does not have: {unexpected[:3]}")
    skeleton.save_pretrained(out, **save_kwargs)


# Why lorakit refuses to generate with a prefix-tuning adapter (lorakit generate, lorakit eval, train.eval_generate).
PREFIX_GENERATION_BROKEN = (
    "PEFT 0.21's generate() hands the learned prefix to the model as past_key_values, which transformers 5 ignores "
    "beside its own cache, so every generated token would be the base model's"
)


def prompt_learning_generate_kwargs(model) -> dict:
    """generate() options that make a prompt-tuning model generate what its forward computes. With the KV cache
    (PEFT 0.21, transformers 5) the positions of the tokens after the first drift from the forward's, by up to
    0.2 in the logits on the tiny test model; without it each step recomputes the whole sequence as training
    does. PEFT's generation with a prefix-tuning adapter ignores the prefix altogether (PREFIX_GENERATION_BROKEN).
    tests/tools/test_generate.py::test_peft_prompt_learning_generation_still_broken fails once PEFT fixes both;
    then remove this function and PREFIX_GENERATION_BROKEN."""
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    return {"use_cache": False} if config is not None and config.is_prompt_learning else {}
