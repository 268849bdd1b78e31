"""Standalone commands: generate, inspect, doctor, data preview.

May import lorakit.training, checkpoint, distributed, adapters, data, models, config and the bottom layer.
"""
