"""The registry of adapter methods (REGISTRY): for each, the recipe keys it uses and their defaults, whether it
merges, how a saved adapter is laid out, and the config class its options are checked against and built into
(PEFT's, or lorakit's BottleneckConfig). Applying, saving and loading live in lorakit.adapters.

Typed recipe section in, library config object out; torch and peft are imported only when a config is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lorakit.errors import OptionError, UsageError, first_line

if TYPE_CHECKING:
    from lorakit.config.schema import AdapterSection

# The bottleneck nonlinearities (lorakit.adapters.bottleneck maps each name to its torch module).
NONLINEARITY_NAMES = ("relu", "gelu", "silu", "tanh")


# Files of a saved adapter (DIR/adapter, a checkpoint's adapter/): (config, weights).
PEFT_LAYOUT = ("adapter_config.json", "adapter_model.safetensors")
BOTTLENECK_LAYOUT = ("bottleneck_config.json", "bottleneck_model.safetensors")


@dataclass(frozen=True)
class Method:
    """One adapter method, everything lorakit needs to know about it in one entry. Adding a method is one
    entry here plus, for a tuner PEFT does not have, one module in lorakit/adapters/ (as bottleneck.py)."""

    # lorakit's own adapter keys the method uses, with their defaults (lora_alpha None: 2·r). A method rejects
    # the others, as PEFT's IA3Config/PrefixTuningConfig/PromptTuningConfig reject a rank: the key would do nothing.
    key_defaults: dict[str, Any]
    config_class: str  # its options are checked against and built into peft.<config_class> (or BottleneckConfig)
    peft_type: str  # what its saved config records as peft_type (how `lorakit merge` recognises a saved adapter)
    # Why its update cannot fold into the base weights (`lorakit merge`, output.save: merged refuse it with this
    # reason); empty: it merges.
    not_mergeable: str = ""
    layout: tuple[str, str] = PEFT_LAYOUT  # saved as (config file, weights file); loaded by the config file's name
    why_unused: str = ""  # why the other own keys mean nothing to it (the refusal's reason)
    required: tuple[str, ...] = ()  # pass-through keys it cannot do without (PEFT has no usable default)

    @property
    def mergeable(self) -> bool:
        return not self.not_mergeable


_LORA_KEYS = {"r": 16, "lora_alpha": None, "lora_dropout": 0.05, "target_modules": "all-linear"}
# adapter.lora_dropout left unset under a preference objective (train.objective dpo, ipo, orpo, simpo): none, as
# TRL's preference trainers disable dropout (disable_dropout=True). The loss compares log-probs of the same
# sequences (policy and reference, chosen and rejected), and dropout noise in one side shifts every margin:
# train.reference: init_from starts exactly at the ln 2 loss only without it.
PREFERENCE_LORA_DROPOUT = 0.0
REGISTRY: dict[str, Method] = {
    "lora": Method(_LORA_KEYS, "LoraConfig", "LORA"),
    "dora": Method(dict(_LORA_KEYS), "LoraConfig", "LORA"),
    # target_modules None: PEFT's per-architecture IA3 targets and feedforward modules
    "ia3": Method({"target_modules": None}, "IA3Config", "IA3",
                  why_unused="IA3 learns scaling vectors: no rank, alpha or dropout"),
    "prefix": Method({}, "PrefixTuningConfig", "PREFIX_TUNING", required=("num_virtual_tokens",),
                     not_mergeable="prefix tuning adds learned key/value prefixes to every attention layer",
                     why_unused="prefix tuning learns key/value prefixes and targets no modules"),
    "prompt": Method({}, "PromptTuningConfig", "PROMPT_TUNING", required=("num_virtual_tokens",),
                     not_mergeable="prompt tuning prepends learned virtual-token embeddings to the input",
                     why_unused="prompt tuning learns virtual input tokens and targets no modules"),
    "bottleneck": Method({"r": 16}, "BottleneckConfig", "BOTTLENECK", layout=BOTTLENECK_LAYOUT,
                         not_mergeable="bottleneck adapters add small nonlinear MLP blocks after the sublayers",
                         why_unused="bottleneck adapters sit on attention/MLP outputs (adapter.placement) and use "
                         "adapter.dropout and adapter.scaling"),
}

# LoRA options whose forward is not W + s·B·A (or that train weights outside lora_A/B): merged output would differ,
# so `lorakit merge` refuses such an adapter and a recipe with output.save: merged|both refuses them.
UNSUPPORTED_LORA_OPTIONS = (
    "use_qalora", "use_bdlora", "arrow_config", "velora_config", "kasa_config", "monteclora_config", "mica",
    "alora_invocation_tokens", "layer_replication", "target_parameters",
)

# Views of the registry for the schema's validators and messages.
METHODS = tuple(REGISTRY)
METHOD_KEY_DEFAULTS = {name: m.key_defaults for name, m in REGISTRY.items()}
_WHY_UNUSED = {name: m.why_unused for name, m in REGISTRY.items() if m.why_unused}
MERGEABLE_METHODS = tuple(name for name, m in REGISTRY.items() if m.mergeable)
_REQUIRED = {name: m.required for name, m in REGISTRY.items() if m.required}
ADAPTER_LAYOUTS = tuple(dict.fromkeys(m.layout for m in REGISTRY.values()))


def saved_method(peft_type: str | None) -> Method | None:
    """The registry entry a saved adapter's recorded peft_type belongs to (lora and dora share LORA, and
    merge alike); None for an adapter type lorakit does not train."""
    return next((m for m in REGISTRY.values() if m.peft_type == peft_type), None)


def is_lora_family(method: str) -> bool:
    """Methods built as PEFT LoRA (A/B matrices, LoraConfig's options: inits, LoRA+, trainable tokens)."""
    return REGISTRY[method].config_class == "LoraConfig"


def peft_config_class(method: str):
    """The config class whose fields a method's pass-through keys must be (lorakit's own for bottleneck)."""
    name = REGISTRY[method].config_class
    if name == BottleneckConfig.__name__:
        return BottleneckConfig
    import peft

    return getattr(peft, name)


# Keys lorakit sets itself from the recipe or the model; a recipe may not pass them through.
_RESERVED = {
    "task_type", "peft_type", "base_model_name_or_path", "revision", "inference_mode", "use_dora",
    # prefix/prompt: PEFT reads these from the model's config; bottleneck: lorakit does
    "token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers", "hidden_size",
}


def check_feedforward(target_modules, feedforward_modules) -> None:
    """IA3: every feedforward module must also be a target (PEFT requires it; checked here to say so clearly)."""
    if not isinstance(target_modules, (list, tuple, set)) or not isinstance(feedforward_modules, (list, tuple, set)):
        return
    outside = [m for m in feedforward_modules if m not in target_modules]
    if outside:
        raise UsageError(
            f"adapter.feedforward_modules: {', '.join(outside)} not in adapter.target_modules "
            f"({', '.join(target_modules)}); IA3 scales the input of a feedforward module, so each must also be a "
            "target: add it to target_modules or remove it from feedforward_modules"
        )


def ia3_default_modules(model_type: str) -> tuple[list[str], list[str]] | None:
    """PEFT's own per-architecture IA3 (target, feedforward) modules, or None when PEFT has none."""
    from peft.utils import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
    )

    if model_type not in TARGETS:
        return None
    return list(TARGETS[model_type]), list(FEEDFORWARD.get(model_type, []))


