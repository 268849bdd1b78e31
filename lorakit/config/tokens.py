"""model.add_tokens and adapter.trainable_tokens as the recipe check sees them (the tokens themselves are
handled by lorakit.models.tokens)."""

from __future__ import annotations

from lorakit.config.methods import is_lora_family


def tokens_to_train(recipe) -> list[str]:
    """adapter.trainable_tokens, defaulting to model.add_tokens."""
    return list(recipe.adapter.trainable_tokens if recipe.adapter.trainable_tokens is not None
                else recipe.model.add_tokens)


def token_problems(recipe) -> list[str]:
    """Recipe-level rules for new and trainable tokens (exit 2 at parse time)."""
    added, trained = recipe.model.add_tokens, tokens_to_train(recipe)
    problems = []
    if (added or trained) and not is_lora_family(recipe.adapter.method):
        key = "model.add_tokens" if added else "adapter.trainable_tokens"
        problems.append(
            f"{key}: token rows train through LoRA's trainable_token_indices; method {recipe.adapter.method} has "
            "none: use adapter.method lora or dora"
        )
    untrained = [t for t in added if t not in trained]
    if untrained:
        problems.append(
            f"model.add_tokens: {', '.join(map(repr, untrained))} not in adapter.trainable_tokens; a new token's "
            "embedding row would stay random and unsaved: add it to adapter.trainable_tokens"
        )
    if trained and "trainable_token_indices" in (recipe.adapter.model_extra or {}):
        problems.append(
            "adapter.trainable_token_indices: set by lorakit from adapter.trainable_tokens (and model.add_tokens); "
            "remove one of them"
        )
    return problems
