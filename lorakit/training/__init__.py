"""A training run: setup, the loop, optimizer and schedule, loss, metrics and the efficiency meter, interrupts.

May import lorakit.checkpoint, distributed, adapters, data, models, config and the bottom layer.
"""
