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
    """PEFT's DoRA (0.21 and 0.22) re-wraps an int8 weight on CPU and drops its scales: the second forward fails,
    so lorakit refuses the combination. tests/adapters/test_methods.py::test_peft_dora_int8_cpu_still_broken fails
    once PEFT fixes it."""
    return getattr(model, "is_loaded_in_8bit", False) and model.device.type == "cpu"


def save_gathered_peft_adapter(model, out, state_dict: dict, **save_kwargs) -> None:
    """Save a PeftModel's adapter from ``state_dict`` gathered off FSDP shards.

    PEFT (0.21) reads a PeftModel's prompt encoders from the model itself, and picks a passed state dict's
    entries by module name stripping only a leading ``_fsdp_wrapped_module.``: under FSDP1, which wraps each
    decoder layer, it writes an empty adapter. So the state dict is saved through the same PEFT model built on
    the meta device (no memory), its weights put in place: PEFT then selects and names the entries as for an
    unsharded model. PEFT 0.22 strips FSDP's wrapper names at any depth and finds the entries itself; this path
    gives the same files there, so it stays while pyproject allows an older PEFT.
    tests/distributed/fsdp_check.py (check_peft_alone) fails when PEFT's behaviour on either side of 0.22 changes.
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


def peft_generate_breaks_prompt_learning(peft_version: str | None = None) -> bool:
    """Whether PEFT's own generate() with a prompt-learning adapter computes other tokens than its forward: true
    before PEFT 0.22 (the installed one unless ``peft_version`` is given), where _generate_with_prefix and
    prompt_learning_uncached stand in. PEFT 0.22 passes the prefix under transformers' own name for the cache
    (peft.import_utils.get_transformers_cache_name) and leaves a prompt-tuning model's positions to generate(), so
    its cached generate() gives the forward's tokens. A pre-release of 0.22 counts as before it (the workarounds are
    right on 0.22 as well). tests/tools/test_generate.py::test_peft_prompt_learning_generation_broken_before_0_22
    fails if PEFT's behaviour and this rule part; once pyproject requires peft>=0.22, remove the workarounds."""
    from packaging.version import Version

    return _version("peft", peft_version) < Version("0.22.0")


def prefix_training_breaks(peft_version: str | None = None, transformers_version: str | None = None) -> bool:
    """Whether a prefix-tuning adapter's prefix would never reach the model in training: PEFT before 0.22 hands it
    to the forward as ``past_key_values``, an alias transformers 5 keeps for its renamed ``cache`` argument only
    until 5.40 (``deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")`` on the models' forwards); after
    that the forward would take it into **kwargs unread and the prefix would train against nothing. PEFT 0.22
    passes it under transformers' own name. (Installed versions unless given; a 5.40 pre-release counts as 5.40.)
    tests/adapters/test_methods.py::test_prefix_training_breaks_only_with_old_peft_on_new_transformers pins the
    rule; the trained-prefix-moves test there would fail if it were wrong for the installed pair."""
    from packaging.version import Version

    return (_version("peft", peft_version) < Version("0.22.0")
            and _version("transformers", transformers_version) >= Version("5.40.0.dev0"))


def _version(package: str, given: str | None):
    """``given`` as a packaging Version, or the installed ``package``'s version when None."""
    import importlib

    from packaging.version import Version

    return Version(given if given is not None else importlib.import_module(package).__version__)


def adapter_generate(model, input_ids, attention_mask=None, **kwargs):
    """``model.generate(input_ids=..., attention_mask=..., **kwargs)`` with the active adapter on (for the base alone,
    call model.generate under disable_adapter()), through the workarounds below for prompt-learning adapters on a
    PEFT that needs them."""
    import torch

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    config = _active_config(model)
    if config is not None and config.peft_type == "PREFIX_TUNING" and peft_generate_breaks_prompt_learning():
        return _generate_with_prefix(model, config.num_virtual_tokens, input_ids, attention_mask, **kwargs)
    if prompt_learning_uncached(model):
        kwargs["use_cache"] = False
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def _generate_with_prefix(model, num_virtual_tokens: int, input_ids, attention_mask, **kwargs):
    """Generation with a prefix-tuning adapter. PEFT 0.21 injects the prefix as the forward's ``past_key_values``;
    transformers 5.25 renamed that argument ``cache``, and its generate() passes its own (empty) cache under the new
    name, so the forward drops PEFT's as a deprecated duplicate: every token would be the base model's. So the base
    model generates from the very prefix cache PEFT's forward (training) builds (get_prompt), under a mask that
    covers the virtual tokens: generate() then numbers a row's tokens from num_virtual_tokens on, left padding
    skipped, as training's forward numbers them. Each call gets a fresh cache, which generate() extends in place.
    Used before PEFT 0.22 only: see peft_generate_breaks_prompt_learning."""
    import inspect

    import torch

    batch = input_ids.shape[0]
    with torch.no_grad():
        prefix = model.get_prompt(batch_size=batch)
    mask = torch.cat([attention_mask.new_ones(batch, num_virtual_tokens), attention_mask], dim=1)
    base = model.get_base_model()
    # a transformers whose forward has no `cache` argument yet still calls it past_key_values
    name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    return base.generate(input_ids=input_ids, attention_mask=mask, **{name: prefix}, **kwargs)


def prompt_learning_uncached(model, peft_version: str | None = None) -> bool:
    """Whether ``model``'s active prompt-tuning (or p-tuning) adapter must generate without the KV cache to generate
    what its forward computes (adapter_generate then passes use_cache=False). With the cache (PEFT 0.21,
    transformers 5) the positions of the tokens after the first drift from the forward's, by up to 0.2 in the
    logits on the tiny test model; without it each step recomputes the whole sequence as training does. (A
    prefix-tuning adapter generates through _generate_with_prefix, with the cache.) False from PEFT 0.22 on (the
    installed one unless ``peft_version`` is given): see peft_generate_breaks_prompt_learning."""
    config = _active_config(model)
    return (config is not None and config.is_prompt_learning and config.peft_type != "PREFIX_TUNING"
            and peft_generate_breaks_prompt_learning(peft_version))


def _active_config(model):
    """The PEFT config of ``model``'s active adapter; None for a model without PEFT adapters."""
    return getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