def build_peft_config(section: AdapterSection, *, model_type: str | None = None, tokenizer_path: str | None = None,
                      token_rows: dict[str, list[int]] | None = None):
    """The adapter config of the recipe's adapter section: PEFT's class for the method (lorakit's
    BottleneckConfig for bottleneck), with the pass-through keys handed to that class unchanged.

    model_type selects IA3's per-architecture default modules; tokenizer_path is what prompt tuning's text
    init tokenizes with unless the recipe names tokenizer_name_or_path; token_rows: the trainable token rows
    per embedding module (adapter.trainable_tokens resolved against the tokenizer and the model).
    """
    from lorakit.config.methods import peft_config_class

    cls = peft_config_class(section.method)
    extras = dict(section.model_extra or {})
    if token_rows:
        extras["trainable_token_indices"] = token_rows
    kwargs: dict = {}
    if section.method in ("lora", "dora"):
        kwargs = dict(r=section.r, lora_alpha=section.lora_alpha, lora_dropout=section.lora_dropout,
                      target_modules=section.target_modules, use_dora=section.method == "dora")
    elif section.method == "ia3":
        kwargs["target_modules"] = section.target_modules
        defaults = ia3_default_modules(model_type) if section.target_modules is None and model_type else None
        if defaults is not None:
            kwargs["target_modules"] = defaults[0]
            extras.setdefault("feedforward_modules", defaults[1])
        check_feedforward(kwargs["target_modules"], extras.get("feedforward_modules"))
    elif section.method == "prompt":
        extras.update(_prompt_init(extras, tokenizer_path))
    elif section.method == "bottleneck":
        kwargs["r"] = section.r
    if section.method != "bottleneck":
        from peft import TaskType

        kwargs["task_type"] = TaskType.CAUSAL_LM
    try:
        return cls(**kwargs, **extras)
    except OptionError:
        raise  # lorakit's own config class: its message already names the key
    except (TypeError, ValueError) as e:
        raise UsageError(f"adapter: {cls.__name__} rejects these options: {first_line(e)}") from None
    except ImportError as e:  # e.g. scipy for init_lora_weights: loftq (the lorakit[loftq] extra)
        raise UsageError(f"adapter: {cls.__name__} needs a package for these options: {first_line(e)}") from None


