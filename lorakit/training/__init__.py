"""A training run: setup, the loop, optimizer and schedule, loss, metrics and the efficiency meter, interrupts,
experiment trackers, answer scoring (train.eval_generate; `lorakit eval` uses the same code),
micro-batches collated ahead of the step, and CPU threads.

May import lorakit.checkpoint, distributed, adapters, data, models, config and the bottom layer.
"""
