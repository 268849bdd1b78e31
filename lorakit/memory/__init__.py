"""`lorakit memory`: the GPU memory estimate from a meta-device model profile, and its report.

May import lorakit.training (loss constants), adapters, models, config and the bottom layer.
"""
