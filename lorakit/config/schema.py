"""The recipe: pydantic schema, the single source of defaults and key docs (loading lives in lorakit.config.load).

The train section lives in lorakit.config.schema_train and the sections' base class in
lorakit.config.schema_base; both are re-exported here, so `lorakit.config.schema` is the whole schema.
Nothing here imports torch or transformers, so `lorakit validate` and `--help` stay fast.
"""

from __future__ import annotations

from typing import Literal, Union

import yaml
from pydantic import ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from lorakit.config.methods import (
    _WHY_UNUSED, MERGEABLE_METHODS, METHOD_KEY_DEFAULTS, METHODS, PREFERENCE_LORA_DROPOUT,
    UNSUPPORTED_LORA_OPTIONS, is_lora_family,
)
from lorakit.config.schema_base import Section, other_kind_of_rows
from lorakit.config.schema_train import (  # noqa: F401  (re-exported: the schema's public names)
    EVAL_METRICS, NO_WARMUP_SCHEDULERS, OBJECTIVE_KEYS, OBJECTIVES, PREFERENCE_OBJECTIVES, REFERENCES, SCHEDULERS,
    UNSUPPORTED_SCHEDULERS, USABLE_SCHEDULERS, TrainSection,
)

# Experiment trackers accelerate integrates (output.report_to); each name is also the module its package provides.
TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio", "aim", "comet_ml", "clearml", "dvclive", "swanlab")


class ModelSection(Section):
    name_or_path: str = Field(
        min_length=1, description="Base model: a hub id, a local Hugging Face model directory, or a .gguf file."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Compute and storage dtype of the base weights. auto: bfloat16 on a GPU that supports it, "
        "float32 on CPU.",
    )
    quantization: Literal["none", "nf4", "fp4", "int8"] = Field(
        "none", description="bitsandbytes quantization of the frozen base: none, nf4/fp4 (QLoRA, 4-bit) or int8."
    )
    double_quant: bool = Field(
        True, description="4-bit only (refused with another model.quantization): also quantize the quantization "
        "constants (saves ~0.4 bit per weight)."
    )
    upcast_unquantized: bool = Field(
        False,
        description="Quantized base only (refused without one): cast the weights bitsandbytes leaves unquantized (embeddings, norms, LM "
        "head) to float32, as PEFT's prepare_model_for_kbit_training does. Off: they stay in model.dtype as in "
        "LoRA, so the activations do too (half the activation memory in bf16). FSDP needs it off.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow model code from the hub repository to run. For a hub id it requires model.revision "
        "pinned to a full commit hash (else exit 5).",
    )
    revision: str | None = Field(
        None, description="Hub revision (commit hash, tag or branch) of the base model (or of a hub model.tokenizer); "
        "refused for a local model.")
    tokenizer: str | None = Field(
        None, description="Tokenizer to use when it is not stored with the model (hub id or local directory)."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel. auto: transformers' default for the model (sdpa where supported)."
    )
    add_tokens: list[str] = Field(
        default_factory=list,
        description="New tokens to add to the tokenizer (never split) and to the model's embedding (and untied LM "
        "head), e.g. ['<tool_call>', '</tool_call>']. Their rows train through adapter.trainable_tokens (every "
        "added token must be listed there; it defaults to these); lora/dora only. The tokenizer is saved with the "
        "adapter and the merged model.",
    )


