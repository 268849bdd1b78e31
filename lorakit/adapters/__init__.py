"""Adapter methods at work: building an adapter onto a base model as the method registry says (the registry
itself, the only home of what a method is, lives in lorakit.config.methods), inits that rewrite the base or read
data, reading and saving adapter folders, their model cards (README.md), and lorakit's own bottleneck adapter.

May import lorakit.models, lorakit.config and the bottom layer.
"""
