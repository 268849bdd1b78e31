"""Multi-process training: launching workers, DDP/FSDP specifics, gathering sharded adapter state.

May import lorakit.adapters, data, models, config and the bottom layer.
"""