class AdapterSection(Section):
    # Other fields of the method's PEFT config class pass through; they are checked against that class
    # (see validate_adapter_extras) rather than re-declared here.
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    method: Literal[METHODS] = Field(
        "lora",
        description="Adapter method: lora, dora (weight-decomposed LoRA), ia3, prefix, prompt or bottleneck "
        "(Houlsby adapter layers). rsLoRA is lora/dora with use_rslora: true. See docs/methods.md.",
    )
    r: int | None = Field(
        None,
        gt=0,
        description="Rank r of the LoRA update B·A (lora/dora) or width of the bottleneck (bottleneck); default 16. "
        "Not used by ia3, prefix or prompt.",
    )
    lora_alpha: float | None = Field(
        None,
        gt=0,
        description="lora/dora: the update is scaled by lora_alpha/r (lora_alpha/√r with use_rslora: true). "
        "Default 2·r.",
    )
    lora_dropout: float | None = Field(
        None, ge=0, lt=1, description="lora/dora: dropout on the adapter's input; default 0.05, and 0 under a "
        "preference train.objective (dpo, ipo, orpo, simpo), as TRL trains those without dropout.",
    )
    target_modules: Union[list[str], str, None] = Field(
        None,
        description="Modules that get an adapter (lora/dora/ia3): a list of module names (q_proj, v_proj, ...), "
        "'all-linear', or a regular expression matched against full module names. Default: all-linear for "
        "lora/dora; PEFT's per-architecture IA3 modules for ia3 (k_proj, v_proj, down_proj on Llama).",
    )

    trainable_tokens: list[str] | None = Field(
        None,
        description="lora/dora: tokens whose embedding rows (and untied LM-head rows) train, through PEFT's "
        "trainable_token_indices, which saves only those rows instead of whole embedding matrices (as "
        "modules_to_save would). Each must be one token of the tokenizer. Default: model.add_tokens.",
    )
    loraplus_lr_ratio: float | None = Field(
        None,
        gt=0,
        description="LoRA+ (lora/dora): the B matrices (and biases, DoRA magnitudes) learn at train.learning_rate "
        "times this ratio, the A matrices at train.learning_rate, through PEFT's create_loraplus_optimizer (the "
        "LoRA+ paper uses 16). Default: off, one learning rate for every tensor.",
    )
    loraplus_lr_embedding: float | None = Field(
        None,
        gt=0,
        description="LoRA+ only: learning rate of LoRA layers on embedding modules. Default: PEFT's 1e-6.",
    )

    init_from: str | None = Field(
        None,
        description="lora/dora: a saved adapter directory (e.g. runs/sft/adapter) whose weights this adapter starts "
        "from, to continue training it (a DPO stage after SFT). Its rank, alpha, method and target modules must be "
        "the recipe's (checked: exit 4). With train.reference: init_from it is also DPO/IPO's reference.",
    )
    _defaulted: set[str] = PrivateAttr(default_factory=set)  # the method's keys the recipe left to their default

    def defaulted(self, key: str) -> bool:
        """Whether the recipe left ``key`` (r, lora_alpha, lora_dropout, target_modules) to its default."""
        return key in self._defaulted

    def __eq__(self, other) -> bool:
        # Which keys were left to their default is how the values came about, not what they are: a recipe equals
        # its resolved copy (DIR/recipe.yaml), where every key is written out.
        return isinstance(other, AdapterSection) and self.model_dump() == other.model_dump()

    @field_validator("target_modules")
    @classmethod
    def _names_modules(cls, value):
        names = [value] if isinstance(value, str) else value
        if names is not None and (not names or not all(name.strip() for name in names)):
            what = "names no module" if not any(name.strip() for name in names) else "holds an empty name"
            raise ValueError(f"adapter.target_modules: {value!r} {what}; give module names (q_proj, v_proj), "
                             "all-linear or a regular expression, or leave it out for the method's default")
        return value

    @model_validator(mode="after")
    def _init_from(self) -> "AdapterSection":
        if self.init_from is None:
            return self
        if not is_lora_family(self.method):
            raise ValueError(f"adapter.init_from: continuing a saved adapter is available for lora/dora; method "
                             f"{self.method}: remove it")
        if "init_lora_weights" in (self.model_extra or {}):
            raise ValueError("adapter.init_from / adapter.init_lora_weights: the weights come from adapter.init_from; "
                             "remove adapter.init_lora_weights")
        return self

    @model_validator(mode="after")
    def _loraplus(self) -> "AdapterSection":
        if self.loraplus_lr_ratio is not None and not is_lora_family(self.method):
            raise ValueError(
                f"adapter.loraplus_lr_ratio: LoRA+ sets learning rates for LoRA's A and B matrices; method "
                f"{self.method} has none: remove it or use method lora/dora"
            )
        if self.loraplus_lr_embedding is not None and self.loraplus_lr_ratio is None:
            raise ValueError(
                "adapter.loraplus_lr_embedding: only used by LoRA+; set adapter.loraplus_lr_ratio (e.g. 16) or remove it"
            )
        return self

    @model_validator(mode="after")
    def _method_keys(self) -> "AdapterSection":
        used = METHOD_KEY_DEFAULTS[self.method]
        unused = [k for k in ("r", "lora_alpha", "lora_dropout", "target_modules") if k not in used]
        given = [k for k in unused if getattr(self, k) is not None]
        if given:
            keys = ", ".join(f"adapter.{k}" for k in given)
            raise ValueError(
                f"{keys}: not used by method {self.method} ({_WHY_UNUSED[self.method]}); "
                f"remove {'it' if len(given) == 1 else 'them'}"
            )
        self._defaulted = {key for key in used if getattr(self, key) is None}
        for key, default in used.items():
            if getattr(self, key) is None and default is not None:
                setattr(self, key, default)
        if "lora_alpha" in used and self.lora_alpha is None:
            self.lora_alpha = float(2 * self.r)
        return self