def _prompt_init(extras: dict, tokenizer_path: str | None) -> dict:
    """prompt_tuning_init as PEFT spells it (TEXT, SAMPLE_VOCAB, RANDOM); text given implies TEXT init."""
    from peft import PromptTuningInit

    init = extras.get("prompt_tuning_init")
    if init is None and extras.get("prompt_tuning_init_text") is not None:
        init = "TEXT"
    if init is None:
        return {}
    choices = [m.value for m in PromptTuningInit]
    if str(init).upper() not in choices:
        raise UsageError(f"adapter.prompt_tuning_init: must be one of {', '.join(choices)}, got {init!r}")
    update = {"prompt_tuning_init": str(init).upper()}
    if update["prompt_tuning_init"] == "TEXT" and not extras.get("tokenizer_name_or_path"):
        update["tokenizer_name_or_path"] = tokenizer_path
    return update


PLACEMENTS = ("attention", "mlp")


@dataclass
class BottleneckConfig:
    """Options of the bottleneck adapter. `r` comes from adapter.r; the rest pass through from the recipe."""

    r: int  # bottleneck width (adapter.r)
    nonlinearity: str = "relu"
    dropout: float = 0.0
    placement: list[str] = field(default_factory=lambda: list(PLACEMENTS))  # Houlsby: after both sublayers
    scaling: float = 1.0
    layers_to_transform: list[int] | None = None  # decoder layer indices; None: every layer
    # Written at save time from the base model, checked at load time.
    hidden_size: int | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        if isinstance(self.placement, str):
            self.placement = [self.placement]
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if not isinstance(self.r, int) or self.r <= 0:
            raise OptionError(f"adapter.r: bottleneck width must be a positive integer, got {self.r!r}")
        if self.nonlinearity not in NONLINEARITY_NAMES:
            raise OptionError(
                f"adapter.nonlinearity: must be one of {', '.join(NONLINEARITY_NAMES)}, got {self.nonlinearity!r}"
            )
        if not 0 <= self.dropout < 1:
            raise OptionError(f"adapter.dropout: must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.scaling, (int, float)) or isinstance(self.scaling, bool) or self.scaling == 0:
            raise OptionError(f"adapter.scaling: a nonzero number (the adapter's output is multiplied by it: 0 "
                              f"leaves the base model and trains nothing), got {self.scaling!r}")
        if not self.placement or any(p not in PLACEMENTS for p in self.placement):
            raise OptionError(
                f"adapter.placement: a non-empty list of {', '.join(PLACEMENTS)}, got {self.placement!r}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BottleneckConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
