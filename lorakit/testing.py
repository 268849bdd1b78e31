"""Tiny random models and tokenizers built locally, offline: the fixtures of tests, smoke runs and benchmarks.

The tokenizer is a real byte-level BPE trained here on a small corpus, with ChatML special tokens and
chat template, so chat formatting, masking and generation run exactly as they do on a real model.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
# Llama 3's layout: turns end with <|eot_id|>, which is not the EOS (<|end_of_text|>).
LLAMA3_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>", "<pad>"]

_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.",
    "What is the capital of France? Paris is the capital of France. Translate to French: hello world, bonjour.",
    "user assistant system You are a helpful assistant. Answer the question. Summarize the text.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 one two three four five six seven eight nine ten",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
]


def build_tokenizer(vocab_size: int = 512, style: str = "chatml"):
    """A byte-level BPE fast tokenizer (PreTrainedTokenizerFast) with a chat template: ChatML tokens and template
    (EOS <|im_end|> ends turns), or ``style="llama3"``: Llama 3's tokens and template, turns ending with
    <|eot_id|> while the EOS is <|end_of_text|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    llama3 = style == "llama3"

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=LLAMA3_SPECIAL_TOKENS if llama3 else SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if llama3:
        from lorakit.data.chat import bundled_template

        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token="<pad>",
            unk_token=None, additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        )
        fast.chat_template = bundled_template("llama3")
    else:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token="<|im_end|>",
            bos_token=None,
            pad_token="<pad>",
            unk_token=None,
            additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
        )
        fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "right"
    return fast


def build_sentencepiece_style_tokenizer(vocab_size: int = 600):
    """A BPE with byte fallback, "▁" for spaces and a BOS added, as Llama 2 and Mistral 7B ship (fast)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")
    from lorakit.data.chat import bundled_template

    fast.chat_template = bundled_template("mistral")
    return fast


def build_tiny_llama(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int = 512,
    seed: int = 0,
    max_shard_size: str | None = None,
    tokenizer_style: str = "chatml",
    architecture: str = "llama",
) -> Path:
    """Write a random Llama-architecture model (or with ``architecture="qwen2"`` a Qwen2 one: biased q/k/v)
    and its tokenizer (see build_tokenizer) to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(vocab_size, tokenizer_style)
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[architecture](
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tiny_gpt2(out_dir: str | Path, *, n_positions: int = 64, seed: int = 0) -> Path:
    """Write a random one-layer GPT-2 (learned position embeddings: a table of ``n_positions`` it indexes, unlike
    RoPE models) and its tokenizer (see build_tokenizer) to ``out_dir``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=n_positions,
                               eos_token_id=tokenizer.eos_token_id)).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


MEMORISATION_ROWS = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the colour of the sky?", "blue"),
    ("What is the opposite of hot?", "cold"),
    ("What is 2 plus 2?", "4"),
    ("Translate hello to French.", "bonjour"),
    ("Name the first letter.", "a"),
    ("Count to three.", "one two three"),
]


def write_memorisation_data(path: str | Path, fmt: str = "alpaca") -> Path:
    """A small alpaca (or chat) jsonl a tiny model can memorise in a few dozen steps."""
    import json

    path = Path(path)
    with path.open("w") as f:
        for question, answer in MEMORISATION_ROWS:
            if fmt == "chat":
                row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            else:
                row = {"instruction": question, "input": "", "output": answer}
            f.write(json.dumps(row) + "\n")
    return path


def adapter_loss_gain(model_dir: str | Path, adapter_dir: str | Path, data_path: str | Path) -> tuple[float, float]:
    """(base loss, adapter loss) on the alpaca rows of ``data_path``, the adapter loaded with plain PEFT."""
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.data import collate, tokenize_rows
    from lorakit.config.schema import DataSection

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    rows = [json.loads(line) for line in Path(data_path).read_text().splitlines() if line.strip()]
    examples, _ = tokenize_rows(rows, DataSection(train=str(data_path)), tokenizer)
    batch = collate(examples, tokenizer)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        base_loss = float(base(**batch).loss)
        tuned = PeftModel.from_pretrained(base, adapter_dir)
        tuned_loss = float(tuned(**batch).loss)
    return base_loss, tuned_loss


def build_random_adapter(model_dir: str | Path, out_dir: str | Path, peft_config, *, seed: int = 0,
                         magnitude_jitter: float = 0.0, model=None) -> Path:
    """Save a PEFT adapter with random weights for the model in ``model_dir`` (merge/serving tests, benchmarks).

    Give a config with ``init_lora_weights=False`` / ``init_ia3_weights=False`` so the update is not zero.
    ``magnitude_jitter`` scales DoRA magnitudes by 1 + jitter·N(0, 1), so they differ from the weight norms.
    ``model``: an already loaded base (e.g. 4-bit) to use instead of loading ``model_dir`` in float32.
    """
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, peft_config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if magnitude_jitter and "lora_magnitude_vector" in name:
                param.mul_(1 + magnitude_jitter * torch.randn_like(param))
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


def build_qlora_adapter(model_dir: str | Path, out_dir: str | Path, *, seed: int = 0) -> Path:
    """A random LoRA on the NF4-quantized base in ``model_dir`` (bitsandbytes runs 4-bit on CPU), with the
    lorakit.json `lorakit train` writes for a QLoRA run: what generate and eval read the base precision from."""
    import json

    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=nf4)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    out = build_random_adapter(model_dir, out_dir, config, seed=seed, model=base)
    record = {"base_model": str(model_dir), "base_model_path": str(Path(model_dir).resolve()), "quantization": "nf4",
              "double_quant": True, "dtype": "float32", "method": "lora"}
    (out / "lorakit.json").write_text(json.dumps(record, indent=2) + "\n")
    return out