DATA_FORMATS = ("alpaca", "chat", "text", "completion", "preference")
CHAT_FORMATS = ("chat", "preference")  # the formats rendered with a chat template
# Fields each format reads; data.fields maps them to the dataset's column names.
FORMAT_FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages",),
    "text": ("text",),
    "completion": ("prompt", "completion"),
    "preference": ("prompt", "messages", "chosen", "rejected"),  # messages: a chat prompt in place of prompt
}


class TrainSource(Section):
    path: str = Field(description="A .jsonl/.json/.csv/.parquet file, a datasets.save_to_disk directory or a hub "
                      "dataset id.")
    weight: float = Field(
        1.0, gt=0, description="How much of this source an epoch takes: round(rows × weight) of its rows, in seeded "
        "order (cycled above 1). 1 everywhere is one pass over every row.",
    )
    format: Literal[DATA_FORMATS] | None = Field(None, description="This source's row format (default: data.format).")
    fields: dict[str, str] | None = Field(None, description="This source's column names (default: data.fields).")
    chat_template: str | None = Field(
        None, description="chat and preference sources: the chat template this source's rows render with, as "
        "data.chat_template takes it (default: data.chat_template, else the tokenizer's). The adapter's tokenizer "
        "keeps data.chat_template.",
    )


class DataSection(Section):
    train: Union[str, list[Union[str, TrainSource]]] = Field(
        description="Training data: a .jsonl/.json/.csv/.parquet file, a datasets.save_to_disk directory, "
        "a hub dataset id, or a list of these to mix; a list item may also be a mapping {path, weight, format, fields, chat_template} (docs/data.md#sources). "
        "A relative path is read from the current directory, not from the recipe's folder."
    )
    eval: str | None = Field(None, description="Evaluation data (same kinds as data.train).")
    eval_split: float | None = Field(
        None, gt=0, lt=1, description="Fraction of the training rows held out for evaluation (seeded by train.seed)."
    )
    format: Literal[DATA_FORMATS] = Field(
        "alpaca",
        description="Row format: alpaca (instruction/input/output), chat (messages: [{role, content}]), "
        "text (raw text), completion (prompt/completion) or preference (prompt or messages, then chosen and "
        "rejected answers: strings or assistant messages; for train.objective dpo, ipo, orpo, simpo; "
        "docs/preference.md).",
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Maps the format's field names to the dataset's column names, e.g. {instruction: question}. "
        "A key that is no field of the format is refused.",
    )
    chat_template: str | None = Field(
        None,
        description="chat and preference formats: a template shipped with lorakit (chatml, gemma, llama3, mistral, "
        "phi3, zephyr) or a .jinja file. Replaces the tokenizer's own template (and is saved with the adapter); "
        "required by chat rows when the tokenizer has none (preference rows then use plain prompts). A data.train source "
        "may set its own (docs/data.md#sources).",
    )
    max_seq_len: int = Field(2048, gt=0, description="Longest tokenized example, in tokens.")
    truncation: Literal["drop", "truncate_prompt", "truncate"] = Field(
        "truncate_prompt",
        description="Rows longer than max_seq_len: drop them, truncate the prompt from the left (never the "
        "response), or truncate the end.",
    )
    packing: bool = Field(
        False,
        description="Pack several examples into one sequence, padding-free, with attention kept inside each example.",
    )
    group_by_length: bool = Field(
        False,
        description="Without packing: put examples of similar length in the same micro-batch (less padding); "
        "the order of steps stays seeded and random. Off by default, as in transformers: wherever length "
        "correlates with the target, each step sees a biased slice and the model learns worse (measured on "
        "SmolLM2-135M: greedy exact match 19/40 grouped against 25/40 in random order, mean of 3 seeds; "
        "docs/performance.md#learning-parity).",
    )
    padding_free: bool = Field(
        True,
        description="Spend no FLOPs on padding: each micro-batch is flattened into one row, position ids "
        "restarting per example, and attention stays inside each example at Σ len² cost (flash_attention_2/3 "
        "and flex_attention by their own varlen kernels, sdpa and eager by lorakit's per-example attention; a "
        "probe checks at start). Unlike data.packing, a step holds the same examples, in the same order. Refused "
        "with data.packing, whose rows are always flattened.",
    )
    train_on_inputs: bool = Field(
        False, description="Also supervise prompt tokens. Default: only the response (and its end token) is learned. "
        "Refused where every row is data.format text (no prompt: every token is learned)."
    )
    skip_bad_rows: bool = Field(False, description="Skip and count malformed rows instead of stopping with exit 3.")
    cache: bool = Field(
        True,
        description="Reuse tokenized data from $LORAKIT_CACHE/data when the data files, tokenizer, chat template "
        "and this section are unchanged.",
    )

    split: str = Field("train", description="The split read from a hub dataset id (data.train and data.eval); "
                       "refused where they name none.")
    subset: str | None = Field(None, description="The configuration (subset) of a hub dataset id, where it has "
                               "several; refused where data.train and data.eval name none.")
    num_proc: int | None = Field(
        None, gt=0, description="Processes that tokenize (fork, batched fast-tokenizer calls). Default: the CPUs this "
        "process may use. The result does not depend on it.",
    )

    @field_validator("train", "eval")
    @classmethod
    def _names_data(cls, value, info: ValidationInfo):
        paths = [value] if isinstance(value, str) else [getattr(item, "path", item) for item in value or ()]
        if value is not None and (not paths or not all(path.strip() for path in paths)):
            what = "names no data" if not any(path.strip() for path in paths) else f"holds an empty path ({paths!r})"
            raise ValueError(f"data.{info.field_name}: {what}; give a .jsonl/.json/.csv/.parquet "
                             "file, a save_to_disk directory or a hub dataset id (or a list of them)")
        return value

    def sources(self) -> list[TrainSource]:
        """data.train as a list of sources (a plain path is a source of weight 1)."""
        items = [self.train] if isinstance(self.train, str) else self.train
        return [TrainSource(path=item) if isinstance(item, str) else item for item in items]

    def train_paths(self) -> list[str]:
        return [source.path for source in self.sources()]

    @model_validator(mode="after")
    def _weights_without_packing(self) -> "DataSection":
        if self.packing and any(source.weight != 1 for source in self.sources()):
            raise ValueError("data.packing / data.train[].weight: packed rows mix sources, so weights cannot apply; "
                             "set only one of them")
        return self

    @model_validator(mode="after")
    def _templates_need_chat_rows(self) -> "DataSection":
        formats = [source.format or self.format for source in self.sources()]
        for i, (source, fmt) in enumerate(zip(self.sources(), formats)):
            if source.chat_template is not None and fmt not in CHAT_FORMATS:
                raise ValueError(f"data.train[{i}].chat_template: {source.path} has format {fmt}, which renders no "
                                 "chat template; remove it or set the source's format to chat or preference")
        if self.eval is not None:
            formats.append(self.format)  # data.eval's rows
        if self.chat_template is not None and not any(fmt in CHAT_FORMATS for fmt in formats):
            raise ValueError(f"data.chat_template: no data.train source is chat or preference (data.format is "
                             f"{self.format}), so no row renders with it; remove it or set data.format: chat")
        return self

    @model_validator(mode="after")
    def _one_eval_source(self) -> "DataSection":
        if self.eval is not None and self.eval_split is not None:
            raise ValueError("data.eval / data.eval_split: set only one of them")
        return self

    @model_validator(mode="after")
    def _pairs_are_not_packed(self) -> "DataSection":
        if self.format == "preference" and self.packing:
            raise ValueError("data.packing: a preference pair must stay whole in one micro-batch; set data.packing: "
                             "false (data.padding_free already spends nothing on padding)")
        if self.format == "preference" and self.train_on_inputs:
            raise ValueError("data.train_on_inputs: a preference loss compares the answers only (the prompt is the "
                             "same in both); remove it")
        return self

    @model_validator(mode="after")
    def _packing_or_grouping(self) -> "DataSection":
        if self.packing and self.group_by_length:
            raise ValueError("data.packing / data.group_by_length: packed rows need no length grouping; set only one")
        return self



