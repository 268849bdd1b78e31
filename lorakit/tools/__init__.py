"""Standalone commands: generate, eval (tuned vs base on rows with answers), inspect, doctor, data preview.

May import lorakit.training, checkpoint, distributed, adapters, data, models, config and the bottom layer.
"""
