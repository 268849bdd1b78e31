"""adapter.init_lora_weights as the recipe check sees it: which inits rewrite the base weights (and are converted
at save by lorakit.adapters.inits), and which combinations lorakit refuses before anything loads.
"""

from __future__ import annotations

from lorakit.config.methods import is_lora_family

# Inits that rewrite the base weights and that lorakit converts at save (PEFT's conversion covers these).
REWRITING = ("pissa", "olora")
# The reason each init PEFT offers but lorakit cannot run is refused (recipe check, exit 2).
UNSUPPORTED = {
    "corda": "needs PEFT's preprocess_corda pass over calibration data, which lorakit does not run",
    "lora_ga": "needs PEFT's preprocess_loraga gradient estimation before the adapter is built, which lorakit "
    "does not run",
}


def init_name(extras: dict) -> str:
    """adapter.init_lora_weights as PEFT reads it, lower case: 'default' (True), 'random' (False), 'pissa', ..."""
    value = extras.get("init_lora_weights", True)
    if value is True:
        return "default"
    return "random" if value is False else str(value).lower()


def rewrites_base(name: str) -> bool:
    """PiSSA (pissa, pissa_niter_N) and OLoRA turn W into a residual; the saved adapter must be converted."""
    return name.startswith("pissa") or name == "olora"


def init_problems(recipe) -> list[str]:
    """Init settings lorakit cannot honour, each one line naming the key and the fix (checked at parse time)."""
    extras = recipe.adapter.model_extra or {}
    if not is_lora_family(recipe.adapter.method) or "init_lora_weights" not in extras:
        return []
    name = init_name(extras)
    key = "adapter.init_lora_weights"
    if name in UNSUPPORTED:
        return [f"{key}: {name} {UNSUPPORTED[name]}; use pissa, olora, eva or the default"]
    problems = []
    if rewrites_base(name) and recipe.adapter.method == "dora":
        problems.append(
            f"{key}: {name} with method dora cannot be saved as an adapter on the original base (PEFT's conversion "
            "keeps only lora_A/lora_B and drops DoRA's magnitudes); use method lora, or the default init"
        )
    dropped = [k for k in ("modules_to_save", "trainable_token_indices", "lora_bias") if extras.get(k)]
    dropped += ["bias"] if extras.get("bias", "none") != "none" else []
    dropped += ["trainable_tokens"] if recipe.adapter.trainable_tokens or recipe.model.add_tokens else []
    if rewrites_base(name) and dropped:
        problems.append(
            f"{key}: {name} with adapter.{dropped[0]}: PEFT's conversion to an adapter on the original base keeps "
            f"only lora_A/lora_B, so those weights would be lost at save; remove adapter.{dropped[0]} or use the "
            "default init"
        )
    if rewrites_base(name) and recipe.model.quantization != "none":
        problems.append(
            f"{key}: {name} rewrites the base weights into a residual, which PEFT cannot do exactly on a quantized "
            f"base (model.quantization: {recipe.model.quantization}); the adapter converted at save would not "
            "reproduce the trained model: set model.quantization: none, or use the default init"
        )
    if rewrites_base(name) and extras.get("use_rslora") and (extras.get("rank_pattern") or extras.get("alpha_pattern")):
        problems.append(
            f"{key}: {name} with use_rslora and rank_pattern/alpha_pattern cannot be converted to a plain LoRA "
            "adapter by PEFT; drop rank_pattern/alpha_pattern or use_rslora"
        )
    if name == "eva" and recipe.data.packing:
        problems.append(
            f"{key}: eva reads the layer inputs of padded micro-batches (attention_mask and labels); packed rows "
            "have neither: set data.packing: false"
        )
    return problems