class OutputSection(Section):
    dir: str = Field("runs/lorakit", description="Run directory: adapter/, checkpoints/, metrics.jsonl, recipe.yaml.")
    save: Literal["adapter", "merged", "both"] = Field(
        "adapter", description="What to write at the end: adapter (DIR/adapter/), or merged / both (the same: "
        "DIR/adapter/ and the model merged from it, DIR/merged/; the adapter stays, it is the merge's input)."
    )
    report_to: list[Literal[TRACKERS]] | Literal[TRACKERS] = Field(
        default_factory=list,
        description="Experiment trackers that receive the metrics and the resolved recipe (as parameters), through "
        "accelerate, on rank 0 only: tensorboard (DIR/tensorboard/), mlflow, wandb, trackio, aim, comet_ml, "
        "clearml, dvclive, swanlab; one name alone is a list of one. Each needs its package (pip install "
        "'lorakit[mlflow]', ...) and reads its own settings from the environment (MLFLOW_TRACKING_URI, WANDB_MODE, "
        "...). The run is named after output.dir.",
    )
    project: str = Field(
        "lorakit", min_length=1, description="Experiment (project) name in the trackers of output.report_to; "
        "refused without one (tensorboard alone writes to DIR/tensorboard, unnamed).",
    )
    tensorboard: bool = Field(
        False, description="Deprecated: the same as adding tensorboard to output.report_to.",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _no_keywords(cls, value):
        names = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        if "none" in names:  # transformers' report_to words, which lorakit does not take
            raise ValueError("output.report_to: 'none' is not a tracker; for no tracker leave output.report_to "
                             "out (or [])")
        if "all" in names:
            raise ValueError(f"output.report_to: 'all' is not a tracker; name the ones to use ({', '.join(TRACKERS)})")
        if isinstance(value, str) and "," in value:
            raise ValueError(f"output.report_to: {value!r} names several trackers in one string; write a list: "
                             f"[{', '.join(name.strip() for name in value.split(','))}]")
        return value

    @field_validator("report_to")
    @classmethod
    def _one_is_a_list(cls, value) -> list[str]:
        return [value] if isinstance(value, str) else value


class Recipe(Section):
    model: ModelSection = Field(description="The base model and how it is loaded.")
    adapter: AdapterSection = Field(default_factory=AdapterSection, description="The adapter method and its options.")
    data: DataSection = Field(description="Training and evaluation data.")
    train: TrainSection = Field(description="Optimisation schedule.")
    output: OutputSection = Field(default_factory=OutputSection, description="Where and what to write.")

    @model_validator(mode="after")
    def _mergeable(self) -> "Recipe":
        if self.output.save != "adapter" and self.adapter.method not in MERGEABLE_METHODS:
            raise ValueError(
                f"output.save: {self.output.save!r} needs a mergeable adapter.method ({', '.join(MERGEABLE_METHODS)});"
                f" {self.adapter.method} adds computation the base weights cannot absorb: use output.save: adapter"
            )
        options = [f"adapter.{k}" for k in UNSUPPORTED_LORA_OPTIONS if (self.adapter.model_extra or {}).get(k)]
        if self.output.save != "adapter" and options:  # else the merge at the end fails after the whole run
            raise ValueError(
                f"output.save: {self.output.save!r} cannot merge an adapter trained with {', '.join(options)} (that "
                "LoRA variant is not a plain weight update, so `lorakit merge` refuses it); use output.save: adapter "
                "and serve it with `lorakit generate --adapter DIR/adapter`"
            )
        return self

    @model_validator(mode="after")
    def _evaluation_keys(self) -> "Recipe":
        eval_rows = bool(self.data.eval or self.data.eval_split)
        if self.train.eval_every and not eval_rows:
            raise ValueError("train.eval_every: needs eval rows to evaluate; set data.eval or data.eval_split, or "
                             "remove it")
        if self.train.eval_generate and not eval_rows:
            raise ValueError("train.eval_generate: needs eval rows; set data.eval or data.eval_split")
        if self.train.eval_generate and self.data.format == "text":
            raise ValueError("train.eval_generate: data.format text rows have no answer to score; set it to 0 "
                             "(eval_loss is still computed)")
        return self

    @model_validator(mode="after")
    def _objective_matches_data(self) -> "Recipe":
        pairs, preference = self.data.format == "preference", self.train.objective in PREFERENCE_OBJECTIVES
        if preference and not pairs:
            raise ValueError(f"train.objective: {self.train.objective} learns from chosen/rejected pairs; set "
                             f"data.format: preference (data.format is {self.data.format})")
        if pairs and not preference:
            raise ValueError("data.format: preference rows need a preference objective; set train.objective to "
                             f"one of {', '.join(PREFERENCE_OBJECTIVES)}")
        for i, source in enumerate(self.data.sources()):  # pairs and one-answer rows cannot share a batch
            if source.format is not None and (source.format == "preference") != preference:
                raise ValueError(other_kind_of_rows(i, source.path, source.format, self.train.objective))
        if self.train.reference == "init_from" and self.adapter.init_from is None:
            raise ValueError("train.reference: init_from needs adapter.init_from (the adapter this stage starts from, "
                             "e.g. runs/sft/adapter); or use base")
        if pairs and self.train.eval_generate:
            raise ValueError("train.eval_generate: not available with preference data (evaluation reports rewards/"
                             "accuracy); set it to 0 (after training, `lorakit eval RUN --data PAIRS` scores answers)")
        if pairs and self.adapter.method in ("prefix", "prompt"):
            raise ValueError(f"train.objective: {self.train.objective} needs an adapter that can be switched off "
                             f"for the reference and a per-token head; adapter.method {self.adapter.method} adds "
                             "virtual tokens: use lora, dora, ia3 or bottleneck")
        return self

    @model_validator(mode="after")
    def _preference_dropout(self) -> "Recipe":
        if self.train.objective in PREFERENCE_OBJECTIVES and self.adapter.defaulted("lora_dropout"):
            self.adapter.lora_dropout = PREFERENCE_LORA_DROPOUT  # methods.PREFERENCE_LORA_DROPOUT says why
        return self

    @model_validator(mode="after")
    def _packing_with_virtual_tokens(self) -> "Recipe":
        if self.data.packing and self.adapter.method in ("prefix", "prompt"):
            raise ValueError(
                f"data.packing: not possible with adapter.method {self.adapter.method} (its virtual tokens are "
                "prepended to each sequence, and PEFT drops the position ids packing relies on); "
                "set data.packing: false"
            )
        return self


# --------------------------------------------------------------------------------------------------------------
# Key documentation, generated from the schema (CLI help, `lorakit init`, docs/recipe-reference.md)


def describe_keys() -> list[tuple[str, str, str]]:
    """(dotted key, default as YAML, description) for every recipe key, in schema order."""
    rows = []
    for section_name, section_field in Recipe.model_fields.items():
        section = section_field.annotation
        for name, field in section.model_fields.items():
            if field.is_required():
                default = "required"
            else:
                value = field.get_default(call_default_factory=True)
                default = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            rows.append((f"{section_name}.{name}", default, field.description or ""))
    return rows
