"""The memory estimate's inputs and outputs: Settings (what a run would do), Line (one component), Estimate."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.config.methods import METHOD_KEY_DEFAULTS
from lorakit.config.schema import DataSection, ModelSection, TrainSection
from lorakit.memory.profile import ModelProfile


GiB = 1024**3


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


ADAPTER_BYTES = 4  # get_peft_model(autocast_adapter_dtype=True) keeps adapter weights in fp32 on bf16/fp16 bases


OVERHEAD_BYTES = GiB  # CUDA context (~0.5 GiB with lazy loading) + cuBLAS workspaces + caching-allocator slack


LOGITS_BYTES = 12  # per token·vocab entry at the loss backward: fp32 log-softmax + its gradient + the logits' grad


_ORDER = ("attn_in", "attn_out", "mlp_in", "mlp_out")


def _schema(section, key: str):
    return section.model_fields[key].default  # defaults live in the recipe schema only


@dataclass(frozen=True)
class Settings:
    """The knobs an estimate depends on (resolved from the recipe and the command line; unset: schema defaults)."""

    method: str = "lora"  # full | lora (any PEFT adapter)
    quantization: str = _schema(ModelSection, "quantization")  # none | nf4 | fp4 | int8
    double_quant: bool = _schema(ModelSection, "double_quant")
    upcast_unquantized: bool = _schema(ModelSection, "upcast_unquantized")
    dtype: str = "bfloat16"  # model.dtype auto, as it resolves on a GPU with bf16
    batch_size: int = _schema(TrainSection, "micro_batch_size")
    seq_len: int = _schema(DataSection, "max_seq_len")
    gradient_checkpointing: bool = _schema(TrainSection, "gradient_checkpointing")
    optimizer: str = _schema(TrainSection, "optimizer")
    attn_implementation: str = _schema(ModelSection, "attn_implementation")  # auto | sdpa | eager | flash_attention_2
    lora_dropout: float = METHOD_KEY_DEFAULTS["lora"]["lora_dropout"]
    chunked_loss: bool = _schema(TrainSection, "chunked_loss")
    gpus: int = 1
    strategy: str = "ddp"  # ddp | fsdp
    device: str = "cuda"  # cuda | cpu: on CPU dropout keeps a full noise tensor, no CUDA context (benchmarks only)
    objective: str = _schema(TrainSection, "objective")  # sft | dpo | ipo | orpo | simpo: pairs run 2 sequences
    reference: str | None = None  # dpo/ipo: base (a forward without gradients per micro-batch) | precomputed
    prompt_tokens: int = 0  # prompt tuning's virtual tokens, prepended to every sequence (adapter methods only)
    prefix_tokens: int = 0  # prefix tuning's virtual keys/values, joined to every attention (adapter methods only)


@dataclass
class Line:
    key: str
    label: str
    bytes: int
    formula: str
    parts: dict = field(default_factory=dict)


@dataclass
class Estimate:
    profile: ModelProfile
    settings: Settings
    lines: list
    total_bytes: int
    per_device_bytes: int
    peak_formula: str
    per_device_formula: str
    notes: list

    def line(self, key: str) -> Line:
        return next(line for line in self.lines if line.key == key)

    @property
    def trainable_params(self) -> int:
        return self.profile.base_params if self.settings.method == "full" else self.profile.trainable_params

    @property
    def total_params(self) -> int:
        return self.profile.base_params if self.settings.method == "full" else self.profile.total_params


def gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB"
