"""Bottleneck adapter layers (Houlsby et al., 2019): lorakit's own tuner, since PEFT has none.

The output h of each chosen sublayer (attention and/or MLP of a decoder layer) becomes
h + scaling·up(act(down(dropout(h)))), before the block's residual add. Up starts at zero, so the wrapped
model equals the base exactly until the first step. The wrapper adds forward hooks to the base's modules
(no library code is changed), freezes the base and saves only the adapter: bottleneck_config.json +
bottleneck_model.safetensors. Not mergeable: the nonlinearity cannot be folded into a weight.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lorakit.adapters.dropout import LoraDropout
from lorakit.config.methods import BOTTLENECK_LAYOUT, NONLINEARITY_NAMES, BottleneckConfig
from lorakit.errors import CheckpointError, UsageError
from lorakit.models.loading import decoder_layers

CONFIG_NAME, WEIGHTS_NAME = BOTTLENECK_LAYOUT
NONLINEARITIES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
assert set(NONLINEARITIES) == set(NONLINEARITY_NAMES)
# Child names of the attention and MLP blocks inside a decoder layer across transformers' architectures.
_CHILD_NAMES = {
    "attention": ("self_attn", "attn", "attention", "self_attention"),
    "mlp": ("mlp", "feed_forward", "ffn"),
}


class BottleneckAdapter(nn.Module):
    """down → act → up with a residual; kept in float32 whatever the base dtype (as PEFT keeps LoRA weights)."""

    def __init__(self, hidden_size: int, config: BottleneckConfig, device=None):
        super().__init__()
        self.down = nn.Linear(hidden_size, config.r, device=device, dtype=torch.float32)
        self.act = NONLINEARITIES[config.nonlinearity]()
        self.up = nn.Linear(config.r, hidden_size, device=device, dtype=torch.float32)
        # LoRA's dropout: on a CPU its masks take 16 random bits per element, a quarter of nn.Dropout's (it is
        # nn.Dropout itself on CUDA, under torch.compile and in eval)
        self.dropout = LoraDropout(config.dropout)
        self.scaling = config.scaling
        nn.init.zeros_(self.up.weight)  # the adapter starts as the identity: training starts from the base
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        delta = self.up(self.act(self.down(self.dropout(h.to(self.down.weight.dtype)))))
        return h + (self.scaling * delta).to(h.dtype)


class BottleneckModel(nn.Module):
    """A causal LM with bottleneck adapters; the surface the training loop and savers use, like a PeftModel."""

    def __init__(self, model: nn.Module, config: BottleneckConfig):
        super().__init__()
        self.base_model = model
        self.bottleneck_config = config
        self._adapter_enabled = True
        model.requires_grad_(False)
        hidden = model.config.get_text_config().hidden_size
        config.hidden_size = hidden
        config.base_model_name_or_path = getattr(model.config, "_name_or_path", None) or None
        layers = decoder_layers(model)
        chosen = config.layers_to_transform if config.layers_to_transform is not None else range(len(layers))
        bad = [i for i in chosen if not 0 <= i < len(layers)]
        if bad:
            raise UsageError(
                f"adapter.layers_to_transform: {bad} out of range; the model has layers 0..{len(layers) - 1}"
            )
        self.adapters = nn.ModuleDict()
        self._hooks = []
        for i in chosen:
            device = next(layers[i].parameters()).device
            per_layer = nn.ModuleDict()
            for placement in config.placement:
                adapter = BottleneckAdapter(hidden, config, device=device)
                per_layer[placement] = adapter
                sublayer = _child(layers[i], placement)
                self._hooks.append(sublayer.register_forward_hook(self._hook_for(adapter)))
            self.adapters[str(i)] = per_layer

    def _hook_for(self, adapter: BottleneckAdapter):
        def hook(module, args, output):
            if not self._adapter_enabled:
                return None  # None leaves the output as it is
            if isinstance(output, tuple):  # attention returns (output, weights, ...)
                return (adapter(output[0]),) + tuple(output[1:])
            return adapter(output)

        return hook

    def __getattr__(self, name: str):
        # Everything else (config, generation_config, get_input_embeddings, ...) is the base model's, as with PEFT.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    @contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the block (PeftModel.disable_adapter's contract)."""
        self._adapter_enabled = False
        try:
            yield
        finally:
            self._adapter_enabled = True

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        # PEFT's own count (4-bit packed weights counted at their unpacked size), so the summaries agree.
        from peft import PeftModel

        return PeftModel.get_nb_trainable_parameters(self)

    def print_trainable_parameters(self) -> None:
        from lorakit.models.loading import trainable_summary

        print(trainable_summary(self))

    def save_pretrained(self, save_directory, state_dict: dict | None = None, **_ignored) -> None:
        """Only the adapter: bottleneck_config.json + bottleneck_model.safetensors; its weights from
        ``state_dict`` (names as in this model's state_dict, e.g. gathered from FSDP shards) when given."""
        from safetensors.torch import save_file

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(json.dumps(self.bottleneck_config.to_dict(), indent=2) + "\n")
        if state_dict is None:
            weights = self.adapters.state_dict()
        else:
            weights = {k.removeprefix("adapters."): v for k, v in state_dict.items() if k.startswith("adapters.")}
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
        save_file(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})

    def load_adapter_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy the tensors of a bottleneck_model.safetensors into the adapters in place, so an optimizer built on
        them keeps its parameters (resuming a checkpoint); RuntimeError when a name or shape does not fit."""
        self.adapters.load_state_dict(weights, strict=True)


def _child(layer: nn.Module, placement: str) -> nn.Module:
    for name in _CHILD_NAMES[placement]:
        child = getattr(layer, name, None)
        if isinstance(child, nn.Module):
            return child
    children = ", ".join(n for n, _ in layer.named_children())
    raise UsageError(
        f"adapter.placement: no {placement} block in {type(layer).__name__} (its children are {children}); "
        f"choose placement from the blocks it has"
    )


def is_bottleneck_dir(path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def load_bottleneck(base_model: nn.Module, adapter_dir, is_trainable: bool = False) -> BottleneckModel:
    """The base model with the saved bottleneck adapter; frozen and in eval mode unless is_trainable."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    try:
        config = BottleneckConfig.from_dict(json.loads((adapter_dir / CONFIG_NAME).read_text()))
        weights = load_file(adapter_dir / WEIGHTS_NAME)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{adapter_dir}: not a readable bottleneck adapter ({e})") from None
    hidden = base_model.config.get_text_config().hidden_size
    if config.hidden_size is not None and config.hidden_size != hidden:
        raise CheckpointError(
            f"{adapter_dir}: adapter was trained on a model with hidden size {config.hidden_size}, this base has "
            f"{hidden} (base recorded: {config.base_model_name_or_path})"
        )
    model = BottleneckModel(base_model, config)
    try:
        model.load_adapter_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{adapter_dir}: adapter weights do not match its config: {str(e).splitlines()[0]}")
    model.adapters.requires_grad_(is_trainable)
    if not is_trainable:
        model.eval()
    return model
