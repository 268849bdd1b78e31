"""Standalone commands: generate, eval (tuned vs base on rows with answers), inspect, doctor, preview-data.

May import lorakit.training, checkpoint, distributed, adapters, data, models, config and the bottom layer.
"""
