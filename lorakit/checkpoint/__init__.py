"""Training checkpoints: the on-disk format, writing, reading and verifying, resuming.

May import lorakit.distributed, adapters, data, models, config and the bottom layer.
"""
