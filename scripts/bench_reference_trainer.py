"""The reference side of scripts/bench_train.py: the same LoRA fine-tune through transformers.Trainer + PEFT.

    python scripts/bench_reference_trainer.py --model DIR --data FILE --out result.json [--steps 6 ...]

This is the stack most users start from: DataCollatorForSeq2Seq pads each micro-batch to its longest row
and the model computes its loss on full logits; the optimizer is torch's fused AdamW (the Trainer's default)
with the same schedule. Two
things are shared with lorakit on purpose, so that both sides train on identical micro-batches:
- token ids and labels come from lorakit's tokenization (same prompt template and masking);
- the example order is lorakit's StepSampler order (a Trainer subclass overrides only _get_train_sampler).
The result file holds the supervised tokens trained on, the wall and CPU seconds from the start to the end of
Trainer's training loop (model loading excluded) and the loss of every step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from lorakit.data import StepSampler, load_datasets
from lorakit.config.schema import DataSection


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="alpaca-format .jsonl")
    p.add_argument("--eval", default=None, help="held-out alpaca .jsonl: token-weighted loss after training")
    p.add_argument("--out", required=True, help="result .json")
    p.add_argument("--output-dir", default=None, help="Trainer's output_dir (default: next to --out)")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--scheduler", default="cosine")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    section = DataSection(train=args.data, format="alpaca", max_seq_len=args.max_seq_len, cache=False)
    examples = load_datasets(section, tokenizer, args.seed).train
    rows = [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)} for e in examples]
    sampler = StepSampler(num_examples=len(rows), micro_batch_size=args.micro_batch, grad_accum=args.grad_accum,
                          seed=args.seed)
    order = sampler.epoch_order(0).tolist()

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(task_type="CAUSAL_LM", r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                      target_modules="all-linear")
    model = get_peft_model(model, lora)

    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    counts = Counts()
    training_args = TrainingArguments(
        output_dir=args.output_dir or str(out.with_suffix("")) + "-trainer",
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type=args.scheduler,
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",  # the Trainer's default with torch >= 2.8, and lorakit's AdamW
        bf16=dtype == torch.bfloat16 and torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
    )
    clock = LoopClock()
    trainer = SameOrderTrainer(
        order=order, counts=counts, model=model, args=training_args, train_dataset=ListDataset(rows),
        data_collator=collator, callbacks=[clock],
    )
    trainer.train()
    trainer.save_model()  # the adapter, as any fine-tune ends (lorakit's side writes its adapter too)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    eval_loss = None
    if args.eval:
        held_out = load_datasets(section.model_copy(update={"train": args.eval}), tokenizer, args.seed).train
        eval_loss = evaluate(model, collator, held_out, args.micro_batch)
    result = {
        "supervised_tokens": counts.supervised,
        "tokens": counts.tokens,
        "padded_tokens": counts.padded,
        "train_seconds": clock.seconds,
        "train_cpu_seconds": clock.cpu_seconds,
        "losses": losses,
        "eval_loss": eval_loss,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


@torch.no_grad()
def evaluate(model, collator, examples, batch_size: int) -> float:
    """Loss per supervised token over ``examples`` (the sum over all of them / their supervised targets), as
    lorakit's eval_loss; Trainer.evaluate would average per-batch means instead."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collator([{"input_ids": e.input_ids, "labels": e.labels} for e in examples[i : i + batch_size]])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        total += float(model(**batch, num_items_in_batch=1).loss)
        count += int((batch["labels"][:, 1:] != -100).sum())
    return total / count


class Counts:
    """What the micro-batches trained on hold: supervised targets, real and padded tokens. Counted as each is
    trained on (SameOrderTrainer.training_step), not as it is collated: accelerate's data loader collates one
    batch ahead, so a collator would count one micro-batch more than the run trains on."""

    def __init__(self):
        self.supervised = self.tokens = self.padded = 0

    def add(self, batch) -> None:
        self.supervised += int((batch["labels"][:, 1:] != -100).sum())
        self.tokens += int(batch["attention_mask"].sum())
        self.padded += batch["input_ids"].numel()


class ListDataset:
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class SameOrderTrainer(Trainer):
    """Trainer unchanged except for the order of examples (lorakit's, so both sides see the same batches) and a
    count of what each training micro-batch holds."""

    def __init__(self, *args, order, counts, **kwargs):
        super().__init__(*args, **kwargs)
        self.order, self.counts = order, counts

    def _get_train_sampler(self, train_dataset=None):
        return self.order

    def training_step(self, model, inputs, *args, **kwargs):
        self.counts.add(inputs)
        return super().training_step(model, inputs, *args, **kwargs)


class LoopClock(TrainerCallback):
    """Wall and CPU seconds from the start to the end of Trainer's training loop."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.cpu0


if __name__ == "__main__":
    sys.exit(main())
